"""Check an installed spinal_ops (not this checkout): it imports, reports itself, and its native
CPU op meets contract §4 forward and backward. Run by `make sdist-check` inside the fresh
environment that the sdist was installed into."""
import os
import sys

# contract.py lives in the checkout's tests/; the package under test must come from site-packages.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(CHECKOUT, "tests"))

import spinal_ops  # noqa: E402
from contract import check_backend, make_config  # noqa: E402

package_dir = os.path.dirname(os.path.abspath(spinal_ops.__file__))
if package_dir.startswith(CHECKOUT + os.sep + "spinal_ops"):
    sys.exit(f"spinal_ops was imported from the checkout ({package_dir}), not from the installation")
spinal_ops.info()
support = spinal_ops.available_backends()["cpu"]
if not support:
    sys.exit(f"the installed package has no CPU op: {support.reason}")
# N = 7, s = 4, three layers: two of the windows wrap around the end of x.
check_backend("cpu", make_config(in_features=7, out_features=3, layer_width=5, num_layers=3))
print("installed spinal_ops: native CPU forward+backward within contract §4 of the float64 reference")

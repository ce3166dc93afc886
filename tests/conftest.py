"""Session setup shared by the test modules."""
import os

import torch

# Without a GPU the triton backend is tested on CPU tensors through the Triton interpreter.
# Triton reads TRITON_INTERPRET when kernels are defined and spinal_ops when it is imported,
# so it is set here, before any test module imports spinal_ops. It changes nothing else:
# `auto` never picks the triton backend for CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

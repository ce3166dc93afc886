"""The registered op pairs and their schemas (spinal_ops/ops.py, spinal_ops/_extension.py)."""
import pytest
import torch

from spinal_ops import _extension, ops

PAIRS = ("native", "hoisted", "triton")


@pytest.mark.parametrize("pair", PAIRS)
def test_every_pair_has_the_shared_schemas(pair):
    # The C++ definitions (csrc/ops.cpp) and the Python ones must be the same strings. The ops
    # exist whenever _C was imported, even when _extension.py then refused it as built from other
    # sources, so a mismatch fails here instead of skipping.
    if not hasattr(torch.ops.spinal_ops, f"{pair}_forward"):
        pytest.skip(f"compiled extension: {_extension.extension_status().reason}")
    for direction, schema in (("forward", ops.FORWARD_SCHEMA), ("backward", ops.BACKWARD_SCHEMA)):
        name = f"{pair}_{direction}"
        registered = getattr(torch.ops.spinal_ops, name).default._schema
        assert registered == torch._C.parse_schema(f"spinal_ops::{name}{schema}"), (str(registered), schema)


def test_a_stale_extension_is_recognised():
    # The check that keeps an extension built from other sources from loading.
    if not _extension.extension_status():
        pytest.skip(f"compiled extension: {_extension.extension_status().reason}")
    assert _extension.compiled_schema_mismatches() == []
    older = ops.FORWARD_SCHEMA.replace("bool allow_tf32=False, ", "")
    assert _extension.compiled_schema_mismatches(forward_schema=older) == ["native_forward", "hoisted_forward"]

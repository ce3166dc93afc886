"""Which Triton kernels the ``triton`` backend runs: the module-level switch for the tiled kernels.

The tiled kernels (tiled.py) run any layer width; they have not yet been measured on a GPU, so
they run only where asked for (``backend="auto"`` does not choose them on its own):

- ``SPINAL_OPS_TRITON_TILED=1`` in the environment when spinal_ops is imported (read once, here,
  so that the choice inside a ``torch.compile`` trace reads a constant), or
- ``set_tiled(True)`` / ``TILED = True`` on this module (tests; a process that sets it after a
  layer was dispatched with ``backend="auto"`` keeps that layer's earlier choice).

With the switch off, layers of width <= MAX_LAYER_WIDTH run the one-block kernels of kernels.py
and wider ones are refused by ``TritonBackend.supports()``; with it on, every width runs the tiled
kernels. This module imports neither torch nor triton.
"""
from __future__ import annotations

import os

# The widest layer of the one-block kernels (kernels.py): a program holds a [BLOCK_W, BLOCK_W]
# hidden weight and a [BLOCK_B, BLOCK_W] state in registers.
MAX_LAYER_WIDTH = 128

TILED_ENV = "SPINAL_OPS_TRITON_TILED"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "on", "yes")


TILED: bool = _env_flag(TILED_ENV)

WIDTH_REASON = (
    f"layers wider than {MAX_LAYER_WIDTH} (the register budget of the one-block kernels) need the tiled "
    f"Triton kernels, not yet measured on a GPU: set {TILED_ENV}=1"
)


def set_tiled(enabled: bool) -> None:
    """Turn the tiled kernels on or off for every later call."""
    global TILED
    TILED = bool(enabled)


def use_tiled(layer_width: int) -> bool:
    """Whether a call of this width runs the tiled kernels (False: the one-block kernels).
    Raises for a width the one-block kernels cannot run while the switch is off."""
    if TILED:
        return True
    if layer_width > MAX_LAYER_WIDTH:
        raise ValueError(f"spinal_ops::triton ops: layer_width {layer_width}: {WIDTH_REASON}")
    return False

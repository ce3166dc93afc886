"""spinal_ops: fast SpinalNet layers for PyTorch (one fused op, forward and backward)."""
from ._version import __version__
from .about import info
from .activations import ACTIVATIONS
from .authors import from_spinalnet
from .config import SpinalConfig, SpinalNorm, SpinalParams
from .dispatch import BACKEND_NAMES, BackendUnavailableError, available_backends, select_backend
from .functional import spinal_linear
from .module import SpinalLinear
from .spinalize import spinalize
from .support import Support

__all__ = [
    "ACTIVATIONS",
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "SpinalConfig",
    "SpinalLinear",
    "SpinalNorm",
    "SpinalParams",
    "Support",
    "available_backends",
    "from_spinalnet",
    "info",
    "select_backend",
    "spinal_linear",
    "spinalize",
]

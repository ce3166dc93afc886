"""spinal_ops: fast SpinalNet layers for PyTorch (one fused op, forward and backward)."""
from .activations import ACTIVATIONS
from .backends.base import Support
from .config import SpinalConfig, SpinalParams
from .dispatch import BACKEND_NAMES, BackendUnavailableError, available_backends, select_backend
from .functional import spinal_linear
from .module import SpinalLinear

__all__ = [
    "ACTIVATIONS",
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "SpinalConfig",
    "SpinalLinear",
    "SpinalParams",
    "Support",
    "available_backends",
    "select_backend",
    "spinal_linear",
]

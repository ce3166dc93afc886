"""Backend registry and selection: which implementation runs a call (contract §3)."""
from __future__ import annotations

import torch

from .backends.base import Backend, Support
from .backends.cpu import CpuBackend
from .backends.cuda import CudaBackend
from .backends.reference import ReferenceBackend
from .backends.triton import TritonBackend
from .config import SpinalConfig

BACKEND_NAMES: tuple[str, ...] = ("auto", "cuda", "triton", "cpu", "reference")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call on this machine."""


# All backends, fastest first: the order ``auto`` tries them in.
_BACKENDS: dict[str, Backend] = {
    backend.name: backend for backend in (CudaBackend(), TritonBackend(), CpuBackend(), ReferenceBackend())
}
# Resolved once at import: selection inside a torch.compile trace then only reads this dict.
_AVAILABILITY: dict[str, Support] = {name: backend.availability() for name, backend in _BACKENDS.items()}


def check_backend_name(name: str) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"spinal_ops: unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")


def get_backend(name: str) -> Backend:
    check_backend_name(name)
    if name == "auto":
        raise ValueError("spinal_ops: 'auto' is a selection rule, not a backend; use select_backend")
    return _BACKENDS[name]


def _usable(backend: Backend, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> Support:
    available = _AVAILABILITY[backend.name]
    if not available:
        return Support.no(f"not available here: {available.reason}")
    return backend.supports(config, dtype, device)


# Selections already made, by (name, config, dtype, device). What decides a selection (availability,
# device properties) is resolved at import, so it never changes; looking it up again costs ~10 µs
# of Python per call at small batch, as much as the op on mnist's layer at batch 64. One entry per
# distinct layer shape, dtype and device; refusals raise and are not kept. (Not used inside a
# torch.compile trace, which selects once per compiled graph.)
_SELECTED: dict[tuple[str, SpinalConfig, torch.dtype, torch.device], Backend] = {}


def select_backend(name: str, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> Backend:
    """The backend that runs this call; for ``auto`` the first usable one in preference order."""
    if torch.compiler.is_compiling():
        return _select(name, config, dtype, device)
    key = (name, config, dtype, device)
    backend = _SELECTED.get(key)
    if backend is None:
        backend = _SELECTED[key] = _select(name, config, dtype, device)
    return backend


def _select(name: str, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> Backend:
    check_backend_name(name)
    if name == "auto":
        # Unavailable backends are skipped before any reason is formatted: this runs on every call.
        for backend in _BACKENDS.values():
            if not (_AVAILABILITY[backend.name] and backend.auto_eligible(device)):
                continue
            if config.has_training_stages and not backend.auto_runs_training_stages:
                continue
            if backend.supports(config, dtype, device):
                return backend
        raise AssertionError("the reference backend supports every call")
    backend = _BACKENDS[name]
    verdict = _usable(backend, config, dtype, device)
    if not verdict:
        raise BackendUnavailableError(
            f"spinal_ops: backend {name!r} cannot run this call ({dtype}, {device}): {verdict.reason}"
        )
    return backend


def available_backends() -> dict[str, Support]:
    """Each backend with whether it can run on this machine and, if not, why."""
    return dict(_AVAILABILITY)

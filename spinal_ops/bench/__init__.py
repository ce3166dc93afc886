"""spinal-bench: parameters, FLOPs, latency and throughput of the spinal layer against the
eager reference, torch.compile(reference) and the dense layer of equal hidden width (contract §6)."""
from .cli import main
from .presets import DEFAULT_PRESETS, PRESETS

__all__ = ["DEFAULT_PRESETS", "PRESETS", "main"]

"""The results JSON (exactly this shape; other tools read it):

    {"device", "torch", "triton", "commit", "created",
     "records": [{"preset", "batch", "dtype", "impl", "mode", "threads", "launch", "median_ms", "rows_per_s",
                  "tflops", "flops", "params", "peak_mb", "floor_ms"}]}

"mode" is train, frozen or infer; "launch" is eager (each step launches its kernels from the
host) or graph (the step captured once in a CUDA graph and replayed, ``spinal-bench
--cuda-graphs``); "peak_mb" is null where a run did not measure peak memory; "floor_ms" is the
least time the case could take on the GPU (roofline.py: the run's peak GEMM rate, copy bandwidth
and launch time), null on CPU.
"impl" is a spinal backend, compiled_reference, dense (the equal-width dense layer) or
authors_dense (the authors' dense head of the preset, ``--baseline authors``): a record's
"flops" and "params" are its own implementation's, so E against either baseline comes from the
file alone.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import MODES

LAUNCHES: tuple[str, ...] = ("eager", "graph")
DOCUMENT_FIELDS: dict[str, type] = {
    "device": str, "torch": str, "triton": str, "commit": str, "created": str, "records": list,
}
RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "preset": str, "batch": int, "dtype": str, "impl": str, "mode": str, "threads": int, "launch": str,
    "median_ms": (int, float), "rows_per_s": (int, float), "tflops": (int, float), "flops": int, "params": int,
    "peak_mb": (int, float, type(None)), "floor_ms": (int, float, type(None)),
}


@dataclass
class Record:
    """One measured case. ``extras`` (CUDA efficiencies) are shown on the terminal, not saved."""

    preset: str
    batch: int
    dtype: str
    impl: str
    mode: str
    threads: int
    median_ms: float
    flops: int
    params: int
    peak_mb: float | None  # bytes the step allocates at its peak, in MB (1e6 bytes)
    launch: str = "eager"  # one of LAUNCHES
    floor_ms: float | None = None  # the case's floor on a GPU (roofline.Yardsticks)
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.batch / (self.median_ms / 1e3)

    @property
    def tflops(self) -> float:
        return self.flops / (self.median_ms / 1e3) / 1e12

    def to_json(self) -> dict[str, Any]:
        return {
            "preset": self.preset, "batch": self.batch, "dtype": self.dtype, "impl": self.impl,
            "mode": self.mode, "threads": self.threads, "launch": self.launch, "median_ms": self.median_ms,
            "rows_per_s": self.rows_per_s, "tflops": self.tflops, "flops": self.flops, "params": self.params,
            "peak_mb": self.peak_mb, "floor_ms": self.floor_ms,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Record":
        return cls(data["preset"], data["batch"], data["dtype"], data["impl"], data["mode"], data["threads"],
                   data["median_ms"], data["flops"], data["params"], data["peak_mb"], data["launch"], data["floor_ms"])


@dataclass(frozen=True)
class Skip:
    """An implementation that did not run for a preset and dtype, and why (terminal only)."""

    preset: str
    dtype: str
    impl: str
    reason: str


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def device_name(device: torch.device) -> str:
    """torch.cuda.get_device_name() on CUDA, the CPU model otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_slug(name: str) -> str:
    """A file-name-safe form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """The sha of the checkout this package runs from ('unknown' outside a git checkout)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


def results_document(records: list[Record], device: torch.device) -> dict[str, Any]:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "commit": git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "records": [record.to_json() for record in records],
    }


def _check_fields(data: Any, fields: dict[str, Any], what: str) -> None:
    if not isinstance(data, dict) or set(data) != set(fields):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{what} must have exactly the keys {sorted(fields)}, got {keys}")
    for key, expected in fields.items():
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ValueError(f"{what}[{key!r}] has type {type(value).__name__}, expected {expected}")


def validate_document(document: Any) -> None:
    """ValueError unless ``document`` has exactly the results-JSON shape."""
    _check_fields(document, DOCUMENT_FIELDS, "results")
    for index, record in enumerate(document["records"]):
        _check_fields(record, RECORD_FIELDS, f"records[{index}]")
        if record["mode"] not in MODES:
            raise ValueError(f"records[{index}]['mode'] is {record['mode']!r}, expected one of {', '.join(MODES)}")
        if record["launch"] not in LAUNCHES:
            raise ValueError(f"records[{index}]['launch'] is {record['launch']!r}, expected one of {', '.join(LAUNCHES)}")


def write_json(path: Path, document: dict[str, Any]) -> None:
    validate_document(document)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    document = json.loads(Path(path).read_text())
    validate_document(document)
    return document

"""``Support``: a yes, or a no with its reason. Every refusal in spinal_ops is one of these
(backend availability and ``supports()``, the compiled extension's load status)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Support:
    """A yes, or a no with the reason (shown to users in errors and available_backends())."""

    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls, reason: str = "") -> "Support":
        """A yes; ``reason`` may say how the call runs (e.g. which kernel path)."""
        return cls(True, reason)

    @classmethod
    def no(cls, reason: str) -> "Support":
        return cls(False, reason)

    def __bool__(self) -> bool:
        return self.ok

"""Ratios between records of the same case (preset, batch, dtype, mode, threads, launch) from one run.

The launch is part of the case: a step replayed from a CUDA graph compares with the dense
baseline and the reference replayed from theirs, an eager step with eager ones."""
from __future__ import annotations

from collections.abc import Iterable

from .heads import BASELINE_IMPLS
from .results import Record

CaseKey = tuple[str, int, str, str, int, str]  # preset, batch, dtype, mode, threads, launch


def case_key(record: Record) -> CaseKey:
    return record.preset, record.batch, record.dtype, record.mode, record.threads, record.launch


def by_case(records: Iterable[Record]) -> dict[CaseKey, dict[str, Record]]:
    """{case: {impl: record}}, cases in the order of the records."""
    cases: dict[CaseKey, dict[str, Record]] = {}
    for record in records:
        cases.setdefault(case_key(record), {})[record.impl] = record
    return cases


def baseline_record(same_case: dict[str, Record]) -> Record | None:
    """The dense baseline of a case: the authors' head where the run measured it (``--baseline
    authors``), else the equal-width dense layer; None when the run measured neither."""
    for impl in reversed(BASELINE_IMPLS):
        if impl in same_case:
            return same_case[impl]
    return None


def speedup(record: Record, baseline: Record | None) -> float | None:
    """How many times faster ``record`` is than ``baseline``."""
    return None if baseline is None else baseline.median_ms / record.median_ms


def efficiency(record: Record, dense: Record | None) -> float | None:
    """E = (time / dense time) / (FLOPs / dense FLOPs): time per FLOP relative to the dense
    baseline (its own FLOPs: the equal-width layer's or the authors' head's), so that E <= 1 is as
    efficient per FLOP as that dense baseline whatever the FLOP ratio."""
    if dense is None:
        return None
    return (record.median_ms / dense.median_ms) / (record.flops / dense.flops)

"""The speed goals, in one table, and their verdicts on a run's records.

A goal bounds one metric (E, or the speed-up over the eager reference) for one implementation on
a set of cases; a run checks the cases it measured and says nothing about the others. Goals for
another device are further rows of ``GOALS`` with their ``device``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from ..config import MODES
from .metrics import by_case, case_key, efficiency, speedup
from .results import Record


@dataclass(frozen=True)
class Metric:
    """A ratio of a record to the record of ``baseline`` in the same case."""

    name: str
    baseline: str
    value: Callable[[Record, Record | None], float | None]
    upper_bound: bool  # the goal caps the value (E) instead of requiring at least it (a speed-up)
    unit: str = ""


E = Metric("E", "dense", efficiency, upper_bound=True)
SPEEDUP_OVER_REFERENCE = Metric("speed-up over reference", "reference", speedup, upper_bound=False, unit="x")


@dataclass(frozen=True)
class Goal:
    metric: Metric
    bound: float
    impl: str
    presets: tuple[str, ...]
    batches: tuple[int, ...]
    modes: tuple[str, ...]
    dtype: str = "float32"
    device: str = "cpu"  # device type of the run: cpu or cuda

    def covers(self, record: Record, device: str) -> bool:
        return (device == self.device and record.launch == "eager" and record.impl == self.impl and record.preset in self.presets
                and record.batch in self.batches and record.mode in self.modes and record.dtype == self.dtype)

    def met(self, value: float) -> bool:
        return value <= self.bound if self.metric.upper_bound else value >= self.bound

    def describe(self) -> str:
        return f"{'<=' if self.metric.upper_bound else '>='} {self.bound:g}{self.metric.unit}"


CPU_GOAL_PRESETS = ("mnist", "vgg5", "cifar_vgg", "cnn_cifar", "resnet_head")
GOALS: tuple[Goal, ...] = (
    Goal(E, 1.15, "cpu", CPU_GOAL_PRESETS, batches=(64, 4096), modes=MODES),
    Goal(SPEEDUP_OVER_REFERENCE, 2.0, "cpu", ("mnist", "vgg5"), batches=(64,), modes=("train",)),
)


def goal_lines(records: Sequence[Record], device: str, goals: Sequence[Goal] = GOALS) -> list[str]:
    """One line per goal and measured case it covers: the value and 'met' or 'MISSED'."""
    cases = by_case(records)
    lines = []
    for goal in goals:
        for record in records:
            if not goal.covers(record, device):
                continue
            value = goal.metric.value(record, cases[case_key(record)].get(goal.metric.baseline))
            if value is None:  # the baseline was not part of this run
                continue
            lines.append(
                f"{goal.impl} {goal.metric.name}, {record.mode}, {record.preset} {record.dtype} batch {record.batch}, "
                f"{record.threads} thread(s): {value:.2f}{goal.metric.unit} "
                f"(goal {goal.describe()}: {'met' if goal.met(value) else 'MISSED'})"
            )
    return lines

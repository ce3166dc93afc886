"""Tables from benchmark records: the terminal table and the README's markdown.

    python -m spinal_ops.bench.report benchmarks/results/<device>.json   # markdown for the README

Every ratio compares two records of the same (preset, batch, dtype, pass) from one run.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .results import Record, Skip, read_json

CaseKey = tuple[str, int, str, str]  # preset, batch, dtype, pass
# Issue 3's speed goal for the fused CPU op on these presets: forward+backward speedup over the
# eager reference, by batch.
CPU_GOAL_PRESETS = ("mnist", "vgg5", "cifar_vgg")
CPU_GOALS = {64: 1.3, 4096: 0.95}


def _case_key(record: Record) -> CaseKey:
    return record.preset, record.batch, record.dtype, record.pass_name


def _by_case(records: Iterable[Record]) -> dict[CaseKey, dict[str, Record]]:
    cases: dict[CaseKey, dict[str, Record]] = {}
    for record in records:
        cases.setdefault(_case_key(record), {})[record.impl] = record
    return cases


def speedup(record: Record, baseline: Record | None) -> float | None:
    """How many times faster ``record`` is than ``baseline`` (same run, same case)."""
    return None if baseline is None else baseline.median_ms / record.median_ms


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _count(value: float) -> str:
    """3 significant digits with a k/M/G suffix."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """Right-aligned text columns, or a GitHub markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(headers, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def model_table(records: Sequence[Record], markdown: bool = False) -> str:
    """FC vs spinal per preset: parameters and forward FLOPs per row, from the records."""
    rows = []
    for preset in dict.fromkeys(r.preset for r in records):
        forward = [r for r in records if r.preset == preset and r.pass_name == "forward"]
        spinal = next((r for r in forward if r.impl != "dense"), None)
        dense = next((r for r in forward if r.impl == "dense"), None)
        if spinal is None or dense is None:
            continue
        rows.append([
            preset, _count(spinal.params), _count(dense.params), f"{dense.params / spinal.params:.1f}x",
            _count(spinal.flops / spinal.batch), _count(dense.flops / dense.batch),
        ])
    headers = ["preset", "spinal params", "dense params", "dense/spinal", "spinal FLOP/row", "dense FLOP/row"]
    return format_table(headers, rows, markdown) if rows else ""


def case_table(records: Sequence[Record], markdown: bool = False) -> str:
    """One row per record: latency, throughput, and speedups over eager reference and dense."""
    cases = _by_case(records)
    with_extras = any(record.extras for record in records)
    headers = ["preset", "batch", "dtype", "pass", "impl", "median ms", "rows/s", "TFLOP/s", "vs reference", "vs dense"]
    if with_extras:
        headers += ["% of GEMM", "% of copy BW"]
    rows = []
    for record in records:
        same_case = cases[_case_key(record)]
        row = [
            record.preset, str(record.batch), record.dtype, record.pass_name, record.impl,
            f"{record.median_ms:.4g}", _count(record.rows_per_s), f"{record.tflops:.3g}",
            _ratio(speedup(record, same_case.get("reference"))), _ratio(speedup(record, same_case.get("dense"))),
        ]
        if with_extras:
            row += [_percent(record.extras.get("gemm_eff")), _percent(record.extras.get("bw_eff"))]
        rows.append(row)
    return format_table(headers, rows, markdown)


def latency_table(records: Sequence[Record], markdown: bool = False) -> str:
    """One row per case: each implementation's median ms, then the fastest spinal implementation
    and its speedup over the eager reference and over the dense baseline (the README's table)."""
    impls = list(dict.fromkeys(r.impl for r in records))
    headers = ["preset", "batch", "dtype", "pass"] + [f"{impl} ms" for impl in impls]
    headers += ["fastest spinal", "vs reference", "vs dense"]
    rows = []
    for (preset, batch, dtype, pass_name), same_case in _by_case(records).items():
        spinal = [r for r in same_case.values() if r.impl != "dense"]
        fastest = min(spinal, key=lambda r: r.median_ms) if spinal else None
        row = [preset, str(batch), dtype, pass_name]
        row += [f"{same_case[impl].median_ms:.4g}" if impl in same_case else "-" for impl in impls]
        if fastest is None:
            row += ["-", "-", "-"]
        else:
            row += [fastest.impl, _ratio(speedup(fastest, same_case.get("reference"))),
                    _ratio(speedup(fastest, same_case.get("dense")))]
        rows.append(row)
    return format_table(headers, rows, markdown)


def speedup_summary(records: Sequence[Record], pass_name: str = "forward_backward", markdown: bool = False) -> str:
    """Speedup of each non-reference spinal implementation over the eager reference, by batch."""
    cases = _by_case(records)
    batches = sorted({r.batch for r in records})
    rows = []
    impl_rows = dict.fromkeys((r.impl, r.preset, r.dtype) for r in records if r.impl not in ("reference", "dense"))
    for impl, preset, dtype in impl_rows:
        cells = []
        for batch in batches:
            same_case = cases.get((preset, batch, dtype, pass_name), {})
            record = same_case.get(impl)
            cells.append("-" if record is None else _ratio(speedup(record, same_case.get("reference"))))
        rows.append([impl, preset, dtype] + cells)
    if not rows:
        return ""
    return format_table(["impl", "preset", "dtype"] + [f"batch {b}" for b in batches], rows, markdown)


def cpu_goal_lines(records: Sequence[Record]) -> str:
    """Issue 3's goal, checked on this run: cpu vs eager reference, forward+backward."""
    cases = _by_case(records)
    lines = []
    for record in records:
        goal = CPU_GOALS.get(record.batch)
        in_scope = record.impl == "cpu" and record.pass_name == "forward_backward" and record.preset in CPU_GOAL_PRESETS
        reference = cases[_case_key(record)].get("reference")
        if not in_scope or goal is None or reference is None:
            continue
        ratio = speedup(record, reference)
        verdict = "met" if ratio >= goal else "NOT met"
        lines.append(f"cpu vs reference, forward+backward, {record.preset} {record.dtype} batch {record.batch}: "
                     f"{ratio:.2f}x (goal >= {goal}x: {verdict})")
    return "\n".join(lines)


def skip_lines(skips: Sequence[Skip]) -> str:
    """One line per implementation that did not run, with the reason (deduplicated across presets)."""
    reasons: dict[tuple[str, str, str], list[str]] = {}
    for skip in skips:
        reasons.setdefault((skip.impl, skip.dtype, skip.reason), []).append(skip.preset)
    return "\n".join(
        f"skipped {impl} ({dtype}; {', '.join(presets)}): {reason}" for (impl, dtype, reason), presets in reasons.items()
    )


def terminal_report(records: Sequence[Record], skips: Sequence[Skip]) -> str:
    parts = [model_table(records), case_table(records)]
    summary = speedup_summary(records)
    if summary:
        parts.append("Speedup over the eager reference, forward+backward (same run):\n" + summary)
    parts += [cpu_goal_lines(records), skip_lines(skips)]
    return "\n\n".join(part for part in parts if part)


def markdown_report(document: dict[str, Any], note: str = "") -> str:
    """The README section for one results file: caption with device and commit (and ``note``), then the tables."""
    records = [Record.from_json(data) for data in document["records"]]
    caption = (
        f"Measured on **{document['device']}** (torch {document['torch']}, triton {document['triton']}), "
        f"commit `{document['commit'][:12]}`, {document['created']}. Median latency; "
        "ratios are speedups measured in the same run." + (f" {note}" if note else "")
    )
    parts = [caption, model_table(records, markdown=True), latency_table(records, markdown=True)]
    summary = speedup_summary(records, markdown=True)
    if summary:
        parts.append("Speedup over the eager reference, forward+backward:\n\n" + summary)
    return "\n\n".join(part for part in parts if part) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spinal_ops.bench.report", description="Markdown tables from spinal-bench results JSON."
    )
    parser.add_argument("paths", nargs="+", type=Path, help="results JSON files written by spinal-bench --json")
    parser.add_argument("--note", default="", help="text added to each caption (e.g. the thread count)")
    args = parser.parse_args(argv)
    print("\n".join(markdown_report(read_json(path), args.note) for path in args.paths), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

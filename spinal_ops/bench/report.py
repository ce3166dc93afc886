"""Tables from benchmark records: the terminal report and the README's markdown.

    python -m spinal_ops.bench.report benchmarks/results/<device>.json   # markdown for the README

Every ratio compares two records of the same (preset, batch, dtype, mode, threads, launch) from one
run; the launch table compares each implementation's eager and CUDA-graph steps of one run.
The dense baseline of a case is the authors' head (``authors_dense``) where the run measured it
(``spinal-bench --baseline authors``), else the dense layer of equal hidden width (``dense``).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .goals import goal_lines
from .heads import AUTHORS_IMPL, BASELINE_IMPLS, EQUAL_WIDTH_IMPL, authors_head
from .metrics import baseline_record, by_case, case_key, efficiency, speedup
from .results import Record, Skip, read_json
from .workloads import SPINAL_IMPLS


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _e(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _multiple(record: Record) -> str:
    """Measured time as a multiple of the case's floor ("-" where the run has no floor)."""
    return "-" if record.floor_ms is None else f"{record.median_ms / record.floor_ms:.1f}x"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


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


def _saved(spinal: float, baseline: float) -> str:
    """How much of the baseline's count the spinal layer saves (negative: it needs more)."""
    return f"{100 * (1 - spinal / baseline):.0f}%"


def baseline_label(records: Sequence[Record]) -> str:
    """What the tables call the dense baseline: ``dense`` (equal width), ``authors_dense``, or
    ``baseline`` when the run has both kinds (presets without an authors' head keep ``dense``)."""
    kinds = {r.impl for r in records if r.impl in BASELINE_IMPLS}
    return kinds.pop() if len(kinds) == 1 else ("baseline" if kinds else EQUAL_WIDTH_IMPL)


def _has_authors(records: Sequence[Record]) -> bool:
    return any(r.impl == AUTHORS_IMPL for r in records)


def _spinal_impls(records: Sequence[Record]) -> list[str]:
    return [impl for impl in dict.fromkeys(r.impl for r in records) if impl in SPINAL_IMPLS]


def _case_columns(records: Sequence[Record]) -> tuple[list[str], Callable[[Record], list[str]]]:
    """Headers and cells that name a case; the thread count and the launch only when the run has
    several."""
    several_threads = len({r.threads for r in records}) > 1
    several_launches = len({r.launch for r in records}) > 1
    headers = ["preset", "batch", "dtype", "mode"] + (["threads"] if several_threads else []) + (
        ["launch"] if several_launches else [])

    def cells(record: Record) -> list[str]:
        return [record.preset, str(record.batch), record.dtype, record.mode] + (
            [str(record.threads)] if several_threads else []) + ([record.launch] if several_launches else [])

    return headers, cells


def model_table(records: Sequence[Record], markdown: bool = False) -> str:
    """Dense baseline vs spinal per preset: parameters and forward FLOPs per row, from the infer
    records; with the authors' heads also the baseline's shape and the share of parameters and
    FLOPs the spinal layer saves."""
    label, authors = baseline_label(records), _has_authors(records)
    rows = []
    for preset in dict.fromkeys(r.preset for r in records):
        infer = [r for r in records if r.preset == preset and r.mode == "infer"]
        spinal = next((r for r in infer if r.impl in SPINAL_IMPLS), None)
        dense = baseline_record({r.impl: r for r in infer})
        if spinal is None or dense is None:
            continue
        row = [preset, _count(spinal.params), _count(dense.params), f"{dense.params / spinal.params:.1f}x",
               _count(spinal.flops / spinal.batch), _count(dense.flops / dense.batch)]
        if authors:
            head = authors_head(preset) if dense.impl == AUTHORS_IMPL else None
            shape = "-".join(map(str, head.widths)) if head else "equal width"
            row = [preset, shape] + row[1:] + [_saved(spinal.params, dense.params), _saved(spinal.flops, dense.flops)]
        rows.append(row)
    headers = ["preset", "spinal params", f"{label} params", f"{label}/spinal", "spinal FLOP/row", f"{label} FLOP/row"]
    if authors:
        headers = ["preset", "baseline"] + headers[1:] + ["params saved", "FLOPs saved"]
    return format_table(headers, rows, markdown) if rows else ""


def case_table(records: Sequence[Record], markdown: bool = False) -> str:
    """One row per record: latency, throughput, peak memory, E, and speed-ups over eager reference and dense."""
    cases = by_case(records)
    with_extras = any(record.extras for record in records)
    key_headers, key_cells = _case_columns(records)
    headers = key_headers + ["impl", "median ms", "rows/s", "TFLOP/s", "peak MB", "E", "vs reference",
                             f"vs {baseline_label(records)}"]
    if with_extras:
        headers += ["% of GEMM", "% of copy BW", "x floor"]
    rows = []
    for record in records:
        same_case = cases[case_key(record)]
        dense = baseline_record(same_case)
        row = key_cells(record) + [
            record.impl, f"{record.median_ms:.4g}", _count(record.rows_per_s), f"{record.tflops:.3g}",
            _mb(record.peak_mb), _e(efficiency(record, dense) if record.impl in SPINAL_IMPLS else None),
            _ratio(speedup(record, same_case.get("reference"))), _ratio(speedup(record, dense)),
        ]
        if with_extras:
            row += [_percent(record.extras.get("gemm_eff")), _percent(record.extras.get("bw_eff")),
                    _multiple(record)]
        rows.append(row)
    return format_table(headers, rows, markdown)


def latency_table(records: Sequence[Record], markdown: bool = False) -> str:
    """One row per case: each implementation's median ms, each spinal implementation's E, and each
    fused implementation's speed-up over the eager reference (the README's table); with the
    authors' heads also each spinal implementation's speed-up over that head."""
    impls = list(dict.fromkeys(r.impl for r in records))
    spinal = _spinal_impls(records)
    faster = [impl for impl in spinal if impl != "reference"]
    authors, label = _has_authors(records), baseline_label(records)
    key_headers, key_cells = _case_columns(records)
    headers = key_headers + [f"{impl} ms" for impl in impls] + [f"E {impl}" for impl in spinal]
    headers += [f"{impl} vs reference" for impl in faster]
    if authors:
        headers += [f"{impl} vs {label}" for impl in spinal]
    rows = []
    for same_case in by_case(records).values():
        dense = baseline_record(same_case)
        row = key_cells(next(iter(same_case.values())))
        row += [f"{same_case[impl].median_ms:.4g}" if impl in same_case else "-" for impl in impls]
        row += [_e(efficiency(same_case[impl], dense)) if impl in same_case else "-" for impl in spinal]
        row += [_ratio(speedup(same_case[impl], same_case.get("reference"))) if impl in same_case else "-"
                for impl in faster]
        if authors:
            row += [_ratio(speedup(same_case[impl], dense)) if impl in same_case else "-" for impl in spinal]
        rows.append(row)
    return format_table(headers, rows, markdown)


def memory_table(records: Sequence[Record], markdown: bool = False) -> str:
    """One row per case: the MB each implementation's step allocates at its peak ("" when not measured)."""
    if all(record.peak_mb is None for record in records):
        return ""
    impls = list(dict.fromkeys(r.impl for r in records))
    key_headers, key_cells = _case_columns(records)
    rows = [key_cells(next(iter(same_case.values())))
            + [_mb(same_case[impl].peak_mb) if impl in same_case else "-" for impl in impls]
            for same_case in by_case(records).values()]
    return format_table(key_headers + [f"{impl} MB" for impl in impls], rows, markdown)


def batch_summary(records: Sequence[Record], value: Callable[[Record, dict[str, Record]], float | None],
                  fmt: Callable[[float | None], str], impls: Sequence[str], modes: Sequence[str],
                  markdown: bool = False) -> str:
    """``value(record, same_case)`` of each of ``impls`` per (preset, dtype, mode, threads), by batch."""
    cases = by_case(records)
    batches = sorted({r.batch for r in records})
    several_threads = len({r.threads for r in records}) > 1
    several_launches = len({r.launch for r in records}) > 1
    rows = []
    row_keys = dict.fromkeys((r.impl, r.preset, r.dtype, r.mode, r.threads, r.launch) for r in records
                             if r.impl in impls and r.mode in modes)
    for impl, preset, dtype, mode, threads, launch in row_keys:
        cells = []
        for batch in batches:
            same_case = cases.get((preset, batch, dtype, mode, threads, launch), {})
            cells.append("-" if impl not in same_case else fmt(value(same_case[impl], same_case)))
        rows.append([impl, preset, dtype, mode] + ([str(threads)] if several_threads else [])
                    + ([launch] if several_launches else []) + cells)
    if not rows:
        return ""
    headers = ["impl", "preset", "dtype", "mode"] + (["threads"] if several_threads else []) + (
        ["launch"] if several_launches else [])
    return format_table(headers + [f"batch {b}" for b in batches], rows, markdown)


def efficiency_summary(records: Sequence[Record], markdown: bool = False) -> str:
    """E of each spinal implementation in every mode, by batch."""
    modes = list(dict.fromkeys(r.mode for r in records))
    return batch_summary(records, lambda r, case: efficiency(r, baseline_record(case)), _e,
                         _spinal_impls(records), modes, markdown)


def speedup_summary(records: Sequence[Record], mode: str = "train", markdown: bool = False) -> str:
    """Speed-up of each fused spinal implementation over the eager reference in ``mode``, by batch."""
    impls = [impl for impl in _spinal_impls(records) if impl != "reference"]
    return batch_summary(records, lambda r, case: speedup(r, case.get("reference")), _ratio, impls, [mode],
                         markdown)


def thread_table(records: Sequence[Record], markdown: bool = False) -> str:
    """Per case and implementation, when the run has several thread counts: the median ms at each
    and the speed-up of each count over the fewest threads ("" for a single thread count)."""
    threads = sorted({r.threads for r in records})
    if len(threads) < 2:
        return ""
    timings: dict[tuple[str, int, str, str, str], dict[int, Record]] = {}
    for r in records:
        timings.setdefault((r.preset, r.batch, r.dtype, r.mode, r.impl), {})[r.threads] = r
    headers = ["preset", "batch", "dtype", "mode", "impl"] + [f"{t} threads ms" for t in threads]
    headers += [f"{t} vs {threads[0]} threads" for t in threads[1:]]
    rows = []
    for (preset, batch, dtype, mode, impl), by_threads in timings.items():
        row = [preset, str(batch), dtype, mode, impl]
        row += [f"{by_threads[t].median_ms:.4g}" if t in by_threads else "-" for t in threads]
        row += [_ratio(speedup(by_threads[t], by_threads.get(threads[0]))) if t in by_threads else "-"
                for t in threads[1:]]
        rows.append(row)
    return format_table(headers, rows, markdown)


def floor_table(records: Sequence[Record], markdown: bool = False) -> str:
    """One row per case measured on a GPU: the spinal layer's floor (roofline.py) and each
    implementation's time as a multiple of its own floor ("" for a run without floors)."""
    with_floor = [r for r in records if r.floor_ms is not None]
    if not with_floor:
        return ""
    impls = list(dict.fromkeys(r.impl for r in with_floor))
    key_headers, key_cells = _case_columns(with_floor)
    rows = []
    for same_case in by_case(with_floor).values():
        spinal = next((r for r in same_case.values() if r.impl in SPINAL_IMPLS), None)
        row = key_cells(next(iter(same_case.values())))
        row.append("-" if spinal is None else f"{spinal.floor_ms:.4g}")
        row += [_multiple(same_case[impl]) if impl in same_case else "-" for impl in impls]
        rows.append(row)
    return format_table(key_headers + ["spinal floor ms"] + [f"{impl} x floor" for impl in impls], rows, markdown)


def launch_table(records: Sequence[Record], markdown: bool = False) -> str:
    """Per case and implementation, when the run replayed CUDA graphs (``--cuda-graphs``): the
    median ms of the eager and the graphed step and how many times faster the graph is ("" otherwise)."""
    if len({r.launch for r in records}) < 2:
        return ""
    timings: dict[tuple[str, int, str, str, int, str], dict[str, Record]] = {}
    for r in records:
        timings.setdefault((r.preset, r.batch, r.dtype, r.mode, r.threads, r.impl), {})[r.launch] = r
    rows = []
    for (preset, batch, dtype, mode, _, impl), by_launch in timings.items():
        eager, graph = by_launch.get("eager"), by_launch.get("graph")
        rows.append([preset, str(batch), dtype, mode, impl] + [
            "-" if r is None else f"{r.median_ms:.4g}" for r in (eager, graph)
        ] + [_ratio(speedup(graph, eager) if graph is not None else None)])
    headers = ["preset", "batch", "dtype", "mode", "impl", "eager ms", "graph ms", "graph vs eager"]
    return format_table(headers, rows, markdown)


def skip_lines(skips: Sequence[Skip]) -> str:
    """One line per implementation that did not run, with the reason (deduplicated across presets)."""
    reasons: dict[tuple[str, str, str], list[str]] = {}
    for skip in skips:
        reasons.setdefault((skip.impl, skip.dtype, skip.reason), []).append(skip.preset)
    return "\n".join(
        f"skipped {impl} ({dtype}; {', '.join(presets)}): {reason}" for (impl, dtype, reason), presets in reasons.items()
    )


def _titled(title: str, table: str) -> str:
    return f"{title}\n{table}" if table else ""


def _e_definition(records: Sequence[Record]) -> str:
    label = baseline_label(records)
    return f"E = (spinal time / {label} time) / (spinal FLOPs / {label} FLOPs)"


def baseline_lines(records: Sequence[Record]) -> str:
    """Under the authors' baseline: which head each preset was compared with ("" otherwise)."""
    if not _has_authors(records):
        return ""
    lines = []
    for preset in dict.fromkeys(r.preset for r in records):
        impls = {r.impl for r in records if r.preset == preset}
        head = authors_head(preset) if AUTHORS_IMPL in impls else None
        if head is not None:
            lines.append(f"- {preset}: {head.describe()}, {head.num_parameters():,} parameters; {head.source}")
        elif EQUAL_WIDTH_IMPL in impls:
            lines.append(f"- {preset}: no dense head from the paper; the equal-width dense layer")
    return "\n".join(lines)


def terminal_report(records: Sequence[Record], skips: Sequence[Skip], device: str) -> str:
    """Everything a run prints; ``device`` (cpu or cuda) selects the goals that apply (they are
    set against the equal-width dense layer, so a run under the authors' baseline has none)."""
    goals = goal_lines(records, device)
    parts = [
        _titled("Dense baselines (phi between the Linear layers; Dropout and BatchNorm1d are not timed):",
                baseline_lines(records)),
        model_table(records),
        case_table(records),
        _titled(f"{_e_definition(records)}, by batch (same run):", efficiency_summary(records)),
        _titled("Speed-up over the eager reference, train (same run):", speedup_summary(records)),
        _titled("Thread scaling (same run):", thread_table(records)),
        _titled("CUDA graphs: each step captured once and replayed (same run):", launch_table(records)),
        _titled("Goals:", "\n".join(goals)),
        skip_lines(skips),
    ]
    return "\n\n".join(part for part in parts if part)


def markdown_report(document: dict[str, Any], note: str = "") -> str:
    """The results page section for one results file: caption with the device and software (and
    ``note``), then the tables."""
    records = [Record.from_json(data) for data in document["records"]]
    caption = (
        f"Measured on **{document['device']}** (torch {document['torch']}, triton {document['triton']}). Median latency; "
        f"{_e_definition(records)}; "
        "ratios are measured in the same run." + (f" {note}" if note else "")
    )
    parts = [
        caption,
        _titled("Dense baselines (phi between the Linear layers; Dropout and BatchNorm1d are not timed):\n",
                baseline_lines(records)),
        model_table(records, markdown=True),
        latency_table(records, markdown=True),
        _titled("Peak memory of one step (MB the step allocates at its peak):\n", memory_table(records, markdown=True)),
        _titled("Floors: max(FLOPs / peak GEMM rate, bytes / copy bandwidth) + dependent launches x launch time, "
                "measured in the same run, and each time as a multiple of its implementation's floor:\n",
                floor_table(records, markdown=True)),
        _titled("Speed-up over the eager reference, train:\n", speedup_summary(records, markdown=True)),
        _titled("Thread scaling:\n", thread_table(records, markdown=True)),
        _titled("CUDA graphs (each step captured once and replayed):\n", launch_table(records, markdown=True)),
    ]
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

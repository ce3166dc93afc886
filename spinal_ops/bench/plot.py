"""PNG plot of a run: latency and throughput against batch, one line per implementation, mode and
thread count."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from .results import Record  # noqa: E402

MODE_STYLE = {"train": "--", "frozen": ":", "infer": "-"}


def plot_records(records: Sequence[Record], path: Path, title: str) -> None:
    """One row of panels per (preset, dtype): median latency (ms) and rows/s against batch, log-log."""
    panels = list(dict.fromkeys((r.preset, r.dtype) for r in records))
    if not panels:
        raise ValueError("no records to plot")
    impls = list(dict.fromkeys(r.impl for r in records))
    batches = sorted({r.batch for r in records})
    colors = {impl: plt.get_cmap("tab10")(index) for index, impl in enumerate(impls)}
    figure, axes = plt.subplots(len(panels), 2, figsize=(11, 3.2 * len(panels)), squeeze=False,
                               layout="constrained")
    thread_counts = sorted({r.threads for r in records})
    markers = dict(zip(thread_counts, "os^vD"))
    for (preset, dtype), (latency_ax, throughput_ax) in zip(panels, axes):
        for impl, mode, threads in dict.fromkeys((r.impl, r.mode, r.threads) for r in records):
            line = sorted((r for r in records if (r.preset, r.dtype, r.impl, r.mode, r.threads)
                           == (preset, dtype, impl, mode, threads)), key=lambda r: r.batch)
            if not line:
                continue
            style = {"color": colors[impl], "linestyle": MODE_STYLE[mode], "marker": markers.get(threads, "o"),
                     "markersize": 3}
            xs = [r.batch for r in line]
            latency_ax.plot(xs, [r.median_ms for r in line], **style)
            throughput_ax.plot(xs, [r.rows_per_s for r in line], **style)
        for ax, ylabel in ((latency_ax, "median latency (ms)"), (throughput_ax, "rows / s")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(batch) for batch in batches])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel("batch")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{preset} ({dtype})", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
    # One key for the figure, by what each line property encodes: colour = implementation,
    # line style = mode, marker = thread count (only when the run has several).
    modes = list(dict.fromkeys(r.mode for r in records))
    handles = [Line2D([], [], color=colors[impl], label=impl) for impl in impls]
    handles += [Line2D([], [], color="gray", linestyle=MODE_STYLE[mode], label=mode) for mode in modes]
    if len(thread_counts) > 1:
        handles += [Line2D([], [], color="gray", linestyle="", marker=markers.get(threads, "o"),
                           label=f"{threads} thread(s)") for threads in thread_counts]
    figure.legend(handles=handles, fontsize=7, loc="outside right upper")
    figure.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)

"""The benchmark tool: analytic FLOPs against FlopCounterMode, peak memory, the CLI's JSON/PNG,
the report and the goals."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from contract import make_config
from spinal_ops.bench import PRESETS, main, roofline, timing
from spinal_ops.bench.goals import E, SPEEDUP_OVER_REFERENCE, Goal, goal_lines
from spinal_ops.bench.heads import AUTHORS_HEADS, AUTHORS_IMPL, DenseHead, authors_head, baseline_impl
from spinal_ops.bench.memory import peak_bytes
from spinal_ops.bench.metrics import baseline_record, efficiency
from spinal_ops.bench.presets import parse_presets
from spinal_ops.bench.report import (efficiency_summary, floor_table, latency_table, launch_table, markdown_report,
                                     model_table, thread_table)
from spinal_ops.bench.results import DOCUMENT_FIELDS, RECORD_FIELDS, Record, read_json, validate_document
from spinal_ops.bench.workloads import build_impl, cost, dense_baseline, make_step
from spinal_ops.config import MODES
from spinal_ops.dispatch import available_backends

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
FLOP_CONFIGS = {
    **PRESETS,
    "M=None": make_config(out_features=None),
    "wrap-around": make_config(in_features=7, split_size=3, num_layers=4),
    "L=1": make_config(num_layers=1),
    "no bias, odd N": make_config(in_features=9, num_splits=4, bias=False),
}


def counted_flops(model: torch.nn.Module, in_features: int, batch: int, mode: str) -> int:
    """FLOPs FlopCounterMode sees for one step in ``mode``: a forward, then for train and frozen
    a backward into every parameter and (train only) into x."""
    x = torch.randn(batch, in_features, device="meta", requires_grad=mode == "train")
    with FlopCounterMode(display=False) as counter:
        y = model(x)
        if mode != "infer":
            y.backward(torch.randn_like(y))
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(FLOP_CONFIGS))
def test_analytic_flops_match_flop_counter(name, mode):
    config, batch = FLOP_CONFIGS[name], 3
    # meta tensors: FlopCounterMode counts from shapes, so even vgg_head costs nothing
    spinal = build_impl("reference", config, torch.float32, torch.device("meta"))
    assert counted_flops(spinal, config.in_features, batch, mode) == config.step_flops(batch, mode)
    dense = dense_baseline(config, torch.float32, torch.device("meta"))
    assert counted_flops(dense, config.in_features, batch, mode) == config.dense_baseline_step_flops(batch, mode)
    if mode == "infer":
        assert config.step_flops(batch, mode) == config.forward_flops(batch)
        assert config.dense_baseline_step_flops(batch, mode) == config.dense_baseline_forward_flops(batch)


@pytest.mark.parametrize("name", list(FLOP_CONFIGS))
def test_parameter_counts(name):
    config = FLOP_CONFIGS[name]
    spinal = build_impl("reference", config, torch.float32, torch.device("meta"))
    dense = dense_baseline(config, torch.float32, torch.device("meta"))
    assert sum(p.numel() for p in spinal.parameters()) == config.num_parameters()
    assert sum(p.numel() for p in dense.parameters()) == config.dense_baseline_parameters()


def test_parse_presets():
    chosen = parse_presets(["mnist", "12,4,3,none,3"])
    assert chosen["mnist"] == PRESETS["mnist"]
    custom = chosen["12,4,3,none,3"]
    assert (custom.in_features, custom.layer_width, custom.num_layers, custom.out_features, custom.split_size) == (
        12, 4, 3, None, 4)
    assert set(parse_presets(["all"])) == set(PRESETS)
    with pytest.raises(ValueError, match="unknown preset 'mnsit'"):
        parse_presets(["mnsit"])
    with pytest.raises(ValueError, match="N,w,L,M"):
        parse_presets(["12,4,3"])


def test_cli_writes_schema_json_png_and_table(tmp_path, capsys):
    json_path, png_path = tmp_path / "out" / "results.json", tmp_path / "out" / "results.png"
    impls = ["cpu", "reference", "dense", "cuda"]
    exit_code = main([
        "--quick", "--preset", "12,4,3,none", "--batch", "5", "--backends", *impls, "--min-run-time", "0.001",
        "--threads", "1", "--json", str(json_path), "--plot", str(png_path), "--no-progress",
    ])
    assert exit_code == 0
    document = json.loads(json_path.read_text())
    validate_document(document)
    assert set(document) == set(DOCUMENT_FIELDS)
    runnable = [impl for impl in impls if impl == "dense" or available_backends()[impl]]
    records = document["records"]
    assert sorted((r["impl"], r["mode"]) for r in records) == sorted(
        (impl, mode) for impl in runnable for mode in MODES)
    config = parse_presets(["12,4,3,none"])["12,4,3,none"]
    for record in records:
        assert set(record) == set(RECORD_FIELDS)
        assert record["batch"] == 5 and record["dtype"] == "float32" and record["median_ms"] > 0
        assert record["threads"] == 1 and record["peak_mb"] > 0  # every step allocates its output at least
        assert record["rows_per_s"] == pytest.approx(5 / (record["median_ms"] / 1e3))
        if record["impl"] == "dense":
            flops, params = config.dense_baseline_step_flops(5, record["mode"]), config.dense_baseline_parameters()
        else:
            flops, params = config.step_flops(5, record["mode"]), config.num_parameters()
        assert (record["flops"], record["params"]) == (flops, params)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "Goals:" not in printed  # no goal covers a custom preset
    for impl in impls:
        if impl not in runnable:  # e.g. cuda without a GPU: skipped, and the table says why
            assert f"skipped {impl}" in printed and available_backends()[impl].reason in printed


def test_cli_runs_the_matrix_per_thread_count_and_restores_threads(tmp_path, capsys):
    threads_before = torch.get_num_threads()
    main(["--quick", "--preset", "12,4,3,none", "--batch", "5", "--backends", "reference", "dense", "--mode", "infer",
          "--threads", "1", "2", "--min-run-time", "0.001", "--json", str(tmp_path / "r.json"),
          "--plot", str(tmp_path / "r.png"), "--no-progress"])
    records = json.loads((tmp_path / "r.json").read_text())["records"]
    assert sorted((r["impl"], r["mode"], r["threads"]) for r in records) == [
        ("dense", "infer", 1), ("dense", "infer", 2), ("reference", "infer", 1), ("reference", "infer", 2)]
    assert "2 vs 1 threads" in capsys.readouterr().out
    assert torch.get_num_threads() == threads_before


@pytest.mark.parametrize("impl", ["reference", "dense"])
def test_steps_differentiate_what_each_mode_needs(impl):
    config = make_config()
    model = build_impl(impl, config, torch.float64, torch.device("cpu"))
    parameter_shapes = [p.shape for p in model.parameters()]
    train = make_step(model, config, 4, "train", torch.float64, torch.device("cpu"))()
    assert [g.shape for g in train] == [(4, config.in_features), *parameter_shapes]
    frozen = make_step(model, config, 4, "frozen", torch.float64, torch.device("cpu"))()
    assert [g.shape for g in frozen] == parameter_shapes
    for grad_train, grad_frozen in zip(train[1:], frozen):  # same seed, same inputs: same weight gradients
        torch.testing.assert_close(grad_train, grad_frozen)
    output = make_step(model, config, 4, "infer", torch.float64, torch.device("cpu"))()
    assert output.shape == (4, config.output_features) and not output.requires_grad


def test_peak_bytes_counts_what_a_step_allocates():
    rows, cols = 512, 300
    assert peak_bytes(lambda: torch.ones(rows, cols), torch.device("cpu")) >= rows * cols * 4
    kept = torch.ones(rows, cols)  # allocated before the step: not the step's
    assert peak_bytes(lambda: kept.add_(1), torch.device("cpu")) < rows * cols * 4


def test_peak_memory_of_inference_is_below_training():
    # At this batch the [B, L*w] activations dwarf the parameters: training keeps them for the
    # backward and allocates the gradients, inference frees each layer's temporaries.
    config, batch, cpu = make_config(in_features=64, layer_width=32, num_layers=4, out_features=10), 2048, torch.device("cpu")
    model = build_impl("reference", config, torch.float32, cpu)
    peaks = {mode: peak_bytes(make_step(model, config, batch, mode, torch.float32, cpu), cpu) for mode in MODES}
    assert peaks["infer"] < peaks["frozen"] <= peaks["train"]
    assert peaks["train"] >= batch * config.hidden_features * 4  # at least one [B, L*w] float32 buffer


def _record(impl: str, median_ms: float, batch: int = 64, mode: str = "train", threads: int = 1,
            launch: str = "eager") -> dict:
    flops = 2 * 10**9 if impl == "dense" else 10**9  # the spinal layer does half the dense layer's FLOPs
    return {"preset": "mnist", "batch": batch, "dtype": "float32", "impl": impl, "mode": mode, "threads": threads,
            "launch": launch, "median_ms": median_ms, "rows_per_s": batch * 1e3 / median_ms, "tflops": flops / median_ms / 1e9,
            "flops": flops, "params": 8540, "peak_mb": 0.5, "floor_ms": None}


def _records(*specs: tuple) -> list[Record]:
    return [Record.from_json(_record(*spec)) for spec in specs]


def test_markdown_report_efficiency_speedups_memory_and_caption():
    document = {"device": "Test CPU", "torch": "2.x", "triton": "3.x", "commit": "0123456789abcdef",
                "created": "2026-01-01T00:00:00+00:00",
                "records": [_record("reference", 4.0), _record("cpu", 2.0), _record("dense", 1.0)]}
    text = markdown_report(document)
    # the caption names the device and the software, not the commit
    assert "**Test CPU** (torch 2.x, triton 3.x)" in text and "0123456789ab" not in text
    assert "E = (spinal time / dense time) / (spinal FLOPs / dense FLOPs)" in text
    assert "Dense baselines" not in text  # the equal-width layer needs no list of heads
    assert "| preset | batch | dtype | mode | reference ms | cpu ms | dense ms | E reference | E cpu | cpu vs reference |" in text
    # E = (time / dense time) / (FLOPs / dense FLOPs): cpu (2 / 1) / (1 / 2) = 4, reference (4 / 1) / (1 / 2) = 8
    assert "| mnist | 64 | float32 | train | 4 | 2 | 1 | 8.00 | 4.00 | 2.00x |" in text
    assert "| mnist | 64 | float32 | train | 0.5 | 0.5 | 0.5 |" in text  # peak memory
    assert "| cpu | mnist | float32 | train | 2.00x |" in text  # the speed-up summary


def test_thread_table_compares_thread_counts_of_one_case():
    table = thread_table(_records(("cpu", 3.0, 64, "infer", 1), ("cpu", 2.0, 64, "infer", 2)), markdown=True)
    assert "| preset | batch | dtype | mode | impl | 1 threads ms | 2 threads ms | 2 vs 1 threads |" in table
    assert "| mnist | 64 | float32 | infer | cpu | 3 | 2 | 1.50x |" in table
    assert thread_table(_records(("cpu", 3.0))) == ""


def test_graphed_steps_compare_with_graphed_baselines():
    # cuda eager 2 ms vs dense eager 1 ms; replayed from graphs 0.5 ms vs dense's 0.25 ms
    records = _records(("cuda", 2.0), ("dense", 1.0), ("reference", 8.0), ("cuda", 0.5, 64, "train", 1, "graph"),
                       ("dense", 0.25, 64, "train", 1, "graph"), ("reference", 1.0, 64, "train", 1, "graph"))
    table = latency_table(records, markdown=True)
    assert "| preset | batch | dtype | mode | launch | cuda ms | dense ms | reference ms |" in table
    # E = (2 / 1) / (1 / 2) = 4 eager; (0.5 / 0.25) / (1 / 2) = 4 graphed, not 0.5 / 1 against the eager dense
    assert "| mnist | 64 | float32 | train | eager | 2 | 1 | 8 | 4.00 | 16.00 | 4.00x |" in table
    assert "| mnist | 64 | float32 | train | graph | 0.5 | 0.25 | 1 | 4.00 | 8.00 | 2.00x |" in table
    launches = launch_table(records, markdown=True)
    assert "| mnist | 64 | float32 | train | cuda | 2 | 0.5 | 4.00x |" in launches
    assert "| mnist | 64 | float32 | train | dense | 1 | 0.25 | 4.00x |" in launches
    assert launch_table(_records(("cuda", 2.0))) == ""
    assert len(efficiency_summary(records).splitlines()) == 2 + 4  # header, rule, 2 impls x 2 launches


def test_floor_is_the_slower_of_compute_and_bytes_plus_dependent_launches(monkeypatch):
    monkeypatch.setattr(roofline, "peak_gemm_tflops", lambda dtype, device, min_run_time: 500.0)
    sticks = roofline.Yardsticks(torch.device("cpu"), 0.1, copy_bandwidth=2e12, launch_seconds=4e-6)
    # compute-bound: 1e12 FLOPs at 500 TFLOP/s = 2 ms (1 GB at 2 TB/s = 0.5 ms), + 2 launches in training
    assert sticks.floor_seconds(10**12, 10**9, "train", torch.bfloat16) == pytest.approx(2e-3 + 8e-6)
    # bandwidth-bound: 4 GB at 2 TB/s = 2 ms (1 GFLOP is 2 us), + 1 launch for inference
    assert sticks.floor_seconds(10**9, 4 * 10**9, "infer", torch.bfloat16) == pytest.approx(2e-3 + 4e-6)


def test_floor_table_gives_each_time_as_a_multiple_of_its_floor():
    records = _records(("cuda", 2.0), ("dense", 1.0))
    assert floor_table(records) == ""  # a CPU run has no floors
    records[0].floor_ms, records[1].floor_ms = 0.5, 0.25
    table = floor_table(records, markdown=True)
    assert "| preset | batch | dtype | mode | spinal floor ms | cuda x floor | dense x floor |" in table
    assert "| mnist | 64 | float32 | train | 0.5 | 4.0x | 4.0x |" in table
    document = {"device": "d", "torch": "t", "triton": "t", "commit": "c", "created": "x",
                "records": [record.to_json() for record in records]}
    validate_document(document)
    assert [Record.from_json(data).floor_ms for data in document["records"]] == [0.5, 0.25]


def test_cuda_graphs_need_a_cuda_device(capsys):
    with pytest.raises(SystemExit):
        main(["--cuda-graphs", "--quick"])
    assert "--cuda-graphs needs --device cuda" in capsys.readouterr().err


def test_goal_lines_report_covered_cases_only():
    records = _records(("reference", 4.0), ("cpu", 1.9), ("dense", 1.0), ("cpu", 0.5, 64, "infer"),
                       ("dense", 1.0, 64, "infer"), ("reference", 1.0, 1024), ("cpu", 0.1, 1024), ("dense", 1.0, 1024))
    # cpu train batch 64: E = (1.9 / 1) / (1 / 2) = 3.8, 4 / 1.9 = 2.11x over reference; infer E = 1.0;
    # batch 1024 is no goal's case; infer has no reference record, so no speed-up line
    assert goal_lines(records, "cpu") == [
        "cpu E, train, mnist float32 batch 64, 1 thread(s): 3.80 (goal <= 1.15: MISSED)",
        "cpu E, infer, mnist float32 batch 64, 1 thread(s): 1.00 (goal <= 1.15: met)",
        "cpu speed-up over reference, train, mnist float32 batch 64, 1 thread(s): 2.11x (goal >= 2x: met)",
    ]
    assert goal_lines(records, "cuda") == []  # every goal so far is a CPU goal
    gpu_goal = Goal(SPEEDUP_OVER_REFERENCE, 3.0, "cpu", ("mnist",), batches=(1024,), modes=("train",), device="cuda")
    assert goal_lines(records, "cuda", [gpu_goal]) == [
        "cpu speed-up over reference, train, mnist float32 batch 1024, 1 thread(s): 10.00x (goal >= 3x: met)"]
    assert Goal(E, 1.0, "cpu", ("mnist",), (64,), ("train",)).met(1.0)


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("commit"),
    lambda d: d.update(extra=1),
    lambda d: d["records"][0].pop("tflops"),
    lambda d: d["records"][0].pop("peak_mb"),
    lambda d: d["records"][0].update(batch="64"),
    lambda d: d["records"][0].update(threads=1.0),
    lambda d: d["records"][0].update(mode="forward_backward"),
    lambda d: d["records"][0].update(launch="graphed"),
    lambda d: d["records"][0].pop("launch"),
    lambda d: d["records"][0].update(floor_ms="1"),
])
def test_validate_document_rejects_other_shapes(mutate):
    document = {"device": "d", "torch": "t", "triton": "t", "commit": "c", "created": "x",
                "records": [_record("reference", 1.0), {**_record("cpu", 1.0), "peak_mb": None}]}
    validate_document(document)  # peak_mb may be null: not measured
    mutate(document)
    with pytest.raises(ValueError):
        validate_document(document)


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda path: path.name)
def test_committed_results_have_the_current_shape(path):
    records = [Record.from_json(data) for data in read_json(path)["records"]]
    assert records and {record.mode for record in records} <= set(MODES)


class FakeClock:
    """time.perf_counter for the timing module: advances only when a step says it ran."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_clock(monkeypatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    return clock


def test_alternating_medians_time_each_step_in_alternating_blocks(fake_clock):
    calls: list[str] = []

    def step(name: str, seconds: float):
        def run() -> None:
            calls.append(name)
            fake_clock.now += seconds
        return run

    steps = {"fast": step("fast", 1e-4), "slow": step("slow", 3e-4), "slowest": step("slowest", 0.5)}
    medians, failures = timing.alternating_medians(steps, torch.device("cpu"), min_run_time=0.3)
    assert failures == {}
    assert medians == pytest.approx({"fast": 1e-4, "slow": 3e-4, "slowest": 0.5})
    timed = calls[len(steps):]  # after the one sizing call of each
    # Each step timed for min_run_time, and the slowest for MIN_BLOCKS blocks of one call.
    assert timed.count("fast") * 1e-4 >= 0.3 and timed.count("slow") * 3e-4 >= 0.3
    assert timed.count("slowest") == timing.MIN_BLOCKS
    # Blocks alternate, the order reversing every turn (F S X, X S F, ...): the other steps run
    # between every other block of the slowest one, not all before or after it.
    for other in ("fast", "slow"):
        before = [timed[:index].count(other) for index, name in enumerate(timed) if name == "slowest"]
        assert all(later > earlier for earlier, later in zip(before, before[2:]))
        assert before[-1] < timed.count(other)


def test_alternating_medians_report_a_failing_step_and_time_the_others(fake_clock):
    runs = {"ok": 0, "fails": 0}

    def ok() -> None:
        runs["ok"] += 1
        fake_clock.now += 1e-3

    def fails_later() -> None:
        runs["fails"] += 1
        fake_clock.now += 1e-3
        if runs["fails"] > 3:
            raise RuntimeError("backend failed\nsecond line")

    medians, failures = timing.alternating_medians({"ok": ok, "fails": fails_later}, torch.device("cpu"), 0.1)
    assert failures == {"fails": "backend failed"}
    assert medians == pytest.approx({"ok": 1e-3})
    with pytest.raises(RuntimeError, match="backend failed"):
        timing.median_seconds(fails_later, torch.device("cpu"), 0.1, warmup_calls=0)


# ---- the authors' dense heads (--baseline authors) ---------------------------------------------

# Hand-computed: weights + biases of each Linear, and 2 FLOPs per multiply-add of a forward row.
AUTHORS_COUNTS = {
    "mnist": (320 * 50 + 50 + 50 * 10 + 10, 2 * (320 * 50 + 50 * 10)),
    "vgg5": (256 * 512 + 512 + 512 * 10 + 10, 2 * (256 * 512 + 512 * 10)),
    "cifar_vgg": (512 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 10 + 10, 2 * (512 * 4096 + 4096 * 4096 + 4096 * 10)),
    "cnn_cifar": (4096 * 1024 + 1024 + 1024 * 512 + 512 + 512 * 10 + 10, 2 * (4096 * 1024 + 1024 * 512 + 512 * 10)),
    "resnet_head": (2048 * 1000 + 1000, 2 * 2048 * 1000),
    "vgg_head": (25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000,
                 2 * (25088 * 4096 + 4096 * 4096 + 4096 * 1000)),
}


def test_authors_heads_cover_every_preset_with_its_shape():
    assert set(AUTHORS_HEADS) == set(AUTHORS_COUNTS) == set(PRESETS)
    for preset, head in AUTHORS_HEADS.items():
        config = PRESETS[preset]
        assert (head.widths[0], head.widths[-1]) == (config.in_features, config.out_features)
        assert authors_head(preset, config) is head
    assert AUTHORS_HEADS["mnist"].num_parameters() == 16_560
    assert AUTHORS_HEADS["cifar_vgg"].num_parameters() == 18_923_530  # VGG's ~18.9 M-parameter classifier


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", list(AUTHORS_COUNTS))
def test_authors_head_parameters_and_flops(preset, mode):
    params, flops_per_row = AUTHORS_COUNTS[preset]
    config, batch = PRESETS[preset], 3
    assert cost(AUTHORS_IMPL, config, batch, "infer", preset) == (batch * flops_per_row, params)
    # the module that is timed has those parameters, and FlopCounterMode sees the analytic FLOPs
    model = build_impl(AUTHORS_IMPL, config, torch.float32, torch.device("meta"), preset)
    assert sum(p.numel() for p in model.parameters()) == params
    assert counted_flops(model, config.in_features, batch, mode) == cost(AUTHORS_IMPL, config, batch, mode, preset)[0]


def test_dense_head_rejects_too_few_widths_and_describes_itself():
    with pytest.raises(ValueError, match="two positive widths"):
        DenseHead((320,))
    assert DenseHead((320, 50, 10)).describe() == "Linear(320, 50) -> phi -> Linear(50, 10)"


def test_custom_presets_fall_back_to_equal_width():
    custom = parse_presets(["12,4,3,10"])["12,4,3,10"]
    assert authors_head("12,4,3,10", custom) is None
    assert baseline_impl("authors", "12,4,3,10", custom) == "dense"
    assert baseline_impl("authors", "mnist", PRESETS["mnist"]) == AUTHORS_IMPL
    assert baseline_impl("equal-width", "mnist", PRESETS["mnist"]) == "dense"
    # a shape that is not the preset's (e.g. another M) has no authors' head either
    assert authors_head("mnist", make_config(in_features=320, out_features=7)) is None
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_impl("paper", "mnist", PRESETS["mnist"])
    with pytest.raises(ValueError, match="no dense head from the paper"):
        cost(AUTHORS_IMPL, custom, 3, "infer", "12,4,3,10")


def test_cli_authors_baseline_end_to_end(tmp_path, capsys):
    json_path = tmp_path / "r.json"
    main(["--quick", "--preset", "mnist", "12,4,3,10", "--baseline", "authors", "--batch", "5",
          "--backends", "reference", "dense", "--mode", "train", "infer", "--threads", "1", "--min-run-time", "0.001",
          "--json", str(json_path), "--plot", str(tmp_path / "r.png"), "--no-progress"])
    document = read_json(json_path)  # the schema of every results file, unchanged
    records = {(r["preset"], r["impl"], r["mode"]): r for r in document["records"]}
    assert sorted(records) == sorted((preset, impl, mode) for preset, impl in [
        ("mnist", "reference"), ("mnist", AUTHORS_IMPL), ("12,4,3,10", "reference"), ("12,4,3,10", "dense")]
        for mode in ("train", "infer"))
    authors = records[("mnist", AUTHORS_IMPL, "infer")]
    assert (authors["params"], authors["flops"]) == (16_560, 5 * 33_000)
    assert records[("mnist", AUTHORS_IMPL, "train")]["flops"] == 3 * 5 * 33_000
    custom = parse_presets(["12,4,3,10"])["12,4,3,10"]
    assert records[("12,4,3,10", "dense", "infer")]["params"] == custom.dense_baseline_parameters()
    printed = capsys.readouterr().out
    assert "dense baseline (authors):" in printed
    assert "12,4,3,10: no dense head from the paper for this shape" in printed
    assert "mnist: Linear(320, 50) -> phi -> Linear(50, 10) (16,560 parameters)" in printed
    assert "params saved" in printed and "48%" in printed  # 1 - 8,538 / 16,560 parameters


def test_cli_help_names_the_baseline_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--baseline {equal-width,authors}" in capsys.readouterr().out


def _authors_document() -> dict:
    # the authors' head does 4x the spinal layer's FLOPs and takes as long as the cpu backend
    records = [_record("reference", 4.0), _record("cpu", 2.0),
               {**_record(AUTHORS_IMPL, 2.0), "flops": 4 * 10**9, "params": 16_560}]
    return {"device": "Test CPU", "torch": "2.x", "triton": "3.x", "commit": "c", "created": "x", "records": records}


def test_efficiency_uses_the_chosen_baseline():
    records = [Record.from_json(data) for data in _authors_document()["records"]]
    case = {r.impl: r for r in records}
    assert baseline_record(case).impl == AUTHORS_IMPL
    # E = (2 / 2) / (1e9 / 4e9) = 4: the authors' head's FLOPs, not the equal-width layer's
    assert efficiency(case["cpu"], baseline_record(case)) == pytest.approx(4.0)
    equal_width = Record.from_json(_record("dense", 1.0))  # 2e9 FLOPs: E would be (2 / 1) / (1 / 2) = 4 too
    equal_width.median_ms = 0.5  # -> 8 against the equal-width layer
    assert baseline_record({**case, "dense": equal_width}).impl == AUTHORS_IMPL
    assert baseline_record({"cpu": case["cpu"], "dense": equal_width}) is equal_width
    assert baseline_record({"cpu": case["cpu"]}) is None
    table = latency_table(records, markdown=True)
    assert ("| preset | batch | dtype | mode | reference ms | cpu ms | authors_dense ms | E reference | E cpu | "
            "cpu vs reference | reference vs authors_dense | cpu vs authors_dense |") in table
    # E reference = (4 / 2) / (1 / 4) = 8; cpu 2x faster than reference, as fast as the authors' head
    assert "| mnist | 64 | float32 | train | 4 | 2 | 2 | 8.00 | 4.00 | 2.00x | 0.50x | 1.00x |" in table


def test_markdown_report_names_the_authors_heads_and_savings():
    text = markdown_report(_authors_document())
    assert "E = (spinal time / authors_dense time) / (spinal FLOPs / authors_dense FLOPs)" in text
    assert "- mnist: Linear(320, 50) -> phi -> Linear(50, 10), 16,560 parameters" in text
    # no infer records in this document: the model table needs them
    infer = [Record.from_json({**_record("cpu", 1.0, mode="infer"), "params": 8_538}),
             Record.from_json({**_record(AUTHORS_IMPL, 1.0, mode="infer"), "flops": 4 * 10**9, "params": 16_560})]
    table = model_table(infer, markdown=True)
    assert ("| preset | baseline | spinal params | authors_dense params | authors_dense/spinal | spinal FLOP/row | "
            "authors_dense FLOP/row | params saved | FLOPs saved |") in table
    assert "| mnist | 320-50-10 | 8.54k | 16.6k | 1.9x | 15.6M | 62.5M | 48% | 75% |" in table


def test_host_profile_splits_one_call_into_its_layers():
    # scripts/host_profile.py runs on a CPU and reports the module call at B = 1 split into Python,
    # dispatcher and op, and one training step into its parts, beside the dense head's (a smoke run:
    # the script must not rot).
    if not available_backends()["cpu"]:
        pytest.skip("the cpu backend is not built here")
    script = Path(__file__).resolve().parents[1] / "scripts" / "host_profile.py"
    result = subprocess.run([sys.executable, str(script), "--device", "cpu", "--preset", "mnist", "--batch", "1",
                             "--split-only", "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (summary,) = [line for line in result.stdout.splitlines() if line.strip().startswith("layer(x) = Python")]
    assert "(cpu backend, cpu, torch.float32, no_grad)" in result.stdout
    pattern = r"Python -?[\d.]+ \+ dispatcher [\d.]+ \+ op -?[\d.]+ us; the dense head [\d.]+ us"
    assert re.search(pattern, summary), summary
    (step,) = [line for line in result.stdout.splitlines() if line.strip().startswith("train step = autograd.grad")]
    pattern = (r"autograd.grad [\d.]+ \+ module Python -?[\d.]+ \+ ops [\d.]+ \+ node and the rest -?[\d.]+ us; "
               r"the dense head's [\d.]+ us")
    assert re.search(pattern, step), step

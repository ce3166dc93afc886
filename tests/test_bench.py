"""The benchmark tool: analytic FLOPs against FlopCounterMode, the CLI's JSON/PNG, the report."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from contract import make_config
from spinal_ops.bench import PRESETS, main
from spinal_ops.bench.presets import parse_presets
from spinal_ops.bench.report import cpu_goal_lines, markdown_report
from spinal_ops.bench.results import DOCUMENT_FIELDS, RECORD_FIELDS, Record, validate_document
from spinal_ops.bench.workloads import build_impl, dense_baseline
from spinal_ops.dispatch import available_backends

FLOP_CONFIGS = {
    **PRESETS,
    "M=None": make_config(out_features=None),
    "wrap-around": make_config(in_features=7, split_size=3, num_layers=4),
    "L=1": make_config(num_layers=1),
    "no bias, odd N": make_config(in_features=9, num_splits=4, bias=False),
}


def counted_flops(model: torch.nn.Module, in_features: int, batch: int, backward: bool) -> int:
    """FLOPs FlopCounterMode sees for one forward (and backward w.r.t. x and every parameter)."""
    x = torch.randn(batch, in_features, device="meta", requires_grad=backward)
    with FlopCounterMode(display=False) as counter:
        y = model(x)
        if backward:
            y.backward(torch.randn_like(y))
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(FLOP_CONFIGS))
def test_analytic_flops_match_flop_counter(name):
    config, batch = FLOP_CONFIGS[name], 3
    # meta tensors: FlopCounterMode counts from shapes, so even vgg_head costs nothing
    spinal = build_impl("reference", config, torch.float32, torch.device("meta"))
    assert counted_flops(spinal, config.in_features, batch, backward=False) == config.forward_flops(batch)
    assert counted_flops(spinal, config.in_features, batch, backward=True) == config.forward_backward_flops(batch)
    dense = dense_baseline(config, torch.float32, torch.device("meta"))
    assert counted_flops(dense, config.in_features, batch, backward=False) == config.dense_baseline_forward_flops(batch)
    assert (counted_flops(dense, config.in_features, batch, backward=True)
            == config.dense_baseline_forward_backward_flops(batch))
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
        "--json", str(json_path), "--plot", str(png_path), "--no-progress",
    ])
    assert exit_code == 0
    document = json.loads(json_path.read_text())
    validate_document(document)
    assert set(document) == set(DOCUMENT_FIELDS)
    runnable = [impl for impl in impls if impl == "dense" or available_backends()[impl]]
    records = document["records"]
    assert sorted((r["impl"], r["pass"]) for r in records) == sorted(
        (impl, p) for impl in runnable for p in ("forward", "forward_backward"))
    config = parse_presets(["12,4,3,none"])["12,4,3,none"]
    for record in records:
        assert set(record) == set(RECORD_FIELDS)
        assert record["batch"] == 5 and record["dtype"] == "float32" and record["median_ms"] > 0
        assert record["rows_per_s"] == pytest.approx(5 / (record["median_ms"] / 1e3))
        if record["impl"] == "dense":
            assert record["params"] == config.dense_baseline_parameters()
        else:
            flops = config.forward_flops(5) if record["pass"] == "forward" else config.forward_backward_flops(5)
            assert (record["flops"], record["params"]) == (flops, config.num_parameters())
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    for impl in impls:
        if impl not in runnable:  # e.g. cuda without a GPU: skipped, and the table says why
            assert f"skipped {impl}" in printed and available_backends()[impl].reason in printed


def _record(impl: str, median_ms: float, batch: int = 64) -> dict:
    return {"preset": "mnist", "batch": batch, "dtype": "float32", "impl": impl, "pass": "forward_backward",
            "median_ms": median_ms, "rows_per_s": 64e3 / median_ms, "tflops": 1e-3, "flops": 10**9, "params": 8540}


def test_markdown_report_ratios_and_caption():
    document = {"device": "Test CPU", "torch": "2.x", "triton": "3.x", "commit": "0123456789abcdef",
                "created": "2026-01-01T00:00:00+00:00",
                "records": [_record("reference", 4.0), _record("cpu", 2.0), _record("dense", 1.0)]}
    text = markdown_report(document)
    assert "Test CPU" in text and "`0123456789ab`" in text
    assert "| reference ms | cpu ms | dense ms | fastest spinal | vs reference | vs dense |" in text
    # cpu is the fastest spinal implementation: 4 ms / 2 ms over reference, 1 ms / 2 ms over dense
    assert "| mnist | 64 | float32 | forward_backward | 4 | 2 | 1 | cpu | 2.00x | 0.50x |" in text
    assert "| cpu | mnist | float32 | 2.00x |" in text  # the speedup summary


def test_cpu_goal_lines_check_issue_3_thresholds():
    records = [Record.from_json(_record(impl, ms, batch)) for impl, ms, batch in [
        ("reference", 4.0, 64), ("cpu", 3.2, 64), ("reference", 10.0, 4096), ("cpu", 10.4, 4096)]]
    lines = cpu_goal_lines(records).splitlines()
    assert lines == [
        "cpu vs reference, forward+backward, mnist float32 batch 64: 1.25x (goal >= 1.3x: NOT met)",
        "cpu vs reference, forward+backward, mnist float32 batch 4096: 0.96x (goal >= 0.95x: met)",
    ]


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("commit"),
    lambda d: d.update(extra=1),
    lambda d: d["records"][0].pop("tflops"),
    lambda d: d["records"][0].update(batch="64"),
])
def test_validate_document_rejects_other_shapes(mutate):
    document = {"device": "d", "torch": "t", "triton": "t", "commit": "c", "created": "x",
                "records": [_record("reference", 1.0)]}
    validate_document(document)
    mutate(document)
    with pytest.raises(ValueError):
        validate_document(document)

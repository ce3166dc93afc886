"""spinal_ops/dispatch.py: backend names, ``auto`` selection, available_backends() and
BackendUnavailableError (docs/contract.md §3)."""
import pytest
import torch
from contract import make_config

import spinal_ops
from spinal_ops import dispatch
from spinal_ops.support import Support
from spinal_ops.backends.triton import settings as triton_settings
from spinal_ops import BackendUnavailableError, SpinalLinear
from spinal_ops.dispatch import BACKEND_NAMES, get_backend, select_backend

CPU = torch.device("cpu")


def test_backend_names():
    assert BACKEND_NAMES == ("auto", "cuda", "triton", "cpu", "reference")
    for name in BACKEND_NAMES[1:]:
        assert get_backend(name).name == name
    with pytest.raises(ValueError, match="'auto' is a selection rule"):
        get_backend("auto")


@pytest.mark.parametrize("call", [
    lambda: get_backend("fast"),
    lambda: select_backend("fast", make_config(), torch.float32, CPU),
    lambda: SpinalLinear(7, 3, layer_width=2, num_layers=2, backend="fast"),
], ids=["get_backend", "select_backend", "module"])
def test_unknown_backend(call):
    with pytest.raises(ValueError, match="unknown backend 'fast'; expected one of auto, cuda, triton, cpu, reference"):
        call()


def test_available_backends_reports_reasons():
    report = spinal_ops.available_backends()
    assert set(report) == {"cuda", "triton", "cpu", "reference"}
    assert report["reference"].ok
    for name, support in report.items():
        assert support.ok or support.reason, f"{name} unavailable without a reason"
    report.clear()  # a copy: the registry's answers stay
    assert spinal_ops.available_backends()["reference"].ok


def test_auto_picks_cpu_for_cpu_float32():
    config = make_config()
    assert select_backend("auto", config, torch.float32, CPU).name == "cpu"
    assert spinal_ops.available_backends()["cpu"].ok


def test_auto_falls_back_to_the_reference_for_a_dtype_the_cpu_op_lacks():
    assert select_backend("auto", make_config(), torch.float64, CPU).name == "cpu"
    assert select_backend("auto", make_config(), torch.float16, CPU).name == "reference"


def test_auto_uses_triton_only_for_cuda_tensors():
    assert not get_backend("triton").auto_eligible(CPU)
    assert select_backend("auto", make_config(), torch.float32, CPU).name != "triton"


def test_requested_backend_that_cannot_run_names_its_reason():
    unavailable = [name for name, s in spinal_ops.available_backends().items() if not s.ok]
    assert unavailable, "on a machine without a GPU at least the cuda backend is unavailable"
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3, backend=unavailable[0])
    with pytest.raises(BackendUnavailableError, match=unavailable[0]):
        layer(torch.randn(2, 7))


def test_requested_backend_that_does_not_support_the_call_names_its_reason():
    # The cpu op runs on CPU tensors in float32, float64 and bfloat16 only.
    with pytest.raises(BackendUnavailableError, match=r"backend 'cpu' cannot run this call \(torch.float16, cpu\): "
                                                      r"dtype torch.float16 not supported"):
        select_backend("cpu", make_config(), torch.float16, CPU)
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_selection_is_remembered_and_a_refusal_is_not(monkeypatch):
    """A call's backend is selected once per (name, config, dtype, device) and then looked up; a
    backend that cannot run the call raises every time it is asked, not only the first."""
    cpu = get_backend("cpu")
    asked = []
    supports = cpu.supports
    monkeypatch.setattr(cpu, "supports", lambda *args: asked.append(args) or supports(*args))
    config = make_config(in_features=13, layer_width=4)  # a shape no other test selects for
    assert select_backend("auto", config, torch.float32, CPU).name == "cpu"
    assert len(asked) == 1
    assert select_backend("auto", make_config(in_features=13, layer_width=4), torch.float32, CPU).name == "cpu"
    assert len(asked) == 1, "an equal config, dtype and device must not be selected again"
    assert select_backend("auto", config, torch.float16, CPU).name == "reference"
    for _ in range(2):
        with pytest.raises(BackendUnavailableError, match="dtype torch.float16 not supported"):
            select_backend("cpu", make_config(), torch.float16, CPU)


@pytest.mark.skipif(not spinal_ops.available_backends()["triton"],
                    reason=f"triton backend unavailable: {spinal_ops.available_backends()['triton'].reason}")
def test_requested_triton_too_wide_names_the_register_budget(monkeypatch):
    monkeypatch.setattr(triton_settings, "TILED", False)  # the one-block kernels' limit
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(BackendUnavailableError, match="register budget"):
        select_backend("triton", make_config(layer_width=200), torch.float32, device)


def test_auto_keeps_training_stages_off_gpu_backends_until_measured(monkeypatch):
    """On CUDA tensors auto sends a training call with dropout or batch norm to the reference
    (contract §3) and the same layer without the stages to the GPU backend; the backend's own name
    still reaches it. (triton stands for the GPU backends: its checks need no device.)"""
    monkeypatch.setitem(dispatch._AVAILABILITY, "cuda", Support.no("not under test"))
    monkeypatch.setitem(dispatch._AVAILABILITY, "triton", Support.yes())
    device = torch.device("cuda")
    assert dispatch._select("auto", make_config(), torch.float32, device).name == "triton"
    dropout = make_config(dropout=0.5)
    assert dispatch._select("auto", dropout, torch.float32, device).name == "reference"
    assert dispatch._select("triton", dropout, torch.float32, device).name == "triton"
    assert dispatch._select("auto", make_config(norm="batch"), torch.float32, device).name == "reference"
    assert not get_backend("cuda").auto_runs_training_stages

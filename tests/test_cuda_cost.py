"""The cuda backend's path choice (spinal_ops/backends/cuda_cost.py), checked on the CPU with
the model's constants for an H100 and an A100: no GPU needed."""
import json
from pathlib import Path

import pytest
import torch

from spinal_ops.backends.cuda_cost import GPU_MODELS, choose_path, native_seconds, hoisted_seconds, model_for
from spinal_ops.bench.presets import PRESETS

TILE_KERNEL_MAX_WIDTH = 256
MODELS = [pytest.param(GPU_MODELS[name], id=name) for name in ("h100", "h200", "a100")]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_small_narrow_layers_take_the_native_kernels(model, training):
    # 1-3 launches against the hoisted chain's 20-90 ATen calls: at small batch launches decide
    # (measured on an H100: the native kernels 2.3x to 5x faster at batch 64).
    for preset in ("mnist", "vgg5"):
        choice = choose_path(PRESETS[preset], 64, torch.bfloat16, model, training, TILE_KERNEL_MAX_WIDTH)
        assert choice.path == "native", (preset, choice.reason)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("preset", ["mnist", "vgg5", "cnn_cifar", "resnet_head"])
def test_large_batches_take_the_hoisted_chain(model, preset):
    # Measured on an H100: at batch 65536 the native kernels ran these 1.4x to 27x slower than cuBLAS.
    choice = choose_path(PRESETS[preset], 65536, torch.bfloat16, model, True, TILE_KERNEL_MAX_WIDTH)
    assert choice.path == "hoisted", choice.reason


@pytest.mark.parametrize("model", MODELS)
def test_layers_past_the_tile_limit_always_take_the_hoisted_chain(model):
    for batch in (1, 64, 65536):
        choice = choose_path(PRESETS["cifar_vgg"], batch, torch.float32, model, False, TILE_KERNEL_MAX_WIDTH)
        assert choice.path == "hoisted" and "w=512 > 256" in choice.reason


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_choice_switches_once_as_the_batch_grows(model, dtype):
    # Both predictions grow with the batch and the hoisted chain grows slower: one crossover at most.
    for preset in ("mnist", "vgg5", "resnet_head"):
        config = PRESETS[preset]
        batches = [2**e for e in range(18)]
        native = [native_seconds(config, b, dtype, model, True) for b in batches]
        hoisted = [hoisted_seconds(config, b, dtype, model, True) for b in batches]
        assert native == sorted(native) and hoisted == sorted(hoisted)
        paths = [choose_path(config, b, dtype, model, True, TILE_KERNEL_MAX_WIDTH).path for b in batches]
        assert paths == sorted(paths, key=("native", "hoisted").index), f"{preset}: {paths}"  # no switch back


@pytest.mark.parametrize("model", MODELS)
def test_narrow_kernels_keep_narrow_inference_native_at_every_batch(model):
    # One launch of the narrow forward kernel, bound by reading x, against the hoisted chain's ~24 calls.
    config = PRESETS["mnist"]
    for batch in (1, 64, 1024, 65536):
        assert choose_path(config, batch, torch.bfloat16, model, False, TILE_KERNEL_MAX_WIDTH, narrow=True).path == "native"
        narrow = native_seconds(config, batch, torch.bfloat16, model, False, narrow=True)
        assert narrow <= native_seconds(config, batch, torch.bfloat16, model, False)


def test_reason_names_the_path_and_the_predictions():
    choice = choose_path(PRESETS["mnist"], 64, torch.bfloat16, GPU_MODELS["h100"], True, TILE_KERNEL_MAX_WIDTH)
    assert choice.reason.startswith("native kernels: predicted") and "H100 model" in choice.reason


def test_device_names_map_to_models():
    assert model_for("NVIDIA H100 80GB HBM3", 132) is GPU_MODELS["h100"]
    assert model_for("NVIDIA H200", 132) is GPU_MODELS["h200"]
    assert model_for("NVIDIA A100-SXM4-40GB", 108) is GPU_MODELS["a100"]
    other = model_for("NVIDIA L4", 58)
    assert other.sm_count == 58 and other.gemm_flops == GPU_MODELS["a100"].gemm_flops
    assert other.half_row_tile == 64


def test_t4_model_counts_the_32_row_half_tiles():
    # Before sm_80 the op runs fp16 in 32-row tiles (csrc/cuda/launch.cuh): twice the CTAs, so twice
    # the waves once the grid fills the GPU.
    t4 = model_for("Tesla T4", 40, (7, 5))
    assert t4.half_row_tile == 32
    config = PRESETS["vgg5"]
    sm80 = model_for("Tesla T4", 40, (8, 0))
    batch = 64 * 40 * 4  # four waves of 64-row tiles on 40 SMs
    assert native_seconds(config, batch, torch.float16, t4, False) > native_seconds(config, batch, torch.float16, sm80, False)


H100_TIMINGS = Path(__file__).resolve().parents[1] / "benchmarks/results/cuda-paths/nvidia-h100-80gb-hbm3.json"


H200_TIMINGS = H100_TIMINGS.with_name("nvidia-h200.json")
H200_WIDE_TIMINGS = H100_TIMINGS.with_name("nvidia-h200-wide.json")


@pytest.mark.parametrize("timings, model, narrow_kernels", [
    # every preset, bf16 and fp32, batch 1 to 65536, train and infer; timed before the narrow kernels
    (H100_TIMINGS, "h100", False),
    # mnist (which runs the narrow kernels) and vgg5, the same batches, dtypes and modes
    (H200_TIMINGS, "h200", True),
    # cifar_vgg, cnn_cifar, resnet_head, vgg_head (w = 256, 512), the same batches, dtypes and modes
    (H200_WIDE_TIMINGS, "h200", True),
], ids=["h100", "h200", "h200-wide"])
def test_model_picks_the_measured_faster_path(timings, model, narrow_kernels, monkeypatch):
    # Both paths timed by scripts/cuda_paths.py on the GPU: the model's pick may cost at most 10%
    # over the faster path.
    from spinal_ops.backends import cuda

    monkeypatch.setattr(cuda, "NARROW_LIMITS", (16, 16) if narrow_kernels else (0, 0))  # the op's limits
    document = json.loads(timings.read_text())
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    for record in document["records"]:
        config = PRESETS[record["preset"]]
        choice = choose_path(config, record["batch"], dtypes[record["dtype"]], GPU_MODELS[model],
                             record["mode"] == "train", TILE_KERNEL_MAX_WIDTH, cuda.narrow_kernels_fit(config))
        measured = {"native": record["native_ms"], "hoisted": record["hoisted_ms"]}
        fastest = min(t for t in measured.values() if t == t)  # native is NaN past the tile kernels' width
        assert measured[choice.path] <= 1.1 * fastest, (record, choice.reason)


def test_narrow_kernels_fit_follows_the_op_limits(monkeypatch):
    # The limits come from the op (cuda_narrow_limits(): w <= 16, M <= 16); no GPU needed here.
    from spinal_ops.backends import cuda
    from spinal_ops.config import SpinalConfig

    monkeypatch.setattr(cuda, "NARROW_LIMITS", (16, 16))
    assert cuda.narrow_kernels_fit(PRESETS["mnist"])  # w = 8, M = 10
    assert not cuda.narrow_kernels_fit(PRESETS["vgg5"])  # w = 128
    assert cuda.narrow_kernels_fit(SpinalConfig.build(40, None, layer_width=16, num_layers=3))  # M = None: H is out
    assert not cuda.narrow_kernels_fit(SpinalConfig.build(40, 17, layer_width=16, num_layers=3))
    monkeypatch.setattr(cuda, "NARROW_LIMITS", (0, 0))  # no kernels built: nothing fits
    assert not cuda.narrow_kernels_fit(PRESETS["mnist"])


def test_the_backend_remembers_each_calls_path(monkeypatch):
    # CudaBackend.forward_op runs the cost model once per (config, batch, dtype, device, training,
    # forced path, TF32) and then reuses its pick; a forced path still wins. No GPU: a model
    # H200 as device 0 and meta tensors.
    from spinal_ops.backends import cuda

    monkeypatch.setattr(cuda, "TILE_KERNEL_MAX_WIDTH", TILE_KERNEL_MAX_WIDTH)
    monkeypatch.setattr(cuda, "DEVICES", {0: cuda.CudaDevice((9, 0), GPU_MODELS["h200"], {})})
    monkeypatch.setattr(cuda, "_device_index", lambda device: 0)
    monkeypatch.setattr(cuda, "_FORWARD_OPS", {})
    asked = []
    model_pick = cuda.cuda_path
    monkeypatch.setattr(cuda, "cuda_path", lambda *args: asked.append(args) or model_pick(*args))
    backend, config, ops = cuda.CudaBackend(), PRESETS["mnist"], torch.ops.spinal_ops
    picks = set()
    for batch in (64, 65536):
        x = torch.empty(batch, config.in_features, dtype=torch.bfloat16, device="meta")
        for training in (True, False):
            expected = getattr(ops, model_pick(config, batch, x.dtype, x.device, training).path + "_forward").default
            for _ in range(3):
                assert backend.forward_op(config, x, training) is expected
            picks.add(expected)
    assert len(asked) == 4  # the model once per case
    assert picks == {ops.native_forward.default, ops.hoisted_forward.default}
    for path in cuda.PATHS:
        with cuda.forced_path(path):
            assert backend.forward_op(config, x, True) is getattr(ops, path + "_forward").default

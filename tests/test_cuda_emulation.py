"""The CUDA op's own source - tile and narrow kernels and host launchers - run on CPU through a model of
CUDA (tests/cuda_emulation/) as strict as compute-sanitizer and the hardware, against the
float64 reference (contract §4 criterion). What the model checks (details in cuda_shim.h and
emulated_runtime.h):

- racecheck: every shared-memory access between two __syncthreads is recorded; two accesses
  to one byte by different threads, one a write, fail (warp-synchronous code included), unless a
  __syncwarp of their common warp lies between them; cp.async writes land only at their wait;
- initcheck: shared memory is poisoned at every block start and a read of a byte the block has
  not written fails; outputs and workspaces (every CPU allocation during a call) are poisoned
  too, so an element the kernels do not write shows up as NaN, a counter not zeroed as -1;
- WMMA: per-lane fragments in an element order scrambled per run, ldm and 32-byte alignment of
  every load/store_matrix_sync, store's layout argument, TF32 rounding (the TF32 policy is held
  to its own tolerance);
- CTAs run concurrently, as many at once as the target holds (shared memory, threads and a register
  budget per SM), switching at atomics, spin-waits, barrier releases and exits in a schedule drawn
  from the seed (several seeds for the split-K reduction); spin-waits that can never end fail as a
  deadlock; stores through GlobalPtr stay invisible to other CTAs until a fence publishes them;
- the launches of forward.cu/backward.cu go through a fake CUDA runtime that holds them to the
  hardware's rules on each target (sm_80: 163 KB opt-in shared memory, sm_86/89/120: 99 KB,
  sm_90: 227 KB, sm_75: 64 KB and no bf16/TF32 tensor cores): grid limits, dynamic shared memory against the kernel's attribute and the
  attribute against the opt-in maximum, the current stream; the op's routing (use_native_kernels)
  sends what does not fit, and bf16 before compute capability 8.0, to the hoisted chain, and B = 0
  launches nothing.

Seeded bugs the model must catch keep it honest: a removed __syncthreads or __syncwarp (each
barrier of the real kernels in turn), a fragment-order assumption, a misaligned ldm, a read of unwritten
shared memory and split-K counters not reset; between CTAs: the barrier or the fence before the
split-K ticket removed, a ready flag raised before its tile is stored or without a fence, and a
grid that spin-waits on CTAs that cannot be co-resident.

The seed (fragment orders, CTA order, schedule) is printed and appears in every failure; set
SPINAL_EMU_SEED to replay one. Needs the CUDA headers (cuda_fp16.h) and a C++ compiler; builds
once per session (~1 min).
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from contract import ATOL_PER_SCALE, CASES, GRAD_NAMES, _run, make_config, random_params
from spinal_ops.activations import ACTIVATIONS
from spinal_ops.config import SpinalConfig, SpinalParams

pytestmark = pytest.mark.slow  # ~1 min to build the harness, ~1 min to run on 2 cores

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = int(os.environ.get("SPINAL_EMU_SEED", random.SystemRandom().randrange(1, 2**31)))
# The fake devices of tests/cuda_emulation/emulated_runtime.h, by index.
TARGETS = {"sm_80": 0, "sm_86": 1, "sm_89": 2, "sm_90": 3, "sm_120": 4, "sm_75": 5}
SM90 = TARGETS["sm_90"]
SM75 = TARGETS["sm_75"]  # T4: 64 KB opt-in shared memory, fp16 tensor cores, no bf16 or TF32 ones


def _cuda_include() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    for root in filter(None, (CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        if os.path.exists(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    return None


@pytest.fixture(scope="module")
def emulated_ops():
    include = _cuda_include()
    if include is None:
        pytest.skip("the CUDA headers (cuda_fp16.h) are not installed")
    from torch.utils.cpp_extension import load

    # One build directory per checkout and torch version, not the shared ~/.cache/torch_extensions:
    # newer torch leaves a file named `lock` there (an advisory lock), and torch 2.11, whose lock
    # is that file's mere existence, then waits for it forever.
    build_directory = os.path.join(os.path.dirname(HERE), "build", "cuda_emulation", f"torch-{torch.__version__}")
    os.makedirs(build_directory, exist_ok=True)
    load(
        "spinal_emu",
        [os.path.join(HERE, "cuda_emulation", "emulated_ops.cpp")],
        # include/ holds the model's c10/cuda headers, found before torch's.
        extra_include_paths=[os.path.join(HERE, "cuda_emulation", "include"), include],
        extra_cflags=["-O1", "-Wno-attributes"],
        build_directory=build_directory,
        is_python_module=False,
    )
    print(f"CUDA emulation seed {SEED} (SPINAL_EMU_SEED={SEED} replays it)")
    ops = torch.ops.spinal_emu
    ops.configure(SEED, "", False)
    yield ops
    ops.configure(SEED, "", False)


# (dtype, accumulator policy of the kernels)
POLICIES = {
    "fp32_simt": (torch.float32, "simt"),
    "fp32_tf32": (torch.float32, "tf32"),
    "fp16_wmma": (torch.float16, "wmma"),
    "bf16_wmma": (torch.bfloat16, "wmma"),
    "fp32_hoisted": (torch.float32, "aten"),
    "bf16_hoisted": (torch.bfloat16, "aten"),
}

# The kernels' tile boundaries on the emulated targets; two cases are the edge-case matrix's
# (tests/contract.py).
CONFIGS = {
    "odd_N_wraps": CASES["odd_N_wraps"],
    "wrap_s40_N70_two_k_chunks": dict(in_features=70, out_features=10, layer_width=33, num_layers=3, split_size=40),
    "no_projection_no_bias": dict(in_features=12, out_features=None, layer_width=6, num_layers=3, bias=False),
    "w1_single_layer": dict(in_features=4, out_features=2, layer_width=1, num_layers=1),
    "two_z_chunks_M_and_N_over_128": dict(in_features=150, out_features=130, layer_width=140, num_layers=2,
                                          split_size=100),
    "columns_no_window_reads": CASES["columns_no_window_reads"],
}
WIDE = dict(in_features=20, out_features=5, layer_width=300, num_layers=3, split_size=13)  # w > 256


# TF32 rounds each GEMM input to 10 mantissa bits (unit roundoff 2^-11, as float16) where the
# float32 eager reference keeps 23, so the TF32 policy has its own tolerance: the kernels' error
# relative to the reference's scale is <= 6.5e-4 over CONFIGS, 3x that is allowed.
ATOL_TF32 = 2e-3


def _dropout_args(config, dropout_seed):
    """The op pairs' trailing (dropout_seed, dropout_p) of a training call with that seed, or none."""
    return () if dropout_seed is None else (torch.tensor(dropout_seed, dtype=torch.int64), config.dropout)


def _emulated_run(ops, x, params, config, grad_out, policy, device, dropout_seed=None, forward_policy=None):
    present = [p for p in params if p is not None]
    dropout = _dropout_args(config, dropout_seed)
    out, pre_activation = ops.forward(x, *params, config.activation, config.negative_slope, forward_policy or policy,
                                      device, True, *dropout)
    grads = ops.backward(grad_out, x, pre_activation, params.weight_in, params.weight_hidden, params.weight_out,
                         config.bias, config.activation, config.negative_slope, policy, device, *dropout)
    names = [n for n, p in zip(GRAD_NAMES, [x, *params]) if p is not None]
    by_name = dict(zip(GRAD_NAMES, grads))
    assert len(names) == 1 + len(present)
    return [out] + [by_name[n] for n in names]


def _check(ops, config, dtype, policy, batch, device=SM90, seed=0, dropout_seed=None, kernel_dropout_seed=None,
           forward_policy=None):
    """Output and every gradient of the emulated op against the float64 reference (contract §4).
    dropout_seed: a training call with the config's dropout, the masks of that seed in the references
    and in the kernels (kernel_dropout_seed: another seed for the kernels only). forward_policy: the
    forward's, when it is not `policy` (the backward's)."""
    generator = torch.Generator().manual_seed(seed)

    # Inputs exact in `dtype`: the float64 reference sees the kernels' inputs, so what is compared
    # is the kernels' arithmetic, not the input rounding.
    def representable(t):
        return None if t is None else t.to(dtype).double()

    params64 = SpinalParams(*(representable(p) for p in random_params(config, generator)))
    x64 = representable(torch.randn(batch, config.in_features, generator=generator, dtype=torch.float64))
    grad_out = torch.randn(batch, config.output_features, generator=generator, dtype=torch.float64)
    expected = _run("reference", x64, params64, config, grad_out, dropout_seed)
    params = SpinalParams(*(None if p is None else p.to(dtype) for p in params64))
    eager = _run("reference", x64.to(dtype), params, config, grad_out, dropout_seed)
    got = _emulated_run(ops, x64.to(dtype), params, config, grad_out.to(dtype), policy, device,
                        dropout_seed if kernel_dropout_seed is None else kernel_dropout_seed, forward_policy)
    names = ["output"] + [n for n, p in zip(GRAD_NAMES, [x64, *params64]) if p is not None]
    where = f"{policy} {dtype} on fake device {device}, seed {SEED}"
    for name, ref, eag, out in zip(names, expected, eager, got):
        assert out.shape == ref.shape and out.dtype == dtype, name
        if ref.numel() == 0:
            continue
        assert not out.isnan().any(), f"{name}: NaN (an element the kernel did not write; {where})"
        err = (out.double() - ref).abs().max().item()
        err_eager = (eag.double() - ref).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        atol = (ATOL_TF32 if policy in ("tf32", "persistent_tf32") else ATOL_PER_SCALE[dtype]) * scale
        assert err <= 2 * err_eager + atol, f"{where} {name}: {err:.3e} > 2*{err_eager:.3e} + {atol:.1e}"


def _policy_config(name, policy, **overrides):
    dtype, mma = POLICIES[policy]
    if dtype != torch.float32 or mma == "tf32":
        # fp16/bf16 round h, and TF32 the GEMM inputs, which can move a z within ~1e-3 of 0 across
        # ReLU's kink and flip a whole gradient term; a smooth activation keeps the comparison about
        # the kernels' indexing and accumulation.
        overrides.setdefault("activation", "gelu")
    return make_config(**{**CONFIGS[name], **overrides})


# Widest native-kernel w per target and policy: the kernels' shared memory (forward_kernel.cuh) against
# the opt-in maximum per block; 99 KB parts lose 193..256 (fp16/bf16/TF32) and 225..256 (fp32). sm_75
# (64 KB) runs fp16 in 32-row tiles (all of 1..256), float32 on SimtMma whatever the TF32 setting
# (1..96) and no bf16 at all (0: the hoisted chain, native_kernels_refusal).
WIDTH_LIMITS = {
    "sm_80": {"fp32_simt": 256, "fp32_tf32": 256, "fp16_wmma": 256, "bf16_wmma": 256},
    "sm_86": {"fp32_simt": 224, "fp32_tf32": 192, "fp16_wmma": 192, "bf16_wmma": 192},
    "sm_89": {"fp32_simt": 224, "fp32_tf32": 192, "fp16_wmma": 192, "bf16_wmma": 192},
    "sm_90": {"fp32_simt": 256, "fp32_tf32": 256, "fp16_wmma": 256, "bf16_wmma": 256},
    "sm_120": {"fp32_simt": 224, "fp32_tf32": 192, "fp16_wmma": 192, "bf16_wmma": 192},
    "sm_75": {"fp32_simt": 96, "fp32_tf32": 96, "fp16_wmma": 256, "bf16_wmma": 0},
}


def _fits(target, name, policy):
    """Whether CONFIGS[name] runs the native kernels of `policy` on `target` (the hoisted policies: always)."""
    limit = WIDTH_LIMITS[target].get(policy, 256)
    return CONFIGS[name]["layer_width"] <= limit


# sm_90 for every policy; sm_75 for those it runs natively (fp16 in 32-row tiles, float32 on
# SimtMma also under "tf32"), at the widths its shared memory holds.
REFERENCE_CASES = [(target, name, policy) for target in ("sm_90", "sm_75") for name in sorted(CONFIGS)
                   for policy in sorted(POLICIES)
                   if target == "sm_90" or (policy in WIDTH_LIMITS["sm_75"] and _fits(target, name, policy))]


@pytest.mark.parametrize("target, name, policy", REFERENCE_CASES)
def test_kernels_match_reference(emulated_ops, target, name, policy):
    dtype, mma = POLICIES[policy]
    # 70 rows: two full and a partial row tile for fp32 and for fp16 on sm_75 (32 rows), a full and a
    # partial for fp16/bf16 on sm_90 (64).
    _check(emulated_ops, _policy_config(name, policy), dtype, mma, batch=70, device=TARGETS[target])


@pytest.mark.parametrize("seed", [SEED, SEED + 1, SEED + 2])
@pytest.mark.parametrize("policy", ["fp32_simt", "bf16_wmma"])
def test_split_k_weight_gradients(emulated_ops, policy, seed):
    # 600 rows and few tiles: the plan splits the rows (>= 256 each) and the last CTA to arrive
    # reduces; each seed shuffles the CTAs into another arrival order.
    dtype, mma = POLICIES[policy]
    emulated_ops.configure(seed, "", False)
    try:
        _check(emulated_ops, _policy_config("odd_N_wraps", policy, activation="gelu"), dtype, mma, batch=600)
    finally:
        emulated_ops.configure(SEED, "", False)


@pytest.mark.parametrize("activation", ["leaky_relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "identity"])
def test_activations(emulated_ops, activation):
    config = make_config(**CONFIGS["odd_N_wraps"], activation=activation, negative_slope=0.2)
    _check(emulated_ops, config, torch.float32, "simt", batch=37)


@pytest.mark.parametrize("policy", ["fp32_hoisted", "bf16_hoisted"])
@pytest.mark.parametrize("bias", [True, False])
def test_hoisted_chain_beyond_tile_width(emulated_ops, policy, bias):
    # The op's own routing ("auto") takes w > 256 to the hoisted chain on every target.
    dtype, _ = POLICIES[policy]
    config = make_config(**WIDE, bias=bias, activation="relu" if dtype == torch.float32 else "gelu")
    launches = emulated_ops.launches()
    _check(emulated_ops, config, dtype, "auto", batch=37)
    assert emulated_ops.launches() == launches


# The narrow kernels (w <= 16, M <= 16: one thread per row) for the forward and backward launch 1,
# then the tiled launch 2.
# Its edges: both compiled widths (8 and 16) and their padding, w and M at the limits, windows
# that wrap and chunks of 32 columns with a partial last one, no projection, no bias, L = 1.
NARROW_CONFIGS = {
    "odd_N_wraps": CASES["odd_N_wraps"],
    "mnist_like_w8": dict(in_features=80, out_features=10, layer_width=8, num_layers=6),
    "w16_M16_s_wraps_partial_chunk": dict(in_features=101, out_features=16, layer_width=16, num_layers=3,
                                          split_size=70),
    "w9_no_projection_no_bias": dict(in_features=40, out_features=None, layer_width=9, num_layers=4, bias=False),
    "w1_single_layer": CONFIGS["w1_single_layer"],
    "columns_no_window_reads": CASES["columns_no_window_reads"],
}
NARROW_POLICIES = {"fp32_narrow": torch.float32, "bf16_narrow": torch.bfloat16, "fp16_narrow": torch.float16}


# sm_90 for every case; sm_75 (the narrow kernels as they are, launch 2 in fp16's 32-row tiles) for
# fp32 and fp16, on the shapes at the narrow limits.
NARROW_CASES = [("sm_90", name, policy) for name in sorted(NARROW_CONFIGS) for policy in sorted(NARROW_POLICIES)]
NARROW_CASES += [("sm_75", name, policy) for name in ("mnist_like_w8", "w16_M16_s_wraps_partial_chunk")
                 for policy in ("fp16_narrow", "fp32_narrow")]


@pytest.mark.parametrize("target, name, policy", NARROW_CASES)
def test_narrow_kernels_match_reference(emulated_ops, target, name, policy):
    # 300 rows: two full CTAs of 128 rows and a partial one.
    dtype = NARROW_POLICIES[policy]
    overrides = {} if dtype == torch.float32 else {"activation": "gelu"}  # see _policy_config
    config = make_config(**{**NARROW_CONFIGS[name], **overrides})
    _check(emulated_ops, config, dtype, "narrow", batch=300, device=TARGETS[target])
    # Inference: no Z kept (none written) and the same output, bit for bit.
    params = random_params(config, torch.Generator().manual_seed(2), dtype=dtype)
    x = torch.randn(300, config.in_features).to(dtype)
    kept = emulated_ops.forward(x, *params, config.activation, config.negative_slope, "narrow", SM90, True)
    inferred = emulated_ops.forward(x, *params, config.activation, config.negative_slope, "narrow", SM90, False)
    assert inferred[1].numel() == 0 and torch.equal(inferred[0], kept[0])


# The warp-level narrow forward (warp_narrow_kernels.cuh: one warp per 16 rows on WMMA, w and M up
# to 32 padded to 16 or 32; fp16 and bf16 on sm_80+), opt-in behind SPINAL_OPS_CUDA_WARP_NARROW=1.
# Its edges: both padded widths and output counts at and below their limits, odd w, windows that wrap
# (s not dividing N, pieces not 16-byte aligned), columns of x no window reads (dx there is zero),
# no projection, no bias, L = 1, partial 16-row tiles (batch 37 and 130), and a persistent grid with
# fewer warps than tiles.
WARP_NARROW_CONFIGS = {
    "mnist_like": dict(in_features=40, out_features=10, layer_width=8, num_layers=6, split_size=20),
    "w1": dict(in_features=9, out_features=4, layer_width=1, num_layers=3),
    "w16_M16_wraps": dict(in_features=33, out_features=16, layer_width=16, num_layers=3, split_size=12),
    "w32_M32": dict(in_features=48, out_features=32, layer_width=32, num_layers=2, split_size=24),
    "w5_odd_N_wraps": CASES["odd_N_wraps"],
    "w12_no_projection": dict(in_features=20, out_features=None, layer_width=12, num_layers=3, split_size=7),
    "w17_M20_no_bias": dict(in_features=30, out_features=20, layer_width=17, num_layers=3, bias=False),
    "L1": dict(in_features=40, out_features=5, layer_width=8, num_layers=1),
    "w24_M10_wraps": dict(in_features=45, out_features=10, layer_width=24, num_layers=4, split_size=17),
    "columns_no_window_reads": CASES["columns_no_window_reads"],
}
WARP_NARROW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _pre_activations(x, params, config):
    """Z = [z_0, ..., z_{L-1}] by the reference's own ops (spinal_ops/reference.py)."""
    import torch.nn.functional as F

    from spinal_ops.activations import apply_activation
    from spinal_ops.reference import input_window

    zs, previous = [], None
    for layer in range(config.num_layers):
        bias = None if params.bias is None else params.bias[layer]
        z = F.linear(input_window(x, config, layer), params.weight_in[layer], bias)
        if layer > 0:
            z = z + F.linear(previous, params.weight_hidden[layer - 1])
        zs.append(z)
        previous = apply_activation(config.activation, z, config.negative_slope)
    return torch.cat(zs, dim=-1)


def _check_forward(ops, config, dtype, policy, batch, device, seed=0):
    """The forward's output and Z against the float64 reference (contract §4); without Z kept, none is
    written and the output is the same bits. Returns the kept run's (out, Z)."""
    from spinal_ops.reference import spinal_forward

    generator = torch.Generator().manual_seed(seed)
    params64 = SpinalParams(*(None if p is None else p.to(dtype).double() for p in random_params(config, generator)))
    x64 = torch.randn(batch, config.in_features, generator=generator, dtype=torch.float64).to(dtype).double()
    params = SpinalParams(*(None if p is None else p.to(dtype) for p in params64))
    x = x64.to(dtype)
    out, pre = ops.forward(x, *params, config.activation, config.negative_slope, policy, device, True)
    where = f"{policy} {dtype} on fake device {device}, seed {SEED}"
    for name, got, ref, eager in (("output", out, spinal_forward(x64, params64, config), spinal_forward(x, params, config)),
                                  ("Z", pre, _pre_activations(x64, params64, config), _pre_activations(x, params, config))):
        assert got.shape == ref.shape and got.dtype == dtype, name
        assert not got.isnan().any(), f"{name}: NaN (an element the kernel did not write; {where})"
        err = (got.double() - ref).abs().max().item()
        err_eager = (eager.double() - ref).abs().max().item()
        atol = ATOL_PER_SCALE[dtype] * max(1.0, ref.abs().max().item())
        assert err <= 2 * err_eager + atol, f"{where} {name}: {err:.3e} > 2*{err_eager:.3e} + {atol:.1e}"
    inferred, no_pre = ops.forward(x, *params, config.activation, config.negative_slope, policy, device, False)
    assert no_pre.numel() == 0 and torch.equal(inferred, out)
    return out, pre


WARP_NARROW_CASES = [(target, name, dtype) for target in ("sm_90", "sm_80") for name in sorted(WARP_NARROW_CONFIGS)
                     for dtype in sorted(WARP_NARROW_DTYPES)]


@pytest.mark.parametrize("target, name, dtype", WARP_NARROW_CASES)
def test_warp_narrow_forward_matches_reference(emulated_ops, target, name, dtype):
    # gelu: see _policy_config; tanh on every other case, a second activation through the same epilogue.
    activation = "tanh" if sorted(WARP_NARROW_CONFIGS).index(name) % 2 else "gelu"
    config = make_config(**WARP_NARROW_CONFIGS[name], activation=activation)
    batch = 130 if name in ("mnist_like", "w16_M16_wraps") else 37
    _check_forward(emulated_ops, config, WARP_NARROW_DTYPES[dtype], "warp_narrow", batch, TARGETS[target])


@pytest.mark.parametrize("dtype", sorted(WARP_NARROW_DTYPES))
@pytest.mark.parametrize("name", ["mnist_like", "w32_M32"])
def test_warp_narrow_forward_loops_over_tiles(emulated_ops, name, dtype):
    # One SM: the persistent grid is 2 CTAs of 16 warps (the model's register budget at 512 threads)
    # for 38 tiles of 16 rows, so some warps run a second tile, its first window copied during the
    # first tile's last layer.
    config = make_config(**WARP_NARROW_CONFIGS[name], activation="gelu")
    emulated_ops.set_sm_count(1)
    try:
        _check_forward(emulated_ops, config, WARP_NARROW_DTYPES[dtype], "warp_narrow", 600, SM90)
        grid, _, _, _, threads = emulated_ops.last_launch()
    finally:
        emulated_ops.set_sm_count(0)
    assert (grid, threads) == (2, 512)


def test_warp_narrow_forward_is_opt_in(emulated_ops, monkeypatch):
    # The op's routing ("auto") runs the warp-level forward only under SPINAL_OPS_CUDA_WARP_NARROW=1, and
    # then only where it fits: half types on sm_80+, w <= 32 and M <= 32.
    config = make_config(**WARP_NARROW_CONFIGS["mnist_like"], activation="gelu")
    params = random_params(config, torch.Generator().manual_seed(3), dtype=torch.bfloat16)
    x = torch.randn(37, config.in_features).to(torch.bfloat16)

    def run(policy, dtype=torch.bfloat16, device=SM90, shape=config, arguments=(x, params)):
        x_, params_ = arguments
        return emulated_ops.forward(x_.to(dtype), *(None if p is None else p.to(dtype) for p in params_),
                                    shape.activation, shape.negative_slope, policy, device, True)

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a, b))

    def threads():  # per CTA of the last launch: 128 for the narrow kernel, 32 per warp (here 3 tiles) for this one
        return emulated_ops.last_launch()[4]

    warp = run("warp_narrow")
    assert threads() == 96
    monkeypatch.delenv("SPINAL_OPS_CUDA_WARP_NARROW", raising=False)
    assert same(run("auto"), run("narrow")) and threads() == 128
    monkeypatch.setenv("SPINAL_OPS_CUDA_WARP_NARROW", "1")
    # (in the model its bits equal the narrow kernel's: exact bf16 products, summed in the same order)
    assert same(run("auto"), warp) and threads() == 96
    assert same(run("auto", device=TARGETS["sm_80"]), run("warp_narrow", device=TARGETS["sm_80"])) and threads() == 96
    # float32, and fp16 on sm_75 (no cp.async, and the kernel is compiled for sm_80+ only): today's kernels.
    assert same(run("auto", dtype=torch.float32), run("narrow", dtype=torch.float32))
    assert same(run("auto", dtype=torch.float16, device=SM75), run("narrow", dtype=torch.float16, device=SM75))
    with pytest.raises(RuntimeError, match="does not fit the warp-level narrow forward"):
        run("warp_narrow", dtype=torch.float16, device=SM75)
    # M = 33: the tiled kernels.
    wide_out = make_config(**{**WARP_NARROW_CONFIGS["w32_M32"], "out_features": 33}, activation="gelu")
    wide_params = random_params(wide_out, torch.Generator().manual_seed(4), dtype=torch.bfloat16)
    wide_x = torch.randn(20, wide_out.in_features).to(torch.bfloat16)
    assert same(run("auto", shape=wide_out, arguments=(wide_x, wide_params)),
                run("wmma", shape=wide_out, arguments=(wide_x, wide_params)))


def test_every_removed_warp_narrow_sync_is_caught(emulated_ops):
    # The warp-level forward's barriers (the CTA's one __syncthreads after staging the weights, each
    # warp's __syncwarps), each removed in turn: racecheck (which orders a warp's accesses only across a
    # __syncwarp), initcheck or a wrong result must notice.
    config = make_config(**WARP_NARROW_CONFIGS["mnist_like"], activation="gelu")
    emulated_ops.configure(SEED, "", False)
    _check_forward(emulated_ops, config, torch.bfloat16, "warp_narrow", 37, SM90)
    sites = [s for s in emulated_ops.barrier_sites() if "warp_narrow_kernels" in s]
    assert len(sites) == 5, sites
    missed = []
    for site in sites:
        emulated_ops.configure(SEED, site, False)
        try:
            _check_forward(emulated_ops, config, torch.bfloat16, "warp_narrow", 37, SM90)
            missed.append(os.path.relpath(site, os.path.dirname(HERE)))
        except RuntimeError as error:
            assert "racecheck" in str(error) or "initcheck" in str(error), str(error)
        except AssertionError:  # a wrong or unwritten result
            pass
        finally:
            emulated_ops.configure(SEED, "", False)
    assert missed == [], f"removing the barrier at {missed} went unnoticed (seed {SEED})"


# The warp-level backward launch 1 (spinal_warp_narrow_data_grad_kernel, same header): a training
# call of the "warp_narrow" policy runs the warp-level forward, then it, then the tiled launch 2;
# every gradient against the float64 reference (contract §4) on the forward's edge cases.
@pytest.mark.parametrize("target, name, dtype", WARP_NARROW_CASES)
def test_warp_narrow_backward_matches_reference(emulated_ops, target: str, name: str, dtype: str) -> None:
    activation = "tanh" if sorted(WARP_NARROW_CONFIGS).index(name) % 2 else "gelu"  # see _policy_config
    config = make_config(**WARP_NARROW_CONFIGS[name], activation=activation)
    batch = 130 if name in ("mnist_like", "w16_M16_wraps") else 37
    emulated_ops.launched_kernels()
    _check(emulated_ops, config, WARP_NARROW_DTYPES[dtype], "warp_narrow", batch, TARGETS[target])
    kernels = [k.split("<")[0].split("::")[-1] for k in emulated_ops.launched_kernels()[0]]
    assert kernels == ["spinal_warp_narrow_forward_kernel", "spinal_warp_narrow_data_grad_kernel",
                       "spinal_weight_grad_kernel"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_warp_narrow_backward_activations(emulated_ops, activation: str) -> None:
    # Every activation's phi' in both half types; where the narrow launch 1 also fits (w, M <= 16), the
    # gradients are its bits: in the model both sum the same exact half-type products in the same order.
    config = make_config(**WARP_NARROW_CONFIGS["w16_M16_wraps"], activation=activation, negative_slope=0.2)
    for dtype in WARP_NARROW_DTYPES.values():
        _check(emulated_ops, config, dtype, "warp_narrow", 37)
        params = random_params(config, torch.Generator().manual_seed(5), dtype=dtype)
        x = torch.randn(37, config.in_features).to(dtype)
        grad_out = torch.randn(37, config.output_features).to(dtype)
        out, pre = emulated_ops.forward(x, *params, activation, 0.2, "narrow", SM90, True)

        def grads(policy: str) -> list[torch.Tensor]:
            return emulated_ops.backward(grad_out, x, pre, params.weight_in, params.weight_hidden,
                                         params.weight_out, True, activation, 0.2, policy, SM90)

        assert all(torch.equal(a, b) for a, b in zip(grads("warp_narrow"), grads("narrow"))), dtype


@pytest.mark.parametrize("dtype", sorted(WARP_NARROW_DTYPES))
@pytest.mark.parametrize("name", ["mnist_like", "w24_M10_wraps", "w12_no_projection"])
def test_warp_narrow_backward_loops_over_tiles(emulated_ops, name: str, dtype: str) -> None:
    # One SM: launch 1's persistent grid is at most 2 CTAs of 16 warps (the model's register budget at
    # 512 threads; 1 where the SM's shared memory holds one) for 38 tiles of 16 rows (the last one
    # partial), so warps run a second or third tile after their first one's dx; three schedules (CTA
    # order, fragment orders) each.
    config = make_config(**WARP_NARROW_CONFIGS[name], activation="gelu")
    emulated_ops.set_sm_count(1)
    try:
        for seed in (SEED, SEED + 1, SEED + 2):
            emulated_ops.configure(seed, "", False)
            emulated_ops.launched_kernels()
            _check(emulated_ops, config, WARP_NARROW_DTYPES[dtype], "warp_narrow", 600, SM90)
            names, grids, threads = emulated_ops.launched_kernels()
            assert "spinal_warp_narrow_data_grad_kernel" in names[1]
            assert threads[1] == 512 and grids[1] * 16 < 38
    finally:
        emulated_ops.set_sm_count(0)
        emulated_ops.configure(SEED, "", False)


@pytest.mark.parametrize("dtype", sorted(WARP_NARROW_DTYPES))
def test_warp_narrow_backward_zeroes_split_k_counters(emulated_ops, dtype: str) -> None:
    # 600 rows on sm_90's 132 SMs: launch 2 splits the rows (its tiles do not fill the GPU), so its
    # ticket counters, poisoned to -1, must be zeroed by the warp-level launch 1; with that zeroing
    # dropped (the model's seeded bug) no CTA sums a tile's partials and the gradients stay NaN.
    config = make_config(**WARP_NARROW_CONFIGS["mnist_like"], activation="gelu")
    _check(emulated_ops, config, WARP_NARROW_DTYPES[dtype], "warp_narrow", 600, SM90)
    emulated_ops.configure(SEED, "", True)
    try:
        with pytest.raises(AssertionError, match="NaN"):
            _check(emulated_ops, config, WARP_NARROW_DTYPES[dtype], "warp_narrow", 600, SM90)
    finally:
        emulated_ops.configure(SEED, "", False)


def test_warp_narrow_backward_is_opt_in(emulated_ops, monkeypatch: pytest.MonkeyPatch) -> None:
    # The op's routing ("auto") runs the warp-level launch 1 only under SPINAL_OPS_CUDA_WARP_NARROW=1,
    # where the warp-level forward runs too and its own shared memory fits, and never with a dropout;
    # launch 2 is the tiled one after every launch 1.
    def kernels(config: SpinalConfig, dtype: torch.dtype = torch.bfloat16, device: int = SM90,
                dropout_seed: int | None = None) -> tuple[str, str]:
        """The forward's and launch 1's kernels of an "auto" training call within contract §4."""
        emulated_ops.launched_kernels()
        _check(emulated_ops, config, dtype, "auto", 37, device, dropout_seed=dropout_seed)
        forward, data_grad, weight_grad = [k.split("<")[0].split("::")[-1] for k in emulated_ops.launched_kernels()[0]]
        assert weight_grad == "spinal_weight_grad_kernel"
        return forward, data_grad

    narrow = make_config(**WARP_NARROW_CONFIGS["mnist_like"], activation="gelu")
    wide = make_config(**WARP_NARROW_CONFIGS["w24_M10_wraps"], activation="gelu")
    warp = ("spinal_warp_narrow_forward_kernel", "spinal_warp_narrow_data_grad_kernel")
    monkeypatch.delenv("SPINAL_OPS_CUDA_WARP_NARROW", raising=False)
    assert kernels(narrow) == ("spinal_narrow_forward_kernel", "spinal_narrow_data_grad_kernel")
    assert kernels(wide) == ("spinal_forward_kernel", "spinal_data_grad_kernel")
    monkeypatch.setenv("SPINAL_OPS_CUDA_WARP_NARROW", "1")
    assert kernels(narrow) == warp
    assert kernels(wide) == warp
    assert kernels(wide, device=TARGETS["sm_80"]) == warp
    # mnist's windows with L = 12 on a 99 KB part: the forward's shared memory holds one warp, launch 1's
    # (the dx tiles, about 1.4x the forward's A) none, so launch 1 stays the narrow kernel.
    tall = make_config(in_features=320, out_features=10, layer_width=8, num_layers=12, split_size=160,
                       activation="gelu")
    assert kernels(tall, device=TARGETS["sm_86"]) == (warp[0], "spinal_narrow_data_grad_kernel")
    # A dropout, float32, fp16 on sm_75: today's kernels.
    dropped = make_config(**WARP_NARROW_CONFIGS["mnist_like"], activation="gelu", dropout=DROPOUT_P)
    assert kernels(dropped, dropout_seed=DROPOUT_SEED)[1] == "spinal_narrow_data_grad_kernel"
    assert kernels(narrow, dtype=torch.float32)[1] == "spinal_narrow_data_grad_kernel"
    assert kernels(narrow, dtype=torch.float16, device=SM75)[1] == "spinal_narrow_data_grad_kernel"
    # Under the switch, "auto" is the "warp_narrow" policy's backward bit for bit.
    params = random_params(wide, torch.Generator().manual_seed(6), dtype=torch.bfloat16)
    x = torch.randn(37, wide.in_features).to(torch.bfloat16)
    grad_out = torch.randn(37, wide.output_features).to(torch.bfloat16)
    _, pre = emulated_ops.forward(x, *params, "gelu", 0.0, "warp_narrow", SM90, True)
    runs = [emulated_ops.backward(grad_out, x, pre, params.weight_in, params.weight_hidden, params.weight_out, True,
                                  "gelu", 0.0, policy, SM90) for policy in ("auto", "warp_narrow")]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    with pytest.raises(RuntimeError, match="has no dropout stage"):
        emulated_ops.backward(grad_out, x, pre, params.weight_in, params.weight_hidden, params.weight_out, True,
                              "gelu", 0.0, "warp_narrow", SM90, torch.tensor(DROPOUT_SEED), DROPOUT_P)


def test_every_removed_warp_narrow_grad_sync_is_caught(emulated_ops) -> None:
    # The warp-level launch 1's barriers (the CTA's __syncthreads after staging the weights, each warp's
    # __syncwarps), each removed in turn from a training call with a projection, L > 1 and three
    # 16-column chunks of x: racecheck, initcheck or a wrong gradient must notice.
    config = make_config(**WARP_NARROW_CONFIGS["mnist_like"], activation="gelu")
    emulated_ops.configure(SEED, "", False)
    _check_forward(emulated_ops, config, torch.bfloat16, "warp_narrow", 37, SM90)
    forward_sites = set(emulated_ops.barrier_sites())
    emulated_ops.configure(SEED, "", False)
    _check(emulated_ops, config, torch.bfloat16, "warp_narrow", 37)
    sites = sorted(s for s in set(emulated_ops.barrier_sites()) - forward_sites if "warp_narrow_kernels" in s)
    assert len(sites) == 6, sites
    missed = _barriers_missed_by(emulated_ops, sites, [(config, torch.bfloat16, "warp_narrow", 37)])
    assert missed == [], f"removing the barrier at {missed} went unnoticed (seed {SEED})"


def test_routing_runs_the_narrow_kernels_where_they_fit(emulated_ops):
    # "auto" takes w <= 16 and M <= 16 to the narrow kernels: its outputs and gradients equal the
    # "narrow" run's bit for bit; a layer one step wider (w = 17, or M = 17) runs the tiled kernels.
    generator = torch.Generator().manual_seed(1)
    for shape, narrow in ((dict(layer_width=16, out_features=16), True), (dict(layer_width=17, out_features=16), False),
                          (dict(layer_width=16, out_features=17), False)):
        config = make_config(in_features=50, num_layers=3, **shape)
        params = random_params(config, generator, dtype=torch.float32)
        x = torch.randn(40, config.in_features, generator=generator)
        grad_out = torch.randn(40, config.output_features, generator=generator)

        def run(policy):
            out, pre = emulated_ops.forward(x, *params, "relu", 0.0, policy, SM90, True)
            grads = emulated_ops.backward(grad_out, x, pre, params.weight_in, params.weight_hidden, params.weight_out,
                                          True, "relu", 0.0, policy, SM90)
            return [out, pre, *grads]

        auto, forced = run("auto"), run("narrow" if narrow else "simt")
        assert all(torch.equal(a, f) for a, f in zip(auto, forced)), shape


# ---- dropout inside the kernels (contract §1, "Masks") -------------------------------------
# The tile kernels drop x's window as they stage it, h_{l-1} as the epilogue stages it for the next
# layer and H as the projection re-reads it; the backward scales dH, dz_{l+1} R_{l+1} and each
# layer's dx product by the same factors and launch 2 reads the dropped inputs. The narrow kernels
# likewise per row. Against the float64 reference given the same seed.

DROPOUT_P = 0.3
DROPOUT_SEED = 1234567890123  # above 2^32: both words of the Philox key matter

# Wrapped windows over two K-chunks, no projection and no bias, L = 1; (one or two policies: the
# costliest) two 128-column chunks of z, of y and of dx, where dH is parked across chunks, and
# column chunks of x that no window reads (dx written without a layer's product).
DROPOUT_CONFIGS = ("odd_N_wraps", "wrap_s40_N70_two_k_chunks", "no_projection_no_bias", "w1_single_layer")
DROPOUT_CASES = [(name, policy) for name in DROPOUT_CONFIGS
                 for policy in ("fp32_simt", "fp32_tf32", "fp16_wmma", "bf16_wmma", "fp32_hoisted")]
DROPOUT_CASES += [("two_z_chunks_M_and_N_over_128", "bf16_wmma"), ("columns_no_window_reads", "fp32_simt"),
                  ("columns_no_window_reads", "bf16_wmma")]
DROPOUT_NARROW_CONFIGS = ("odd_N_wraps", "w16_M16_s_wraps_partial_chunk", "w9_no_projection_no_bias",
                          "w1_single_layer")


def _dropout_config(shape, dtype, mma, **overrides):
    smooth = dtype != torch.float32 or mma == "tf32"  # see _policy_config
    return make_config(**{"activation": "gelu" if smooth else "relu", **shape, **overrides}, dropout=DROPOUT_P)


@pytest.mark.parametrize("name, policy", DROPOUT_CASES)
def test_dropout_matches_reference(emulated_ops, name, policy):
    dtype, mma = POLICIES[policy]
    _check(emulated_ops, _dropout_config(CONFIGS[name], dtype, mma), dtype, mma, batch=70, dropout_seed=DROPOUT_SEED)


@pytest.mark.parametrize("target, policy, batch", [
    ("sm_90", "fp32_simt", 600), ("sm_90", "bf16_wmma", 600),  # split-K weight gradients
    ("sm_75", "fp16_wmma", 70), ("sm_75", "fp32_simt", 70),    # sm_75's 32-row fp16 tiles, its SIMT fp32
])
def test_dropout_split_k_and_sm75(emulated_ops, target, policy, batch):
    dtype, mma = POLICIES[policy]
    config = _dropout_config(CONFIGS["wrap_s40_N70_two_k_chunks"], dtype, mma)
    _check(emulated_ops, config, dtype, mma, batch=batch, device=TARGETS[target], dropout_seed=DROPOUT_SEED)


@pytest.mark.parametrize("name", DROPOUT_NARROW_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_narrow_dropout_matches_reference(emulated_ops, name, dtype):
    # 130 rows: a full CTA of 128 rows and a partial one.
    config = _dropout_config(NARROW_CONFIGS[name], dtype, "narrow")
    _check(emulated_ops, config, dtype, "narrow", batch=130, dropout_seed=DROPOUT_SEED)


@pytest.mark.parametrize("activation", ["tanh", "leaky_relu"])
@pytest.mark.parametrize("policy", ["simt", "narrow"])
def test_dropout_activations(emulated_ops, policy, activation):
    config = make_config(**CONFIGS["odd_N_wraps"], activation=activation, negative_slope=0.2, dropout=DROPOUT_P)
    _check(emulated_ops, config, torch.float32, policy, batch=37, dropout_seed=DROPOUT_SEED)


@pytest.mark.parametrize("policy", ["fp32_simt", "bf16_wmma", "fp32_narrow"])
def test_dropout_p0_is_the_op_without_dropout(emulated_ops, policy):
    # A seed with p = 0 runs exactly the kernels without dropout: the same bits.
    dtype, mma = POLICIES[policy] if policy in POLICIES else (torch.float32, "narrow")
    config = make_config(**CONFIGS["odd_N_wraps"], activation="gelu")
    params = random_params(config, torch.Generator().manual_seed(3), dtype=dtype)
    x = torch.randn(70, config.in_features).to(dtype)
    grad_out = torch.randn(70, config.output_features).to(dtype)

    def run(*dropout):
        out, pre = emulated_ops.forward(x, *params, "gelu", 0.0, mma, SM90, True, *dropout)
        grads = emulated_ops.backward(grad_out, x, pre, params.weight_in, params.weight_hidden, params.weight_out,
                                      True, "gelu", 0.0, mma, SM90, *dropout)
        return [out, pre, *grads]

    plain, seeded = run(), run(torch.tensor(DROPOUT_SEED), 0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, seeded))


@pytest.mark.parametrize("policy", ["simt", "narrow"])
def test_dropout_with_another_seed_fails(emulated_ops, policy):
    # The check can fail: the kernels' masks from a different seed than the reference's are caught.
    config = make_config(**CONFIGS["odd_N_wraps"], dropout=DROPOUT_P)
    with pytest.raises(AssertionError, match=r" > 2\*"):
        _check(emulated_ops, config, torch.float32, policy, batch=37, dropout_seed=DROPOUT_SEED,
               kernel_dropout_seed=DROPOUT_SEED + 1)


@pytest.mark.parametrize("policy", ["fp32_simt", "fp32_tf32", "fp16_wmma", "bf16_wmma"])
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_widest_native_layer_fits_each_target(emulated_ops, target, policy):
    # The launches at the widest w the routing keeps on the native kernels pass the target's smem rules, and one
    # step wider takes the hoisted chain instead of raising (limit 0, bf16 on sm_75: every w does).
    dtype, mma = POLICIES[policy]
    device = TARGETS[target]
    limit = emulated_ops.tile_kernel_width_limit(dtype, mma == "tf32", device)
    assert limit == WIDTH_LIMITS[target][policy]
    config = dict(in_features=9, out_features=3, num_layers=2, split_size=5)
    if limit > 0:
        _check(emulated_ops, _policy_config("odd_N_wraps", policy, **config, layer_width=limit), dtype, mma,
               batch=20, device=device)
    if limit < 256:
        launches = emulated_ops.launches()
        wider = _policy_config("odd_N_wraps", policy, **config, layer_width=limit + 1)
        tf32_before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = mma == "tf32"
        try:
            _check(emulated_ops, wider, dtype, "auto", batch=20, device=device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32_before
        assert emulated_ops.launches() == launches, "a layer too wide for the target was launched on the native kernels"


def test_smem_attribute_is_set_once_per_device_and_kernel(emulated_ops):
    # Launches of one kernel with different w on one device share one attribute, set to the most
    # any of them needs: no set/set/launch interleaving between host threads.
    device = TARGETS["sm_89"]
    for width in (40, 100, 30):
        config = make_config(**{**CONFIGS["odd_N_wraps"], "layer_width": width}, activation="gelu")
        _check(emulated_ops, config, torch.float16, "wmma", batch=10, device=device)
        if width == 40:
            sets = emulated_ops.attribute_sets()
    assert emulated_ops.attribute_sets() == sets


def test_supports_reports_the_device_limit(emulated_ops, monkeypatch):
    # What CudaBackend.supports() says on a 99 KB part, from the op's own limit (no GPU needed).
    from spinal_ops.backends import cuda
    from spinal_ops.backends.cuda_cost import model_for

    device = TARGETS["sm_86"]
    limits = {(dtype, tf32): emulated_ops.tile_kernel_width_limit(dtype, tf32, device)
              for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.float16, False),
                                  (torch.bfloat16, False))}
    monkeypatch.setattr(cuda, "TILE_KERNEL_MAX_WIDTH", 256)
    monkeypatch.setattr(cuda, "DEVICES", {0: cuda.CudaDevice((8, 6), model_for("NVIDIA GeForce RTX 3090", 82), limits)})
    backend, gpu = cuda.CudaBackend(), torch.device("cuda", 0)
    config = make_config(in_features=40, out_features=7, layer_width=200, num_layers=2)
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert "cost model" in backend.supports(config, torch.float32, gpu).reason
        assert backend.supports(config, torch.bfloat16, gpu).reason == (
            "hoisted cuBLAS chain: w=200 > 192 (the native kernels' shared memory does not fit device 0)")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert backend.supports(config, torch.float32, gpu).reason.startswith("hoisted cuBLAS chain: w=200 > 192")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before


BF16_SM75_REFUSAL = "compute capability 7.5 has no bfloat16 tensor cores (the native kernels need 8.0)"


@pytest.mark.parametrize("name", ["w1_single_layer", "odd_N_wraps", "wrap_s40_N70_two_k_chunks"])
def test_bf16_takes_the_hoisted_chain_before_sm80(emulated_ops, name):
    # sm_75 has no bf16 tensor cores: the op's routing ("auto") sends bf16 to the hoisted chain at every
    # width, narrow layers included (their launch 2 is a bf16 tensor-core kernel), says why, and a forced
    # native run is refused; fp16 and float32 of the same shape run natively there.
    assert emulated_ops.native_kernels_refusal(torch.bfloat16, SM75) == BF16_SM75_REFUSAL
    assert emulated_ops.native_kernels_refusal(torch.float16, SM75) == ""
    assert emulated_ops.native_kernels_refusal(torch.float32, SM75) == ""
    assert all(emulated_ops.native_kernels_refusal(torch.bfloat16, TARGETS[t]) == "" for t in TARGETS if t != "sm_75")
    config = _policy_config(name, "bf16_wmma")
    launches = emulated_ops.launches()
    _check(emulated_ops, config, torch.bfloat16, "auto", batch=70, device=SM75)
    assert emulated_ops.launches() == launches
    for policy in ("wmma", "narrow") if config.layer_width <= 16 else ("wmma",):
        with pytest.raises(RuntimeError, match="routed to the hoisted chain on sm_75"):
            _check(emulated_ops, config, torch.bfloat16, policy, batch=70, device=SM75)
    for dtype in (torch.float16, torch.float32):
        _check(emulated_ops, config, dtype, "auto", batch=70, device=SM75)
        assert emulated_ops.launches() > launches
        launches = emulated_ops.launches()


def test_supports_reports_bf16_before_sm80(emulated_ops, monkeypatch):
    # What CudaBackend.supports() and the path choice say on a T4 (sm_75), from the op's own limits and
    # reasons (no GPU needed).
    from spinal_ops.backends import cuda
    from spinal_ops.backends.cuda_cost import model_for

    limits = {(dtype, tf32): emulated_ops.tile_kernel_width_limit(dtype, tf32, SM75)
              for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.float16, False),
                                  (torch.bfloat16, False))}
    refusals = {dtype: emulated_ops.native_kernels_refusal(dtype, SM75) for dtype in cuda.CUDA_DTYPES}
    refusals = {dtype: reason for dtype, reason in refusals.items() if reason}
    monkeypatch.setattr(cuda, "TILE_KERNEL_MAX_WIDTH", 256)
    monkeypatch.setattr(cuda, "DEVICES", {0: cuda.CudaDevice((7, 5), model_for("Tesla T4", 40), limits, refusals)})
    backend, gpu = cuda.CudaBackend(), torch.device("cuda", 0)
    narrow = make_config(in_features=40, out_features=7, layer_width=8, num_layers=2)
    mid = make_config(in_features=40, out_features=7, layer_width=120, num_layers=2)
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # no TF32 tensor cores on sm_75: float32's limit is SimtMma's
        for config in (narrow, mid):
            support = backend.supports(config, torch.bfloat16, gpu)
            assert support and support.reason == (
                f"hoisted cuBLAS chain: the native kernels do not run on device 0: {BF16_SM75_REFUSAL}")
            assert cuda.cuda_path(config, 64, torch.bfloat16, gpu, True).path == "hoisted"
            assert "cost model" in backend.supports(config, torch.float16, gpu).reason
        assert "cost model" in backend.supports(narrow, torch.float32, gpu).reason
        assert backend.supports(mid, torch.float32, gpu).reason == (
            "hoisted cuBLAS chain: w=120 > 96 (the native kernels' shared memory does not fit device 0)")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    monkeypatch.setattr(cuda, "DEVICES", {0: cuda.CudaDevice((7, 0), model_for("Tesla V100", 80), {}, {})})
    assert backend.supports(narrow, torch.float16, gpu).reason == "needs compute capability >= 7.5, device 0 has 7.0"


def test_empty_batch_launches_nothing(emulated_ops):
    config = make_config(**CONFIGS["odd_N_wraps"])
    params = random_params(config, torch.Generator().manual_seed(0), dtype=torch.float32)
    x = torch.empty(0, config.in_features)
    launches = emulated_ops.launches()
    out, pre = emulated_ops.forward(x, *params, "relu", 0.0, "auto", SM90, True)
    grads = emulated_ops.backward(torch.empty(0, config.output_features), x, pre, params.weight_in,
                                  params.weight_hidden, params.weight_out, True, "relu", 0.0, "auto", SM90)
    assert emulated_ops.launches() == launches
    assert out.shape == (0, config.output_features) and pre.shape == (0, config.hidden_features)
    assert all(torch.count_nonzero(g) == 0 for g in grads[1:])


# ---- the model's own tests: seeded bugs it must catch --------------------------------------


@pytest.mark.parametrize("bug, message", [
    ("unwritten_smem", "initcheck: read of shared memory not written"),
    ("misaligned_ldm", "ldm 36 is not a multiple of 8"),
    ("fragment_order", "of the tile read wrong"),
])
def test_seeded_bug_in_small_kernel_is_caught(emulated_ops, bug, message):
    assert message in emulated_ops.seeded_bug(bug)


# Shapes that need every barrier: M > 32, L*w > 32 and w > 32 (several K-chunks everywhere, and
# a SIMT store and epilogue that map elements to different threads); M = 0 with w > 128 (the
# second dZ chunk runs no K-loop after the first's epilogue); chunks of x that no window reads
# (no K-loop either); 600 rows (split-K weight gradients).
BARRIER_SWEEP = [
    (dict(in_features=70, out_features=40, layer_width=33, num_layers=3, split_size=40), 40),
    (dict(in_features=12, out_features=None, layer_width=130, num_layers=1), 40),
    (CONFIGS["columns_no_window_reads"], 40),
    (CONFIGS["odd_N_wraps"], 600),
]


def _orders_global_memory_only(site):
    """The barrier after __threadfence in the split-K protocol orders each thread's global partials
    before thread 0 takes the ticket: an inter-CTA ordering, which only some schedules of the
    concurrent CTAs expose (compute-sanitizer on a GPU does not see it at all), so this one-seed
    sweep leaves it to test_removed_sync_before_split_k_ticket_is_caught, over several seeds."""
    path, line = site.rsplit(":", 1)
    with open(path) as source:
        lines = source.read().splitlines()
    return "__threadfence" in lines[int(line) - 2]


def _barriers_missed_by(ops, sites, runs, device=SM90, dropout_seed=None):
    """The barrier sites of `sites` whose removal no run of `runs` (config, dtype, policy, batch) on
    `device` (training calls with that dropout seed, if given) notices: a racecheck or initcheck
    failure, or a wrong or unwritten result, counts as noticed."""
    missed = []
    for site in sites:
        ops.configure(SEED, site, False)
        try:
            for config, dtype, policy, batch in runs:
                try:
                    _check(ops, config, dtype, policy, batch=batch, device=device, dropout_seed=dropout_seed)
                except RuntimeError as error:
                    assert "racecheck" in str(error) or "initcheck" in str(error), str(error)
                    break
                except AssertionError:  # a wrong or unwritten result
                    break
            else:
                missed.append(os.path.relpath(site, os.path.dirname(HERE)))
        finally:
            ops.configure(SEED, "", False)
    return missed


# fp32 (SimtMma) and bf16 (64-row WMMA tiles) on sm_90; fp16 in sm_75's 32-row WMMA tiles.
@pytest.mark.parametrize("target, policy", [("sm_90", "fp32_simt"), ("sm_90", "bf16_wmma"), ("sm_75", "fp16_wmma")])
def test_every_removed_syncthreads_is_caught(emulated_ops, target, policy):
    # Each __syncthreads the kernels reach, removed in turn from every CTA, must fail a run.
    dtype, mma = POLICIES[policy]
    device = TARGETS[target]
    smooth = dtype != torch.float32  # see _policy_config
    configs = [(make_config(**shape, activation="gelu" if smooth else "relu"), batch) for shape, batch in BARRIER_SWEEP]
    emulated_ops.configure(SEED, "", False)
    for config, batch in configs:
        _check(emulated_ops, config, dtype, mma, batch=batch, device=device)
    sites = [s for s in emulated_ops.barrier_sites() if not _orders_global_memory_only(s)]
    assert len(sites) >= 12, sites
    missed = _barriers_missed_by(emulated_ops, sites, [(config, dtype, mma, batch) for config, batch in configs],
                                 device)
    assert missed == [], f"removing the barrier at {missed} went unnoticed (seed {SEED})"


def test_every_removed_narrow_syncthreads_is_caught(emulated_ops):
    # The narrow kernels' barriers (forward and data gradients), each removed in turn, on a shape
    # with several chunks and layers and a column chunk that no window reads; the tiled launch 2's
    # barriers are swept above.
    config = make_config(**NARROW_CONFIGS["w16_M16_s_wraps_partial_chunk"])
    gaps = make_config(**NARROW_CONFIGS["columns_no_window_reads"])
    emulated_ops.configure(SEED, "", False)
    for case in (config, gaps):
        _check(emulated_ops, case, torch.float32, "narrow", batch=150)
    sites = [s for s in emulated_ops.barrier_sites() if "narrow_kernels" in s]
    assert len(sites) == 8, sites
    missed = _barriers_missed_by(emulated_ops, sites,
                                     [(case, torch.float32, "narrow", 150) for case in (config, gaps)])
    assert missed == [], f"removing the barrier at {missed} went unnoticed (seed {SEED})"


@pytest.mark.parametrize("policy", ["fp32_simt", "bf16_wmma"])
def test_every_removed_dropout_syncthreads_is_caught(emulated_ops, policy):
    # The barriers only a dropout reaches (launch 1's parked dH and per-layer dx), each removed in
    # turn, on shapes with a projection, L > 1, two z chunks (bf16) and two column chunks of x.
    dtype, mma = POLICIES[policy]
    shape = CONFIGS["two_z_chunks_M_and_N_over_128" if dtype != torch.float32 else "wrap_s40_N70_two_k_chunks"]
    config = _dropout_config(shape, dtype, mma)
    emulated_ops.configure(SEED, "", False)
    _check(emulated_ops, make_config(**shape, activation=config.activation), dtype, mma, batch=40)
    plain = set(emulated_ops.barrier_sites())
    emulated_ops.configure(SEED, "", False)
    _check(emulated_ops, config, dtype, mma, batch=40, dropout_seed=DROPOUT_SEED)
    sites = sorted(set(emulated_ops.barrier_sites()) - plain)
    assert len(sites) == 2, sites
    missed = _barriers_missed_by(emulated_ops, sites, [(config, dtype, mma, 40)], dropout_seed=DROPOUT_SEED)
    assert missed == [], f"removing the barrier at {missed} went unnoticed (seed {SEED})"


def test_split_k_counters_not_reset_are_caught(emulated_ops):
    emulated_ops.configure(SEED, "", True)
    try:
        with pytest.raises(AssertionError, match="NaN"):
            _check(emulated_ops, make_config(**CONFIGS["odd_N_wraps"], activation="gelu"), torch.float32, "simt",
                   batch=600)
    finally:
        emulated_ops.configure(SEED, "", False)


# ---- concurrent CTAs: co-residency, the schedule, memory ordering --------------------------
# The model runs a grid's CTAs concurrently, as many at once as the target holds, switching
# between them at atomics, spin-waits, barrier releases and exits in an order drawn from the seed
# (cuda_shim.h). The seeded bugs below are inter-CTA ones: invisible when CTAs run one after
# another, caught here.

# (device, threads, dynamic smem) -> CTAs per SM: emulated_runtime.h's limits and register budget.
CTAS_PER_SM = [
    ("sm_90", 256, 117 * 1024, 1),  # backward launch 1 at its widest (backward_kernels.cuh): smem
    ("sm_90", 256, 52 * 1024, 3),   # launch 2: 80 registers x 256 threads, 3 x 20480 of 65536
    ("sm_90", 128, 30 * 1024, 3),   # the narrow kernels: their register cap of 3 CTAs per SM
    ("sm_75", 128, 28 * 1024, 2),   # T4: 64 KB holds 2 CTAs of NarrowSmem (narrow_kernels.cuh)
    ("sm_75", 32, 40 * 1024, 1),    # grid_sync below
    ("sm_86", 256, 0, 3),           # registers; threads (1536) would allow 6
    ("sm_80", 32, 0, 32),           # the CTA limit per SM
]


@pytest.mark.parametrize("target, threads, smem, expected", CTAS_PER_SM)
def test_co_residency_per_sm(emulated_ops, target, threads, smem, expected):
    assert emulated_ops.ctas_per_sm(TARGETS[target], threads, smem) == expected


def test_only_co_resident_ctas_run_at_once(emulated_ops):
    # 100 CTAs of grid_sync on sm_75 (40 SMs x 1): the first 40 wait for each other, so all 40 run
    # at once; the other 60 start only as those exit, so never more than 40 run.
    message, most = emulated_ops.sync_kernel("grid_sync", SM75, 100)
    assert message == "" and most == 40
    assert list(emulated_ops.last_launch()[:3]) == [100, 40, 40]


@pytest.mark.parametrize("grid", [41, 60])
def test_spin_on_ctas_never_scheduled_is_a_deadlock(emulated_ops, grid):
    # A grid barrier over more CTAs than fit at once: the resident ones spin forever on CTAs that
    # cannot start. The model fails with the kernel and the co-residency numbers instead of hanging;
    # the same kernel over exactly the co-resident count passes.
    message, _ = emulated_ops.sync_kernel("grid_sync_all", SM75, grid)
    assert "deadlock: " in message and "GridSyncArgs kernel on sm_75" in message, message
    assert f"grid of {grid} CTAs, 40 co-resident (40 SMs x 1 CTAs/SM" in message, message
    assert f"{grid - 40} never started" in message, message
    assert emulated_ops.sync_kernel("grid_sync_all", SM75, 40) == ("", 40)


HANDOFF_SEEDS = 4


def test_ready_flag_handoff_between_ctas(emulated_ops):
    # 32 producer CTAs store a tile, fence, meet at a barrier and raise a ready flag; 32 consumer CTAs
    # spin on it and read the tile. As written it passes every schedule (seed); each seeded bug fails:
    #   the fence removed: the stores stay unpublished (the memory model), whatever the schedule;
    #   the flag raised before the other threads stored (barrier removed): the schedules where a
    #   producer is parked after its flag and its consumer reads first (about 97% of the seeds with 32
    #   pairs: tests/cuda_emulation/sync_kernels.h), so it must fail on at least one of the seeds.
    missed = []
    try:
        for seed in range(SEED, SEED + HANDOFF_SEEDS):
            emulated_ops.configure(seed, "", False)
            assert emulated_ops.sync_kernel("handoff", SM90, 64) == ("", 64)
            assert "not stored, or not published" in emulated_ops.sync_kernel("handoff_no_fence", SM90, 64)[0]
            early = emulated_ops.sync_kernel("handoff_flag_before_tile", SM90, 64)[0]
            if "not stored, or not published" not in early:
                assert early == "", early
                missed.append(seed)
    finally:
        emulated_ops.configure(SEED, "", False)
    assert len(missed) < HANDOFF_SEEDS, f"a flag raised before its tile was stored went unnoticed (seeds {missed})"


def _split_k_ticket_sites(ops, dtype, mma, config):
    """The sites ("file:line", as the model names them) of the fence after the split-K partial stores
    and of the barrier between it and the ticket, from a split-K run that reaches them."""
    path = os.path.join(os.path.dirname(HERE), "csrc", "cuda", "backward_kernels.cuh")
    with open(path) as source:
        lines = source.read().splitlines()
    fence = next(i for i, line in enumerate(lines) if "publish the partial before taking a ticket" in line)
    assert lines[fence].strip().startswith("__threadfence();") and lines[fence + 1].strip() == "__syncthreads();"
    ops.configure(SEED, "", False)
    _check(ops, config, dtype, mma, batch=600)
    sites = [s for s in ops.barrier_sites() if s.endswith(f"backward_kernels.cuh:{fence + 2}")]
    assert len(sites) == 1, ops.barrier_sites()
    return sites[0][: -len(str(fence + 2))] + str(fence + 1), sites[0]


SPLIT_K_BUG_SEEDS = 2


@pytest.mark.parametrize("policy", ["fp32_simt", "bf16_wmma"])
def test_removed_sync_before_split_k_ticket_is_caught(emulated_ops, policy):
    # The fence removed: the partials of the CTAs that are not last stay unpublished (the model's
    # buffered stores: tile_partials is a GlobalPtr), so the last CTA of each tile sums poisoned values
    # whatever the schedule.
    # The barrier removed: thread 0 takes the tile's ticket while the CTA's other threads have not
    # stored their partials; when the schedule lets the last CTA of the tile reduce before they do
    # (the CTA that took the ticket is parked with probability 1/2), it reads poisoned partials: each
    # of 20 seeds tried did, so it must on at least one of SPLIT_K_BUG_SEEDS. The kernel as written
    # passes the same schedules.
    dtype, mma = POLICIES[policy]
    config = _policy_config("odd_N_wraps", policy, activation="gelu")
    fence, barrier = _split_k_ticket_sites(emulated_ops, dtype, mma, config)
    caught = []
    try:
        emulated_ops.configure(SEED, fence, False)
        with pytest.raises(AssertionError, match="NaN"):
            _check(emulated_ops, config, dtype, mma, batch=600)
        for seed in range(SEED, SEED + SPLIT_K_BUG_SEEDS):
            emulated_ops.configure(seed, barrier, False)
            try:
                _check(emulated_ops, config, dtype, mma, batch=600)
            except AssertionError as error:
                assert "NaN" in str(error) or "weight" in str(error), str(error)
                caught.append(seed)
            emulated_ops.configure(seed, "", False)
            _check(emulated_ops, config, dtype, mma, batch=600)  # the kernel as written, same schedule
    finally:
        emulated_ops.configure(SEED, "", False)
    assert caught, f"removing {barrier} went unnoticed by seeds {SEED}..{SEED + SPLIT_K_BUG_SEEDS - 1}"


# ---- the persistent forward (persistent_forward.cuh) ----------------------------------------
# One launch over all SMs for any w: work units taken in dependency order from a ticket counter,
# handed between CTAs through an fp32 state buffer and per-(layer, row tile) ready counters. Its
# outputs and Z against the float64 reference, the backward (the persistent launch 1 and the tile
# launch 2, as register.cu routes it under the switch) on its Z; the schedule from several seeds;
# seeded bugs in its hand-off and a grid that outgrows co-residency.

PERSISTENT_POLICIES = {
    "fp32_simt": (torch.float32, "persistent_simt"),
    "fp32_tf32": (torch.float32, "persistent_tf32"),
    "fp16_wmma": (torch.float16, "persistent_wmma"),
    "bf16_wmma": (torch.bfloat16, "persistent_wmma"),
}
# w = 8: one padded column tile; 200: a partial second column tile and K chunks; 320, 512: beyond
# the tile kernel (3 and 4 column tiles); windows that wrap; M = None, no bias; L = 1 with M > 128.
PERSISTENT_CONFIGS = {
    "w8_padding_wraps": dict(in_features=12, out_features=5, layer_width=8, num_layers=3, split_size=7),
    "w200_odd_tile_wraps": dict(in_features=70, out_features=10, layer_width=200, num_layers=2, split_size=40),
    "w320_no_projection_no_bias": dict(in_features=30, out_features=None, layer_width=320, num_layers=2,
                                       split_size=17, bias=False),
    "w512_single_layer_M130": dict(in_features=40, out_features=130, layer_width=512, num_layers=1, split_size=40),
}


def _pre_activation(x, params, config):
    """Z = [z_0, ..., z_{L-1}] of the reference chain, in x's dtype (eager) or float64."""
    from spinal_ops.activations import apply_activation
    from spinal_ops.reference import input_window

    z_all, h = [], None
    for layer in range(config.num_layers):
        bias = None if params.bias is None else params.bias[layer]
        z = torch.nn.functional.linear(input_window(x, config, layer), params.weight_in[layer], bias)
        if layer > 0:
            z = z + torch.nn.functional.linear(h, params.weight_hidden[layer - 1])
        h = apply_activation(config.activation, z, config.negative_slope)
        z_all.append(z)
    return torch.cat(z_all, dim=-1)


def _check_persistent(ops, config, policy, batch, device):
    """The persistent forward's output and Z against the float64 reference (the rule _check holds
    outputs to), its inference run (no Z) against the training one bit for bit, and _check's
    gradients from the persistent backward launch 1 and launch 2 on its Z."""
    dtype, mma = PERSISTENT_POLICIES[policy]
    _check(ops, config, dtype, mma, batch=batch, device=device)
    generator = torch.Generator().manual_seed(3)
    params64 = SpinalParams(*(None if p is None else p.to(dtype).double() for p in random_params(config, generator)))
    x64 = torch.randn(batch, config.in_features, generator=generator, dtype=torch.float64).to(dtype).double()
    params = SpinalParams(*(None if p is None else p.to(dtype) for p in params64))
    out, z = ops.forward(x64.to(dtype), *params, config.activation, config.negative_slope, mma, device, True)
    inferred, no_z = ops.forward(x64.to(dtype), *params, config.activation, config.negative_slope, mma, device, False)
    assert no_z.numel() == 0 and torch.equal(inferred, out)
    expected = _pre_activation(x64, params64, config)
    eager = _pre_activation(x64.to(dtype), params, config)
    atol_per_scale = ATOL_TF32 if mma == "persistent_tf32" else ATOL_PER_SCALE[dtype]
    for name, got, ref, eag in (("Z", z, expected, eager),
                                ("output", out, _output_of(expected, params64, config), _output_of(eager, params, config))):
        assert not got.isnan().any(), f"{policy} {name}: NaN (an element the kernel did not write; seed {SEED})"
        atol = atol_per_scale * max(1.0, ref.abs().max().item())
        err = (got.double() - ref).abs().max().item()
        err_eager = (eag.double() - ref).abs().max().item()
        assert err <= 2 * err_eager + atol, (
            f"{policy} {name} on device {device}, seed {SEED}: {err:.3e} > 2*{err_eager:.3e} + {atol:.1e}")


def _output_of(z, params, config):
    """y = phi(Z) W_out^T + b_out, or H = phi(Z) without projection."""
    from spinal_ops.activations import apply_activation

    hidden = apply_activation(config.activation, z, config.negative_slope)
    if params.weight_out is None:
        return hidden
    return torch.nn.functional.linear(hidden, params.weight_out, params.bias_out)


def _persistent_config(name, policy, **overrides):
    if PERSISTENT_POLICIES[policy] != (torch.float32, "persistent_simt"):
        overrides.setdefault("activation", "gelu")  # see _policy_config
    return make_config(**{**PERSISTENT_CONFIGS[name], **overrides})


# sm_90 for every case, sm_86 (99 KB of shared memory per block, 84 SMs) for fp32 SIMT and bf16.
PERSISTENT_CASES = [("sm_90", name, policy) for name in PERSISTENT_CONFIGS for policy in PERSISTENT_POLICIES]
PERSISTENT_CASES += [("sm_86", name, policy) for name in PERSISTENT_CONFIGS for policy in ("fp32_simt", "bf16_wmma")]


@pytest.mark.parametrize("target, name, policy", PERSISTENT_CASES)
def test_persistent_forward_matches_reference(emulated_ops, target, name, policy):
    # 70 rows: three row tiles for float32 (32 rows), two for the half types (64), the last partial.
    _check_persistent(emulated_ops, _persistent_config(name, policy), policy, batch=70, device=TARGETS[target])


@pytest.mark.parametrize("activation", ["leaky_relu", "tanh"])
def test_persistent_forward_activations(emulated_ops, activation):
    config = _persistent_config("w200_odd_tile_wraps", "fp32_simt", activation=activation, negative_slope=0.2)
    _check_persistent(emulated_ops, config, "fp32_simt", batch=40, device=SM90)


@pytest.mark.parametrize("policy", ["fp32_simt", "bf16_wmma"])
def test_persistent_forward_splits_a_long_window(emulated_ops, policy):
    # s = 520 at 40 rows: the input units alone would leave most CTAs idle, so the launcher splits s
    # into 3 pieces (192, 192, 136 columns; layer 0 then gets input units too) that the layer units
    # sum in a fixed order; the window wraps.
    config = _persistent_config("w8_padding_wraps", policy, in_features=600, layer_width=40, num_layers=2,
                                split_size=520)
    _check_persistent(emulated_ops, config, policy, batch=40, device=SM90)
    row_tiles = 2 if policy == "fp32_simt" else 1
    assert emulated_ops.last_launch()[0] == row_tiles * (2 * (3 + 1) + 1)  # 2 layers x (3 pieces + 1), projection


PERSISTENT_SCHEDULE = dict(in_features=90, out_features=20, layer_width=300, num_layers=3, split_size=50)


@pytest.mark.parametrize("seed", [SEED + 1, SEED + 2, SEED + 3])
@pytest.mark.parametrize("policy", ["fp32_simt", "bf16_wmma"])
def test_persistent_forward_schedules(emulated_ops, policy, seed):
    # Each seed draws another CTA start order and schedule: units wait on their producers in other
    # orders (130 rows: 5 or 3 row tiles, 3 column tiles, 3 layers).
    dtype, _ = PERSISTENT_POLICIES[policy]
    emulated_ops.configure(seed, "", False)
    try:
        config = make_config(**PERSISTENT_SCHEDULE, activation="relu" if dtype == torch.float32 else "gelu")
        _check_persistent(emulated_ops, config, policy, batch=130, device=SM90)
        grid, resident, most = emulated_ops.last_launch()[:3]
        assert most > 1 and grid <= resident, (grid, resident, most)
    finally:
        emulated_ops.configure(SEED, "", False)


def _persistent_signal_sites(ops):
    """The sites ("file:line") of the fence after a finished tile's stores and of the barrier between
    it and the ready counter's increment, from a run that reaches them."""
    path = os.path.join(os.path.dirname(HERE), "csrc", "cuda", "persistent_units.cuh")
    with open(path) as source:
        lines = source.read().splitlines()
    fence = next(i for i, line in enumerate(lines) if "publish this thread's stores of the tile" in line)
    assert lines[fence].strip().startswith("__threadfence();") and lines[fence + 1].strip().startswith("__syncthreads();")
    ops.configure(SEED, "", False)
    _check_persistent(ops, make_config(**PERSISTENT_SCHEDULE), "fp32_simt", batch=130, device=SM90)
    sites = [s for s in ops.barrier_sites() if s.endswith(f"persistent_units.cuh:{fence + 2}")]
    assert len(sites) == 1, ops.barrier_sites()
    return sites[0][: -len(str(fence + 2))] + str(fence + 1), sites[0]


PERSISTENT_BUG_SEEDS = 3


def _seeds_catching(ops, site, run):
    """The first seed of SEED.. (at most PERSISTENT_BUG_SEEDS) on which run() fails an assertion with
    the barrier or fence at `site` removed, in a list (empty: none did); run() passes on each seed
    tried with the kernels as written."""
    caught = []
    try:
        for seed in range(SEED, SEED + PERSISTENT_BUG_SEEDS):
            ops.configure(seed, site, False)
            try:
                run()
            except AssertionError:
                caught.append(seed)
            ops.configure(seed, "", False)
            run()
            if caught:
                break
    finally:
        ops.configure(SEED, "", False)
    return caught


@pytest.mark.parametrize("bug", ["fence", "barrier"])
def test_persistent_ready_counter_before_the_tile_is_caught(emulated_ops, bug):
    # The fence removed: a finished tile's stores stay in its CTA's buffers (the state buffer is a
    # GlobalPtr) when thread 0 raises the ready counter, so a consumer scheduled before the producer's
    # next fence reads poisoned P or h. The barrier removed: thread 0 raises the counter while the
    # CTA's other threads have not stored their part. Either must fail on at least one seed; the
    # kernel as written passes the same schedules.
    config = make_config(**PERSISTENT_SCHEDULE)
    sites = dict(zip(("fence", "barrier"), _persistent_signal_sites(emulated_ops)))
    caught = _seeds_catching(emulated_ops, sites[bug],
                             lambda: _check_persistent(emulated_ops, config, "fp32_simt", batch=130, device=SM90))
    assert caught, f"removing {sites[bug]} went unnoticed by seeds {SEED}..{SEED + PERSISTENT_BUG_SEEDS - 1}"


def test_persistent_grid_beyond_co_residency_with_a_grid_wait_deadlocks(emulated_ops):
    # The persistent forward behind a grid-wide wait (every CTA arrives before any takes a unit) on
    # sm_75, whose 40 SMs hold one CTA each: on the co-resident grid the launcher sizes (40 CTAs for
    # 60 units) it computes the forward; on one CTA per unit the 40 resident CTAs wait for 20 that can
    # never start, and the model reports the deadlock instead of hanging. The kernel as shipped takes
    # no such wait: a CTA waits only on units earlier in ticket order, taken by running CTAs.
    config = make_config(in_features=30, out_features=9, layer_width=8, num_layers=6, split_size=7, bias=False)
    params = random_params(config, torch.Generator().manual_seed(4), dtype=torch.float32)
    x = torch.randn(130, config.in_features, generator=torch.Generator().manual_seed(5))
    units = 5 + 2 * 5 * 5 + 5  # 5 row tiles: layer 0, then 5 input and 5 layer units per later layer, projection
    message, out = emulated_ops.persistent_grid_wait(x, params.weight_in, params.weight_hidden, params.weight_out,
                                                     SM75, 0)
    assert message == "" and list(emulated_ops.last_launch()[:2]) == [40, 40]
    expected, _ = emulated_ops.forward(x, *params, "relu", 0.0, "persistent_simt", SM75, False)
    assert torch.equal(out, expected)
    message, _ = emulated_ops.persistent_grid_wait(x, params.weight_in, params.weight_hidden, params.weight_out,
                                                   SM75, units)
    assert "deadlock: " in message and f"grid of {units} CTAs, 40 co-resident" in message, message
    assert f"{units - 40} never started" in message, message


def test_persistent_switch_picks_the_native_pair(emulated_ops, monkeypatch):
    # With SPINAL_OPS_CUDA_PERSISTENT=1 the path choice sends inference and training at every width to
    # the native pair (whose forward and backward launch 1 are then the persistent kernels); dropout
    # keeps the hoisted pair. Without it nothing changes.
    from spinal_ops.backends import cuda
    from spinal_ops.backends.cuda_cost import model_for

    limits = {(dtype, tf32): emulated_ops.tile_kernel_width_limit(dtype, tf32, SM90)
              for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.float16, False),
                                  (torch.bfloat16, False))}
    monkeypatch.setattr(cuda, "DEVICES", {0: cuda.CudaDevice((9, 0), model_for("NVIDIA H100 80GB HBM3", 132), limits)})
    gpu = torch.device("cuda", 0)
    wide = make_config(in_features=512, out_features=10, layer_width=512, num_layers=4)
    mid = make_config(in_features=512, out_features=10, layer_width=256, num_layers=4)
    assert cuda.cuda_path(wide, 64, torch.bfloat16, gpu, False).path == "hoisted"
    monkeypatch.setenv("SPINAL_OPS_CUDA_PERSISTENT", "1")
    for config, training, path in ((wide, False, "native"), (wide, True, "native"), (mid, True, "native")):
        assert cuda.cuda_path(config, 64, torch.bfloat16, gpu, training).path == path, (config.layer_width, training)
    dropped = make_config(in_features=512, out_features=10, layer_width=256, num_layers=4, dropout=0.1)
    assert cuda.cuda_path(dropped, 64, torch.bfloat16, gpu, True).path == "hoisted"


# ---- the persistent backward launch 1 (persistent_backward.cuh) ------------------------------
# dZ and dx in one launch for any w: layer units from layer L-1 down to 0, then dx units, handed
# between CTAs through an fp32 dZ buffer and per-(layer, row tile) ready counters; launch 2 follows
# on its dZ workspace. Every gradient against the float64 reference (_check), on grids from one
# CTA to one per unit, and its seeded hand-off bugs.

# w = 160: a partial second column tile; 300: three. N = 150 and 131: two dx column tiles, the
# last window wrapping past column N - 1; M = 150: five K-chunks of g; M = None, no bias.
PERSISTENT_BACKWARD_CONFIGS = {
    "w160_N150_wraps": dict(in_features=150, out_features=20, layer_width=160, num_layers=3, split_size=70),
    "w300_no_projection_odd_N": dict(in_features=131, out_features=None, layer_width=300, num_layers=3,
                                     split_size=61, bias=False),
    "w300_M150": dict(in_features=90, out_features=150, layer_width=300, num_layers=2, split_size=50),
}


def _persistent_backward_config(name, policy, **overrides):
    if PERSISTENT_POLICIES[policy] != (torch.float32, "persistent_simt"):
        overrides.setdefault("activation", "gelu")  # see _policy_config
    return make_config(**{**PERSISTENT_BACKWARD_CONFIGS[name], **overrides})


def _data_grad_launch(ops):
    """(grid, kernel) of the last call's launch 1, after checking that launch 2 followed it."""
    names, grids, _ = ops.launched_kernels()
    short = [n.split("<")[0].split("::")[-1] for n in names]
    assert short[-2:] == ["spinal_persistent_data_grad_kernel", "spinal_weight_grad_kernel"], short
    return grids[-2]


@pytest.mark.parametrize("policy", sorted(PERSISTENT_POLICIES))
@pytest.mark.parametrize("name", sorted(PERSISTENT_BACKWARD_CONFIGS))
def test_persistent_backward_matches_reference(emulated_ops, name, policy):
    # 70 rows: three row tiles for float32, two for the half types; sm_90's 132 SMs: one CTA per unit.
    dtype, mma = PERSISTENT_POLICIES[policy]
    config = _persistent_backward_config(name, policy)
    emulated_ops.launched_kernels()
    _check(emulated_ops, config, dtype, mma, batch=70, device=SM90)
    row_tiles = 3 if dtype == torch.float32 else 2
    col_tiles, x_tiles = -(-config.layer_width // 128), -(-config.in_features // 128)
    assert _data_grad_launch(emulated_ops) == row_tiles * (config.num_layers * col_tiles + x_tiles)


@pytest.mark.parametrize("activation", ["leaky_relu", "gelu_tanh", "silu", "tanh", "sigmoid", "identity"])
def test_persistent_backward_activations(emulated_ops, activation):
    config = _persistent_backward_config("w160_N150_wraps", "fp32_simt", activation=activation, negative_slope=0.2)
    _check(emulated_ops, config, torch.float32, "persistent_simt", batch=40, device=SM90)


# (target, policy) on one SM: sm_75 holds one fp32 CTA (38 KB of its 64 KB), so the grid is one CTA
# running every unit in ticket order; sm_90 holds a few, fewer than the units.
PERSISTENT_BACKWARD_GRIDS = [("sm_75", "fp32_simt", 1), ("sm_75", "fp16_wmma", 2), ("sm_90", "fp32_simt", None),
                             ("sm_90", "bf16_wmma", None)]


@pytest.mark.parametrize("seed", [SEED + 1, SEED + 2])
@pytest.mark.parametrize("target, policy, grid", PERSISTENT_BACKWARD_GRIDS)
def test_persistent_backward_small_grids(emulated_ops, target, policy, grid, seed):
    # Fewer CTAs than units: each CTA takes ticket after ticket, units wait on producers that other CTAs
    # (or the same one, earlier) ran; each seed another start order and schedule. 300 rows: launch 2
    # splits its rows, so the split-K counters launch 1 zeroes are used too.
    dtype, mma = PERSISTENT_POLICIES[policy]
    config = _persistent_backward_config("w300_no_projection_odd_N", policy)
    emulated_ops.configure(seed, "", False)
    emulated_ops.set_sm_count(1)
    try:
        emulated_ops.launched_kernels()
        _check(emulated_ops, config, dtype, mma, batch=300, device=TARGETS[target])
        launched = _data_grad_launch(emulated_ops)
        row_tiles = -(-300 // (32 if dtype == torch.float32 or target == "sm_75" else 64))
        units = row_tiles * (3 * 3 + 2)
        assert launched == grid if grid is not None else 1 < launched < units, (launched, units)
    finally:
        emulated_ops.set_sm_count(0)
        emulated_ops.configure(SEED, "", False)


def test_persistent_backward_zeroes_split_k_counters(emulated_ops):
    # 600 rows on sm_90: launch 2 splits its rows, and its ticket counters, poisoned to -1, are zeroed by
    # the persistent launch 1; with that zeroing dropped (the model's seeded bug) no CTA sums a tile's
    # partials and the gradients stay NaN.
    config = _persistent_backward_config("w160_N150_wraps", "bf16_wmma")
    _check(emulated_ops, config, torch.bfloat16, "persistent_wmma", 600, SM90)
    emulated_ops.configure(SEED, "", True)
    try:
        with pytest.raises(AssertionError, match="NaN"):
            _check(emulated_ops, config, torch.bfloat16, "persistent_wmma", 600, SM90)
    finally:
        emulated_ops.configure(SEED, "", False)


@pytest.mark.parametrize("bug", ["fence", "barrier"])
def test_persistent_backward_ready_counter_before_the_tile_is_caught(emulated_ops, bug):
    # As test_persistent_ready_counter_before_the_tile_is_caught, in launch 1 alone: Z comes from the
    # tile forward (no ready counters), so only the backward runs without the fence or the barrier
    # before its ready counters; a consumer (layer l-1 or dx) then reads poisoned dZ on some seed.
    config = _persistent_backward_config("w160_N150_wraps", "fp32_simt")
    sites = dict(zip(("fence", "barrier"), _persistent_signal_sites(emulated_ops)))
    caught = _seeds_catching(emulated_ops, sites[bug], lambda: _check(
        emulated_ops, config, torch.float32, "persistent_simt", 130, SM90, forward_policy="simt"))
    assert caught, f"removing {sites[bug]} went unnoticed by seeds {SEED}..{SEED + PERSISTENT_BUG_SEEDS - 1}"


def test_persistent_backward_is_opt_in(emulated_ops, monkeypatch):
    # The op's routing ("auto") runs launch 1 on the persistent kernel only under
    # SPINAL_OPS_CUDA_PERSISTENT=1 and without a dropout; launch 2 is the tiled one after every launch 1.
    def data_grad_kernel(config, dtype=torch.float32, dropout_seed=None):
        emulated_ops.launched_kernels()
        _check(emulated_ops, config, dtype, "auto", 37, SM90, dropout_seed=dropout_seed)
        names = [n.split("<")[0].split("::")[-1] for n in emulated_ops.launched_kernels()[0]]
        assert names[-1] == "spinal_weight_grad_kernel", names
        return names[-2]

    config = _persistent_backward_config("w160_N150_wraps", "fp32_simt")
    monkeypatch.delenv("SPINAL_OPS_CUDA_PERSISTENT", raising=False)
    assert data_grad_kernel(config) == "spinal_data_grad_kernel"
    monkeypatch.setenv("SPINAL_OPS_CUDA_PERSISTENT", "1")
    assert data_grad_kernel(config) == "spinal_persistent_data_grad_kernel"
    assert data_grad_kernel(_persistent_backward_config("w160_N150_wraps", "bf16_wmma"), torch.bfloat16) == (
        "spinal_persistent_data_grad_kernel")
    dropped = _persistent_backward_config("w160_N150_wraps", "fp32_simt", dropout=DROPOUT_P)
    assert data_grad_kernel(dropped, dropout_seed=DROPOUT_SEED) == "spinal_data_grad_kernel"
    # Wider than the tile kernels, on the persistent forward's Z: "auto" is the "persistent_simt"
    # policy's backward bit for bit.
    wide = _persistent_backward_config("w300_M150", "fp32_simt")
    params = random_params(wide, torch.Generator().manual_seed(6), dtype=torch.float32)
    x = torch.randn(37, wide.in_features)
    grad_out = torch.randn(37, wide.output_features)
    _, pre = emulated_ops.forward(x, *params, "relu", 0.0, "persistent_simt", SM90, True)
    runs = [emulated_ops.backward(grad_out, x, pre, params.weight_in, params.weight_hidden, params.weight_out, True,
                                  "relu", 0.0, policy, SM90) for policy in ("auto", "persistent_simt")]
    assert all(torch.equal(a, b) for a, b in zip(*runs))

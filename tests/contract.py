"""The numerical contract (docs/contract.md §4), shared by every backend's tests.

For the output and each gradient: err_backend <= 2 * err_eager + atol, where errors are
max-abs differences from the reference computed in float64 on the same values, err_eager is
the reference run in the backend's dtype on the backend's device, and atol is a small
multiple of the reference's scale.
"""
from __future__ import annotations

import concurrent.futures
import unittest.mock

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.utils._python_dispatch
import torch.utils.checkpoint

from spinal_ops.config import SpinalConfig, SpinalParams
from spinal_ops.functional import apply_spinal, spinal_linear

# atol = ATOL_PER_SCALE[dtype] * max(1, max|reference|). For the half types it is half a unit in
# the last place at the scale (2^-8 for bfloat16, 2^-11 for float16): the result itself is stored
# in that dtype, and its final rounding alone can cost that much where eager happens to round
# closer (seen on an H100: a bfloat16 bias gradient of 37 rows, both within one ulp).
ATOL_PER_SCALE = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}

GRAD_NAMES = ("x", "weight_in", "weight_hidden", "bias", "weight_out", "bias_out")

# The edge-case matrix of every backend's tests: name -> SpinalConfig.build keyword arguments. Each
# backend's tests select the cases that reach its branches by name. N = in_features, M =
# out_features, w = layer_width, L = num_layers, s = split_size (ceil(N / num_splits) when not
# given, num_splits = 2 by default); layer l reads the columns (l*s + j) mod N, j < s.
CASES: dict[str, dict] = {
    # ---- small: every branch of the chain, at sizes gradcheck and the Triton interpreter afford ----
    # odd N, k = 2: s = 4, layers 1 and 2 wrap past N (a window of two column ranges).
    "odd_N_wraps": dict(in_features=7, out_features=3, layer_width=5, num_layers=3),
    # k = 1: s = N, every layer reads all of x.
    "k1": dict(in_features=5, out_features=2, layer_width=3, num_layers=3, num_splits=1),
    # k = 3, s = 3 divides N: the windows cycle through x without wrapping.
    "k3": dict(in_features=9, out_features=4, layer_width=2, num_layers=4, num_splits=3),
    # k = 4: s = 2, four windows; the fifth layer reads the first one again.
    "k4": dict(in_features=8, out_features=2, layer_width=3, num_layers=5, num_splits=4),
    # an explicit s that does not divide N: layer 2 reads columns 6, 7, 0 (wraps).
    "split_size_wraps": dict(in_features=8, out_features=3, layer_width=3, num_layers=4, split_size=3),
    # s = 1: one column per layer, a chain longer than N.
    "s1": dict(in_features=6, out_features=2, layer_width=4, num_layers=7, split_size=1),
    # L = 1: no recurrence, weight_hidden is empty.
    "L1": dict(in_features=5, out_features=2, layer_width=3, num_layers=1),
    # w = 1: one unit per layer (any tile is mostly padding); s = 5 wraps on N = 9.
    "w1": dict(in_features=9, out_features=4, layer_width=1, num_layers=5),
    # M = None: no output projection, the layer returns H; s = 4 wraps on N = 6.
    "M_None": dict(in_features=6, out_features=None, layer_width=2, num_layers=3, split_size=4),
    # bias=False: neither bias nor bias_out.
    "no_bias": dict(in_features=7, out_features=3, layer_width=3, num_layers=3, bias=False),
    # no projection and no bias: weight_in and weight_hidden are the only parameters.
    "M_None_no_bias": dict(in_features=5, out_features=None, layer_width=2, num_layers=2, bias=False),
    # k = 2 with N = 2s: layers grouped by window, a group of three and one of two.
    "k2_groups": dict(in_features=8, out_features=3, layer_width=3, num_layers=5),
    # ---- tile and block boundaries (triton, cuda) -----------------------------------------------------
    # w = 17: one column past a 16-wide tile, without bias.
    "w17_no_bias": dict(in_features=11, out_features=5, layer_width=17, num_layers=3, bias=False),
    # s = 35 and M = 40: windows and output columns past one block.
    "many_chunks": dict(in_features=70, out_features=40, layer_width=24, num_layers=3, num_splits=2),
    # k = 3 and L = 7: a long chain rereading its windows.
    "k3_long_chain": dict(in_features=30, out_features=6, layer_width=5, num_layers=7, num_splits=3),
    # w = 128: the widest layer the triton kernels run.
    "w128": dict(in_features=12, out_features=3, layer_width=128, num_layers=2),
    # s = N (k = 1) with w = 7: every tile padded.
    "s_equals_N": dict(in_features=11, out_features=3, layer_width=7, num_layers=3, split_size=11),
    # bias=False with w = 10 and M = 6: partial tiles without the bias terms.
    "no_bias_w10": dict(in_features=21, out_features=6, layer_width=10, num_layers=3, bias=False),
    # s = 12 on N = 33: windows wrap at several offsets; w = 16, one full tile.
    "wrap_s12_N33": dict(in_features=33, out_features=10, layer_width=16, num_layers=4, split_size=12),
    # s = 32: exactly one K-chunk; no projection.
    "M_None_s32": dict(in_features=64, out_features=None, layer_width=24, num_layers=3),
    # 128 < w <= 256: z in two 128-column chunks; s = 150 in several K-chunks; M, N > 128: several
    # output and dx column chunks.
    "two_chunks_wide": dict(in_features=300, out_features=150, layer_width=200, num_layers=2, split_size=150),
    # N = 300 > L*s = 80: columns of x that no window reads (their dx is zero).
    "columns_no_window_reads": dict(in_features=300, out_features=4, layer_width=8, num_layers=2, split_size=40),
    # k = 2, L = 6: layers grouped by window in threes, w = 24.
    "k2_groups_of_three": dict(in_features=32, out_features=6, layer_width=24, num_layers=6),
    # ---- wide layers -----------------------------------------------------------------------------------
    # 32 < w < 256: the cpu chain groups layers by window and runs the recurrence as GEMMs.
    "medium_grouped": dict(in_features=6, out_features=3, layer_width=40, num_layers=3),
    # w = 33, one past the cpu chain's narrow loop; no projection.
    "medium_grouped_M_None": dict(in_features=7, out_features=None, layer_width=33, num_layers=4),
    # w = 256: one GEMM per layer on cpu; windows read by several layers (k = 2, L = 3).
    "wide_k2_overlap": dict(in_features=6, out_features=3, layer_width=256, num_layers=3),
    # w = 256, L = k = 2: the wide chain tiles x once; no projection.
    "wide_tiles_once": dict(in_features=8, out_features=None, layer_width=256, num_layers=2),
    # w = 300 with s = 3 not dividing N: wide and wrapping.
    "wide_wraps": dict(in_features=7, out_features=2, layer_width=300, num_layers=4, split_size=3),
    # w = 256: the widest layer of the CUDA tile kernels.
    "w_at_tile_limit": dict(in_features=40, out_features=7, layer_width=256, num_layers=2),
    # w = 300 > 256: the cuda backend runs the hoisted cuBLAS chain only.
    "hoisted_w300": dict(in_features=20, out_features=5, layer_width=300, num_layers=2),
    # w = 260, hoisted, without projection and bias.
    "hoisted_no_projection": dict(in_features=17, out_features=None, layer_width=260, num_layers=2, bias=False),
}

# The small cases that together reach every branch of the chain (wrapped windows, k = 1..4, s = 1,
# L = 1, w = 1, no projection, no bias): the matrix of the reference and cpu backends.
EDGE_CASES = ("odd_N_wraps", "k1", "k3", "k4", "split_size_wraps", "s1", "L1", "w1", "M_None", "no_bias",
              "M_None_no_bias")


def case_config(name: str, **overrides) -> SpinalConfig:
    """The config of CASES[name]; ``overrides`` (e.g. activation) replace its arguments."""
    kwargs = {**CASES[name], **overrides}
    return SpinalConfig.build(kwargs.pop("in_features"), kwargs.pop("out_features"), **kwargs)


def make_config(in_features=7, out_features=3, **kwargs) -> SpinalConfig:
    kwargs.setdefault("layer_width", 5)
    kwargs.setdefault("num_layers", 3)
    return SpinalConfig.build(in_features, out_features, **kwargs)


def random_params(config: SpinalConfig, generator: torch.Generator, dtype=torch.float64) -> SpinalParams:
    """Random float64 CPU parameters of the config's shapes, scaled like nn.Linear's init."""
    tensors = {}
    for name, shape in config.parameter_shapes().items():
        if shape is None:
            tensors[name] = None
            continue
        fan_in = shape[-1] if name != "bias" else config.split_size + config.layer_width
        scale = 1.0 / max(fan_in, 1) ** 0.5
        tensors[name] = (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * scale
    return SpinalParams(**tensors)


def _run(backend: str, x: torch.Tensor, params: SpinalParams, config: SpinalConfig, grad_out_seed: torch.Tensor,
         dropout_seed: int | None = None):
    """Output and gradients (x first, then parameters in SpinalParams order) of one forward+backward;
    with ``dropout_seed`` a training call that draws its masks from that seed."""
    leaves = [x] + [p for p in params if p is not None]
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    it = iter(leaves[1:])
    run_params = SpinalParams(*(None if p is None else next(it) for p in params))
    if dropout_seed is None:
        y = apply_spinal(leaves[0], run_params, config, backend)
    else:
        seed = torch.tensor(dropout_seed, dtype=torch.int64)
        with unittest.mock.patch("spinal_ops.functional.draw_seed", return_value=seed):
            y = apply_spinal(leaves[0], run_params, config, backend, training=True)
    # allow_unused: weight_hidden is empty and unused by the reference when L == 1.
    grads = torch.autograd.grad(
        y, leaves, grad_outputs=grad_out_seed.to(y.dtype).to(y.device), allow_unused=True, materialize_grads=True
    )
    return [y.detach()] + [g.detach() for g in grads]


def check_backend(
    backend: str,
    config: SpinalConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    batch_shape: tuple[int, ...] = (6,),
    seed: int = 0,
    x: torch.Tensor | None = None,
    params: SpinalParams | None = None,
    dropout_seed: int | None = None,
) -> None:
    """Assert contract §4 for ``backend`` on one config: output and every gradient.

    ``x`` and ``params`` (e.g. a trained layer's) replace the random input and parameters. With
    ``dropout_seed`` every run (reference and backend) is a training call with that seed, so a
    config with dropout is compared under the same masks."""
    generator = torch.Generator().manual_seed(seed)
    params64 = random_params(config, generator)
    if params is not None:
        params64 = SpinalParams(*(None if p is None else p.detach().double().cpu() for p in params))
    if x is None:
        x = torch.randn(*batch_shape, config.in_features, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(*x.shape[:-1], config.output_features, generator=generator, dtype=torch.float64)

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    # x's layout, strides included, even where .to() would make a non-dense view contiguous.
    x_cast = torch.empty_strided(x.shape, x.stride(), dtype=dtype, device=device).copy_(x)
    params_cast = SpinalParams(*(cast(p) for p in params64))
    # The float64 reference runs on the same values as the backend: the inputs rounded to dtype.
    # (Measured against unrounded values, both errors are dominated by that shared input rounding,
    # and which one it happens to cancel best decides the comparison.)
    x64 = x_cast.to(torch.float64).cpu()
    params64 = SpinalParams(*(None if p is None else p.to(torch.float64).cpu() for p in params_cast))
    grad_out = grad_out.to(dtype).to(torch.float64)
    expected = _run("reference", x64, params64, config, grad_out, dropout_seed)
    eager = _run("reference", x_cast, params_cast, config, grad_out, dropout_seed)
    got = _run(backend, x_cast, params_cast, config, grad_out, dropout_seed)

    names = ["output"] + [n for n, p in zip(GRAD_NAMES, [x64, *params64]) if p is not None]
    for name, ref, eag, out in zip(names, expected, eager, got):
        assert out.dtype == dtype, f"{name}: dtype {out.dtype} != {dtype}"
        assert_within_contract(f"{backend} {dtype} {name} ({config})", out, ref, eag, dtype)


def assert_within_contract(
    label: str, out: torch.Tensor, ref: torch.Tensor, eag: torch.Tensor, dtype: torch.dtype
) -> None:
    """contract §4 for one tensor: ``out`` (any implementation) against ``ref`` (float64 reference on the
    same values), with ``eag`` (the eager reference in ``dtype``) setting the allowed error."""
    assert out.shape == ref.shape, f"{label}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    out64, eag64 = out.double().cpu(), eag.double().cpu()
    assert torch.equal(out64.isnan(), ref.isnan()), f"{label}: NaN pattern differs from the reference"
    finite = ref.isfinite()
    err_backend = (out64 - ref)[finite].abs().max().item() if finite.any() else 0.0
    err_eager = (eag64 - ref)[finite].abs().max().item() if finite.any() else 0.0
    scale = max(1.0, ref[finite].abs().max().item() if finite.any() else 1.0)
    atol = ATOL_PER_SCALE[dtype] * scale
    assert err_backend <= 2 * err_eager + atol, (
        f"{label}: error {err_backend:.3e} > 2 * eager error {err_eager:.3e} + atol {atol:.1e}"
    )


def gradcheck_problem(config: SpinalConfig, backend: str, seed: int):
    """(fn, inputs) for torch.autograd.gradcheck: the functional layer in float64 on random values."""
    generator = torch.Generator().manual_seed(seed)
    params = random_params(config, generator)
    names = [name for name, p in params._asdict().items() if p is not None]
    x = torch.randn(3, config.in_features, generator=generator, dtype=torch.float64, requires_grad=True)
    leaves = [p.clone().requires_grad_(True) for p in params if p is not None]

    def layer(x, *tensors):
        given = dict(zip(names, tensors))
        return spinal_linear(
            x, given["weight_in"], given["weight_hidden"], given.get("bias"), given.get("weight_out"),
            given.get("bias_out"), split_size=config.split_size, activation=config.activation,
            negative_slope=config.negative_slope, backend=backend,
        )

    return layer, (x, *leaves)


class RecordedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the arguments and results of every call of one op (e.g. a fused backward)."""

    def __init__(self, op_name: str):
        super().__init__()
        self.op_name = op_name
        self.calls: list[tuple[tuple, object]] = []
        self.arguments: list[dict[str, object]] = []  # per call, every argument by name, defaults included

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func._schema.name == self.op_name:
            self.calls.append((args, result))
            # The dispatcher drops trailing arguments that equal their defaults.
            self.arguments.append({
                a.name: args[i] if i < len(args) else kwargs.get(a.name, a.default_value)
                for i, a in enumerate(func._schema.arguments)
            })
        return result


def check_tf32_choice_reaches_backward(backend: str, config: SpinalConfig, forward_op: str, backward_op: str,
                                       device="cpu") -> None:
    """The forward reads ``torch.backends.cuda.matmul.allow_tf32`` once (float32 CUDA tensors; on
    CPU tensors the choice is False, no CPU kernel has TF32) and the backward op gets the forward's
    choice, even when the flag changed in between."""
    generator = torch.Generator().manual_seed(3)
    params = [None if p is None else p.to(device, torch.float32).requires_grad_() for p in random_params(config, generator)]
    x = torch.randn(4, config.in_features, generator=generator).to(device).requires_grad_()
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for at_forward in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = at_forward
            with RecordedOps(forward_op) as forward_calls:
                y = apply_spinal(x, SpinalParams(*params), config, backend)
            torch.backends.cuda.matmul.allow_tf32 = not at_forward
            with RecordedOps(backward_op) as backward_calls:
                y.sum().backward()
            chosen = at_forward and torch.device(device).type == "cuda"
            assert [call["allow_tf32"] for call in forward_calls.arguments] == [chosen], forward_calls.arguments
            assert [call["allow_tf32"] for call in backward_calls.arguments] == [chosen], (
                f"{backend}: the backward ran with allow_tf32={not chosen}, the forward with {chosen}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def check_gradient_masks(backend: str, config: SpinalConfig, backward_op: str, dtype=torch.float64,
                         device="cpu", batch: int = 5) -> None:
    """For every combination of requires_grad on x and the parameters: the backend's gradients
    equal the reference's where they exist, are None where they do not, and the backward op is
    asked (output_mask) for exactly the gradients autograd needs."""
    generator = torch.Generator().manual_seed(7)
    params = random_params(config, generator)
    x = torch.randn(batch, config.in_features, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(batch, config.output_features, generator=generator, dtype=torch.float64)
    present = [x, *params]
    slots = [i for i, t in enumerate(present) if t is not None]
    for pattern in range(1, 2 ** len(slots)):
        wanted = {slot for bit, slot in enumerate(slots) if pattern >> bit & 1}
        results = {}
        for name in ("reference", backend):
            leaves = [None if t is None else t.to(device, dtype, copy=True).requires_grad_(i in wanted)
                      for i, t in enumerate(present)]
            y = apply_spinal(leaves[0], SpinalParams(*leaves[1:]), config, name)
            with RecordedOps(backward_op) as recorded:
                y.backward(grad_out.to(device, dtype))
            results[name] = [None if t is None else t.grad for t in leaves]
        expected_mask = [i in wanted for i in range(len(present))]
        assert [list(args[6]) for args, _ in recorded.calls] == [expected_mask], (
            f"{backend}: backward asked for {[args[6] for args, _ in recorded.calls]}, autograd needs {expected_mask}"
        )
        for i, (got, ref) in enumerate(zip(results[backend], results["reference"])):
            label = f"{backend} {GRAD_NAMES[i]} with requires_grad on {sorted(GRAD_NAMES[j] for j in wanted)}"
            if i not in wanted:
                assert got is None, f"{label}: got a gradient nobody asked for"
                continue
            torch.testing.assert_close(got.double().cpu(), ref.double().cpu(), msg=label, **_same_values(dtype))


def check_autograd_node(backend: str, node_name: str, dtype=torch.float64, device="cpu") -> None:
    """The compiled pairs' autograd node behaves as a built-in op's: saved-tensor hooks pack and
    unpack what it saves (a checkpoint recomputes through it); a retained graph gives the same
    gradients again, also to backward calls from two threads at once, and a freed one raises; an
    input changed in place after the forward raises; its edges are one per tensor argument (None
    for an absent one); forward-mode AD raises."""
    config = make_config(layer_width=4, num_layers=3, bias=False)
    generator = torch.Generator().manual_seed(11)
    params = random_params(config, generator)
    x = torch.randn(6, config.in_features, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(6, config.output_features, generator=generator, dtype=torch.float64)

    def leaves(target_device=device, target_dtype=dtype):
        return [None if t is None else t.to(target_device, target_dtype, copy=True).requires_grad_()
                for t in (x, *params)]

    def run(name: str, inputs: list) -> torch.Tensor:
        return apply_spinal(inputs[0], SpinalParams(*inputs[1:]), config, name)

    def assert_gradients(got: list[torch.Tensor]) -> None:
        for g, want in zip(got, expected):
            torch.testing.assert_close(g.double().cpu(), want, **_same_values(dtype))

    reference_inputs = leaves("cpu", torch.float64)
    run("reference", reference_inputs).backward(grad_out)
    expected = [t.grad for t in reference_inputs if t is not None]
    grad_out = grad_out.to(device, dtype)

    # Saved tensors go through the hooks: packed as copies, the copies are what the backward reads.
    packed = []
    inputs = leaves()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t.clone(), lambda t: t):
        y = run(backend, inputs)
    assert y.grad_fn.name() == node_name
    assert len(packed) >= 4, f"{backend}: {len(packed)} saved tensors went through the hooks"
    grads = torch.autograd.grad(y, [t for t in inputs if t is not None], grad_out, retain_graph=True)
    assert_gradients(grads)
    # Backward calls on one retained graph from two threads at once: the same gradients each time.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        concurrent_grads = list(pool.map(
            lambda _: torch.autograd.grad(y, [t for t in inputs if t is not None], grad_out, retain_graph=True),
            range(4)))
    assert all(torch.equal(a, b) for result in concurrent_grads for a, b in zip(result, grads))
    # A retained graph: the same gradients again; then freed, a third backward raises.
    again = torch.autograd.grad(y, [t for t in inputs if t is not None], grad_out)
    assert all(torch.equal(a, b) for a, b in zip(again, grads))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.backward(grad_out)
    # One edge per tensor argument, in schema order; bias and bias_out are absent here.
    edges = [function for function, _ in y.grad_fn.next_functions]
    assert len(edges) == 6 and edges[3] is None and edges[5] is None and all(edges[i] is not None for i in (0, 1, 2, 4))

    # Checkpointing recomputes the forward through the saved-tensor hooks.
    inputs = leaves()
    torch.utils.checkpoint.checkpoint(lambda *a: run(backend, list(a)), *inputs, use_reentrant=False).backward(
        grad_out)
    assert_gradients([t.grad for t in inputs if t is not None])

    # The input changed in place after the forward saved it.
    inputs = leaves()
    shifted = inputs[0] * 1
    y = run(backend, [shifted, *inputs[1:]])
    shifted.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(grad_out)

    # Forward-mode AD is refused before any kernel runs (it is not silently dropped).
    with forward_ad.dual_level():
        primal = x.to(device, dtype)
        dual = forward_ad.make_dual(primal, torch.ones_like(primal))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            run(backend, [dual, *(None if p is None else p.to(device, dtype) for p in params)])


def _same_values(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances for two computations of one function on the same values: float64
    agrees to rounding; float32 (the masks and inference tests' other dtype) to 1e-4."""
    return {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}


def check_inference_keeps_no_pre_activation(backend: str, config: SpinalConfig, forward_op: str, batch: int,
                                            dtype=torch.float64, device="cpu") -> None:
    """Under no_grad the forward op is told not to keep Z and returns it empty; the output still
    matches the reference."""
    generator = torch.Generator().manual_seed(11)
    params = SpinalParams(*(None if p is None else p.to(device, dtype) for p in random_params(config, generator)))
    x = torch.randn(batch, config.in_features, generator=generator, dtype=torch.float64).to(device, dtype)
    with torch.no_grad(), RecordedOps(forward_op) as recorded:
        y = apply_spinal(x, params, config, backend)
    assert len(recorded.calls) == 1
    args, (out, pre_activation) = recorded.calls[0]
    assert args[-1] is False, "the forward was not told that no gradient is needed"
    assert pre_activation.numel() == 0, f"Z of shape {tuple(pre_activation.shape)} kept under no_grad"
    expected = apply_spinal(x.double().cpu(), SpinalParams(*(None if p is None else p.double().cpu() for p in params)),
                            config, "reference")
    torch.testing.assert_close(y.double().cpu(), expected, **_same_values(dtype))

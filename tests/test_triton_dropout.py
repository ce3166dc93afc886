"""Dropout inside the Triton kernels (docs/contract.md §1, "Masks"): the kernels' Philox words against
the generator of spinal_ops/dropout.py, a training call's output and every gradient against the
float64 reference under the same seed (contract §4) for the one-block and the tiled kernels, p = 0
as the plain kernels, NaN and inf through the masks, a dropped input's zero gradient, opcheck and
torch.compile with the seed, and the op's argument errors. On CUDA tensors
where a GPU is present, else on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); shapes stay small, the interpreter runs every program in Python."""
import pytest
import torch
import torch.nn.functional as F

from contract import case_config, check_backend, make_config, random_params
from spinal_ops import BackendUnavailableError, SpinalConfig, SpinalLinear, available_backends
from spinal_ops.backends.triton import settings
from spinal_ops.dispatch import get_backend
from spinal_ops.dropout import MASK32, keep_mask, keep_threshold, philox4x32

pytestmark = pytest.mark.skipif(
    not available_backends()["triton"], reason=f"triton backend unavailable: {available_backends()['triton'].reason}"
)
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from spinal_ops.backends.triton.kernels import _dropout_word, _dropped  # noqa: E402  (needs triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Seeds with high key words (the contract's key is (seed mod 2^32, seed div 2^32)), the largest
# draw_seed() gives, and a small one whose high word is zero.
SEEDS = (0x1234_5678_9ABC_DEF0, 2**63 - 2, 2**32 + 7, 12345)


@pytest.fixture(params=[False, True], ids=["one_block", "tiled"])
def tiled(request, monkeypatch):
    monkeypatch.setattr(settings, "TILED", request.param)
    return request.param


# ---- the generator in the kernels -----------------------------------------------------------------


@triton.jit
def _words_kernel(seed, counter_ptr, word_ptr, philox_ptr, N: tl.constexpr):
    """The spinal kernels' word (_dropout_word) and tl.philox's first word for N counters."""
    offsets = tl.arange(0, N)
    counter = tl.load(counter_ptr + offsets)
    tl.store(word_ptr + offsets, _dropout_word(seed, counter).to(tl.int64))
    zero = tl.zeros([N], tl.uint32)
    first, _, _, _ = tl.philox(seed, (counter & 0xFFFFFFFF).to(tl.uint32), (counter >> 32).to(tl.uint32), zero, zero)
    tl.store(philox_ptr + offsets, first.to(tl.int64))


@triton.jit
def _mask_kernel(out_ptr, seed, first_row, first_site, sites_per_row, threshold, scale,
                 ROWS: tl.constexpr, SITES: tl.constexpr):
    """The spinal kernels' mask (_dropped) applied to ones: [ROWS, SITES] sites from first_row, first_site."""
    rows = first_row + tl.arange(0, ROWS).to(tl.int64)
    sites = first_site + tl.arange(0, SITES)
    ones = tl.full([ROWS, SITES], 1.0, tl.float32)
    kept = _dropped(ones, rows, sites, seed, sites_per_row, threshold, scale)
    tl.store(out_ptr + tl.arange(0, ROWS)[:, None] * SITES + tl.arange(0, SITES)[None, :], kept)


@pytest.mark.parametrize("seed", SEEDS)
def test_kernel_words_are_the_generators(seed):
    # Counters below and past 2^32 (the counter's second word), and one at 2^63 - 1.
    counter = torch.tensor([0, 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**40 + 11, 2**63 - 1]
                           + list(range(100, 108)), dtype=torch.int64)
    words = torch.empty_like(counter, device=DEVICE)
    philox = torch.empty_like(words)
    _words_kernel[(1,)](seed, counter.to(DEVICE), words, philox, N=counter.numel())
    zero = torch.zeros_like(counter)
    expected, _, _, _ = philox4x32(torch.tensor(seed), counter & MASK32, counter >> 32, zero, zero)
    assert torch.equal(philox.cpu(), expected)
    assert torch.equal(words.cpu(), expected)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.75])  # thresholds below, at and above 2^31: compared unsigned
def test_kernel_mask_is_the_contracts(p):
    # Rows far enough that row * D passes 2^32; the sites of one layer's h_{l-1}.
    rows, sites, sites_per_row, first_site = 16, 32, 1000, 37
    first_row = 2**32 // sites_per_row - 3
    seed = SEEDS[0]
    out = torch.empty(rows, sites, device=DEVICE)
    scale = 1.0 / (1.0 - p)
    _mask_kernel[(1,)](out, seed, first_row, first_site, sites_per_row, keep_threshold(p), scale, ROWS=rows, SITES=sites)
    row = torch.arange(first_row, first_row + rows, dtype=torch.int64)[:, None]
    counter = row * sites_per_row + torch.arange(first_site, first_site + sites, dtype=torch.int64)[None, :]
    zero = torch.zeros_like(counter)
    word, _, _, _ = philox4x32(torch.tensor(seed), counter & MASK32, counter >> 32, zero, zero)
    kept = word >= keep_threshold(p)
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(out.cpu(), kept.float() * torch.tensor(scale, dtype=torch.float32), rtol=0, atol=0)


# ---- a training call against the reference -------------------------------------------------------

# Wrapped windows (N = 7, s = 4), no projection, L = 1, a layer wider than one tile without bias,
# windows and outputs past one block.
DROPOUT_CASES = ("odd_N_wraps", "M_None", "L1", "w17_no_bias", "many_chunks")


@pytest.mark.parametrize("name", DROPOUT_CASES)
def test_training_call_matches_the_reference_float32(tiled, name):
    config = case_config(name, dropout=0.3)
    check_backend("triton", config, torch.float32, DEVICE, batch_shape=(7,), dropout_seed=SEEDS[0])


@pytest.mark.parametrize("name", ["odd_N_wraps", "M_None"])
def test_training_call_matches_the_reference_float16(tiled, name):
    config = case_config(name, dropout=0.3, activation="gelu")
    check_backend("triton", config, torch.float16, DEVICE, batch_shape=(7,), dropout_seed=SEEDS[1])


@pytest.mark.parametrize("p, seed", [(0.75, SEEDS[2]), (0.05, SEEDS[3])])
def test_training_call_high_and_low_p(tiled, p, seed):
    config = make_config(in_features=9, out_features=4, layer_width=6, num_layers=3, dropout=p)
    check_backend("triton", config, torch.float32, DEVICE, batch_shape=(6,), dropout_seed=seed)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's inf * 0
def test_nan_and_inf_under_dropout_like_the_reference(tiled):
    # The mask multiplies, as the reference's: a dropped NaN or inf is NaN, not zero.
    config = case_config("odd_N_wraps", dropout=0.5)
    x = torch.randn(6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[1, 2] = float("nan")
    x[3, 5] = float("inf")
    x[4, 0] = -float("inf")
    check_backend("triton", config, torch.float32, DEVICE, x=x, dropout_seed=SEEDS[0])


def test_tiled_kernels_past_one_block_with_split_weight_gradients(monkeypatch):
    # w = 40: three unit and K chunks (interpreter blocks of 16), 37 rows: three row tiles and
    # (interpreter) the weight gradients in row splits, all recomputing the same masks.
    monkeypatch.setattr(settings, "TILED", True)
    config = make_config(in_features=37, out_features=20, layer_width=40, num_layers=3, dropout=0.4)
    check_backend("triton", config, torch.float32, DEVICE, batch_shape=(37,), dropout_seed=SEEDS[0])


# ---- the op pair's dropout arguments ---------------------------------------------------------------


def op_args(config: SpinalConfig, rows: int) -> tuple:
    generator = torch.Generator().manual_seed(3)
    params = random_params(config, generator, dtype=torch.float32)
    x = torch.randn(rows, config.in_features, generator=generator)
    tensors = [None if t is None else t.to(DEVICE) for t in (x, *params)]
    return (*tensors, config.activation, config.negative_slope)


def test_zero_p_is_the_plain_op(tiled):
    config = case_config("odd_N_wraps")
    args = op_args(config, 6)
    forward, backward = torch.ops.spinal_ops.triton_forward, torch.ops.spinal_ops.triton_backward
    seed = torch.tensor(SEEDS[0])
    plain = forward(*args)
    with_seed = forward(*args, False, True, seed, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, with_seed))
    grad_out = torch.randn(6, config.output_features, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    x, weight_in, weight_hidden, _, weight_out, _, activation, slope = args
    common = (grad_out, x, plain[1], weight_in, weight_hidden, weight_out, [True] * 6, activation, slope)
    for a, b in zip(backward(*common), backward(*common, False, seed, 0.0)):
        assert torch.equal(a, b)
    # and p > 0 does drop: the output changes
    assert not torch.equal(forward(*args, False, True, seed, 0.5)[0], plain[0])


def test_opcheck_with_dropout():
    # Schema, fake kernel, and autograd (the seed saved for the backward) under AOTAutograd.
    config = case_config("odd_N_wraps")
    args = op_args(config, 4)
    leaves = [t.requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in args]
    torch.library.opcheck(torch.ops.spinal_ops.triton_forward.default,
                          (*leaves, False, True, torch.tensor(SEEDS[0]), 0.3))


def test_compile_fullgraph_training_matches_eager():
    # The seed drawn inside the traced call reaches the op; the compiled step is the eager one.
    torch.manual_seed(0)
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3, dropout=0.4, backend="triton", device=DEVICE)
    x = torch.randn(6, 7, device=DEVICE, requires_grad=True)
    compiler = "aot_eager" if DEVICE == "cpu" else "inductor"
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    torch.manual_seed(11)
    y_compiled = compiled(x)
    torch.manual_seed(11)
    y_eager = layer(x)
    assert torch.equal(y_compiled, y_eager)
    inputs = [x, layer.weight_in, layer.weight_hidden, layer.weight_out]
    for got, expected in zip(torch.autograd.grad(y_compiled.sum(), inputs), torch.autograd.grad(y_eager.sum(), inputs)):
        assert torch.equal(got, expected)


def test_dropped_input_gets_zero_gradient(tiled):
    # One layer reading all of x, identity activation, no projection: y = (m * x / (1 - p)) A^T + b,
    # so dx is zero exactly where the contract's mask dropped x, and the forward is the plain layer
    # on the masked input.
    p, rows = 0.5, 16
    layer = SpinalLinear(8, None, layer_width=4, num_layers=1, split_size=8, activation="identity", dropout=p,
                         backend="triton", device=DEVICE)
    x = torch.randn(rows, 8, device=DEVICE, requires_grad=True)
    seed = torch.tensor(SEEDS[1])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("spinal_ops.functional.draw_seed", lambda: seed)
        y = layer(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    _, _, sites_per_row = layer.config.dropout_sites()
    kept = keep_mask(seed, rows, 0, 8, sites_per_row, p, torch.device("cpu")).to(DEVICE)
    assert 0 < kept.sum() < kept.numel()
    assert torch.all(grad[~kept] == 0)
    assert torch.all(grad[kept] != 0)
    expected = F.linear(x.detach() * kept / (1 - p), layer.weight_in[0], layer.bias[0])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(dropout_p=1.0), r"dropout_p must be a probability in \[0, 1\)"),
    (dict(dropout_p=-0.1), r"dropout_p must be a probability"),
    (dict(dropout_seed=None), r"dropout_p = 0.5 needs a dropout_seed"),
    (dict(dropout_seed=torch.tensor([7])), r"dropout_seed must be a 0-dim int64 CPU tensor"),
    (dict(dropout_seed=torch.tensor(7, dtype=torch.int32)), r"dropout_seed must be a 0-dim int64 CPU tensor"),
])
def test_bad_dropout_arguments_raise_before_any_kernel(change, message, monkeypatch):
    from spinal_ops.backends.triton import kernels

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(kernels, "spinal_forward", no_launch)
    monkeypatch.setattr(kernels, "spinal_backward", no_launch)
    monkeypatch.setattr(settings, "TILED", False)
    config = case_config("odd_N_wraps")
    args = op_args(config, 4)
    dropout = dict(dropout_seed=torch.tensor(SEEDS[0]), dropout_p=0.5)
    dropout.update(change)
    with pytest.raises(ValueError, match=message):
        torch.ops.spinal_ops.triton_forward(*args, False, True, dropout["dropout_seed"], dropout["dropout_p"])
    x, weight_in, weight_hidden, _, weight_out, _, activation, slope = args
    grad_out = torch.zeros(4, config.output_features, device=DEVICE)
    pre_activation = torch.zeros(4, config.hidden_features, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        torch.ops.spinal_ops.triton_backward(grad_out, x, pre_activation, weight_in, weight_hidden, weight_out,
                                             [True] * 6, activation, slope, False, dropout["dropout_seed"],
                                             dropout["dropout_p"])


# ---- the backend: dropout yes, batch norm in training no ------------------------------------------


def test_supports_dropout_but_not_batch_norm_training():
    backend = get_backend("triton")
    device = torch.device(DEVICE)
    assert backend.supports(make_config(dropout=0.2), torch.float32, device)
    norm = backend.supports(make_config(norm="batch"), torch.float32, device)
    assert not norm and "no batch-norm stage" in norm.reason
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3, norm="batch", backend="triton", device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="no batch-norm stage"):
        layer(torch.randn(4, 7, device=DEVICE))
    assert layer.eval()(torch.randn(4, 7, device=DEVICE)).shape == (4, 3)  # eval mode: folded, runs here

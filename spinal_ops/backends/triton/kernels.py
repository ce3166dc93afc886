"""The one-block Triton kernels of the spinal layer: one launch forward, two launches backward,
w <= 128. The default kernels of the triton backend; tiled.py holds the tiled kernels (any width,
weight gradients split over rows), which run instead when the switch of settings.py is on.

Imported lazily (on the first Triton op call) so that ``import spinal_ops`` neither needs nor
waits for triton. ``TRITON_INTERPRET=1`` must be set before this module is imported for the
kernels to run on CPU tensors through the Triton interpreter.

Tiling and launch scheme
------------------------
Every tensor is row-major contiguous. B rows, N inputs, layer width w, L layers, split size s,
M outputs. BLOCK_W = next power of two >= max(w, 16): one layer's units, masked past w; a
program holds a [BLOCK_W, BLOCK_W] hidden weight in registers, hence w <= 128
(MAX_LAYER_WIDTH in backends/triton/settings.py; TritonBackend.supports refuses wider layers
unless the tiled kernels are switched on).

forward  grid (cdiv(B, BLOCK_B),), one program per tile of BLOCK_B rows.
  phase 1, the chain: for l in 0..L-1
      acc[BLOCK_B, BLOCK_W]  = x[:, (l*s + j) % N] @ A_l^T     j in chunks of BLOCK_K, read
                                                              straight from x (wrap-around)
      acc                   += h @ R_l^T                      R_l one [BLOCK_W, BLOCK_W] tile
      z_l = acc + b_l  -> stored in Z[:, l*w:(l+1)*w];  h = phi(z_l) stays in registers
      (M is None: h is stored in out[:, l*w:(l+1)*w] too).
  phase 2, the output projection (M given), after a CTA barrier: for each tile of BLOCK_M
      outputs, y_tile = sum_l phi(Z[:, l-th block]) @ W_out[m, l-th block]^T + b_out, reading
      back the Z rows this same program wrote (still in L1/L2).

backward launch 1, data gradients: grid (cdiv(B, BLOCK_B),)
  phase 1, the chain backwards: for l = L-1..0
      dH_l = grad_out @ W_out[:, l-th block]   (M-chunks of BLOCK_M; or grad_out's block)
      dH_l += dZ_{l+1} @ R_{l+1}               (dZ_{l+1} kept in registers)
      dZ_l = dH_l * phi'(z_l)                  -> stored in dZ [B, L*w] (scratch)
  phase 2, dx, after a CTA barrier: for each chunk of BLOCK_K input columns c, sum over the
      layers whose window holds c (j = (c - l*s) mod N < s) of dZ_l @ A_l[:, j]: the overlapping
      windows are accumulated in registers in a fixed order, so there are no races.
backward launch 2, weight gradients: grid (number of output tiles,), each program owns one tile
  and reduces over all B rows in order (deterministic, no atomics):
      tiles 0 ..            : dW_in[l][:, j-chunk] = dZ_l^T @ x[:, window chunk]  (+ db_l)
      then L-1 tiles        : dR_l = dZ_l^T @ phi(Z_{l-1})
      then L*cdiv(M, BLOCK_M): dW_out[m-chunk, l-th block] = grad_out^T @ phi(Z_l) (+ db_out)

Dropout (DROPOUT constexpr; off, the kernels are the plain ones): a mask element is the first
Philox4x32-10 word of (seed, counter b*D + site) (_dropout_word: tl.randint, which splits the
64-bit seed into the two key words), kept iff >= floor(p * 2^32) unsigned and scaled by 1/(1-p)
(_dropped). Sites: layer l's window from _window_site(l), h_{l-1} from _window_site(l) + s, H
from _window_site(L) (contract §1). Masks are drawn where the kernels load:
  forward   x tile of layer l's window; h (registers) as layer l's input (H keeps the undropped
            h); phi(Z) as the projection's input.
  launch 1  dH_l from the projection goes through H's mask; dZ_{l+1} @ R_{l+1} is its own product,
            then through layer l+1's mask on h_l; each dx part dZ_l @ A_l through l's window mask.
  launch 2  the x tile, h_{l-1} and phi(Z) the same as in the forward (weight gradients of the
            dropped inputs); bias gradients have no mask.
Nothing is stored: the backward recomputes every mask from the seed.

Accumulation is fp32 (tl.dot with input_precision="ieee", so fp32 inputs give fp32-exact
products, on CUDA cores rather than TF32 tensor cores; half inputs use tensor cores). Z and dZ are stored in the input dtype, as
eager PyTorch rounds them; a dropped operand of a product is rounded to the input dtype too. Row
offsets and dropout counters are int64 (B*N and B*D may pass 2^31).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...activations import ACTIVATIONS

_RELU = tl.constexpr(ACTIVATIONS.index("relu"))
_LEAKY_RELU = tl.constexpr(ACTIVATIONS.index("leaky_relu"))
_GELU = tl.constexpr(ACTIVATIONS.index("gelu"))
_GELU_TANH = tl.constexpr(ACTIVATIONS.index("gelu_tanh"))
_SILU = tl.constexpr(ACTIVATIONS.index("silu"))
_TANH = tl.constexpr(ACTIVATIONS.index("tanh"))
_SIGMOID = tl.constexpr(ACTIVATIONS.index("sigmoid"))

_SQRT1_2 = tl.constexpr(0.70710678118654752440)
_SQRT_2_OVER_PI = tl.constexpr(0.79788456080286535588)
_INV_SQRT_2PI = tl.constexpr(0.39894228040143267794)
_GELU_TANH_CUBIC = tl.constexpr(0.044715)


# ---- activations: the formulas of csrc/common/activation.h, on fp32 values --------------------------


@triton.jit
def _tanh(z):
    # tanh from exp (no libdevice, so the interpreter runs it too); stable for large |z|.
    t = tl.exp(-2.0 * tl.abs(z))
    magnitude = (1.0 - t) / (1.0 + t)
    return tl.where(z < 0, -magnitude, magnitude)


@triton.jit
def _gelu_tanh_inner(z):
    # Tensor operand first: constexpr * tensor would wrap the tensor in a constexpr (interpreter).
    return (z + z * z * z * _GELU_TANH_CUBIC) * _SQRT_2_OVER_PI


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr, negative_slope):
    if ACTIVATION == _RELU:
        out = tl.where(z > 0, z, tl.where(z == z, 0.0, z))  # NaN stays NaN, as torch.relu
    elif ACTIVATION == _LEAKY_RELU:
        out = tl.where(z > 0, z, z * negative_slope)
    elif ACTIVATION == _GELU:
        out = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACTIVATION == _GELU_TANH:
        out = 0.5 * z * (1.0 + _tanh(_gelu_tanh_inner(z)))
    elif ACTIVATION == _SILU:
        out = z / (1.0 + tl.exp(-z))
    elif ACTIVATION == _TANH:
        out = _tanh(z)
    elif ACTIVATION == _SIGMOID:
        out = 1.0 / (1.0 + tl.exp(-z))
    else:  # identity
        out = z
    return out


@triton.jit
def _activate_grad(z, ACTIVATION: tl.constexpr, negative_slope):
    if ACTIVATION == _RELU:
        out = tl.where(z <= 0, 0.0, 1.0)  # a NaN z passes the gradient on, as torch.relu's backward does
    elif ACTIVATION == _LEAKY_RELU:
        out = tl.where(z > 0, 1.0, negative_slope)
    elif ACTIVATION == _GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        out = cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACTIVATION == _GELU_TANH:
        t = _tanh(_gelu_tanh_inner(z))
        d_inner = (z * z * (3.0 * _GELU_TANH_CUBIC) + 1.0) * _SQRT_2_OVER_PI
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * d_inner
    elif ACTIVATION == _SILU:
        sig = 1.0 / (1.0 + tl.exp(-z))
        out = sig * (1.0 + z * (1.0 - sig))
    elif ACTIVATION == _TANH:
        t = _tanh(z)
        out = 1.0 - t * t
    elif ACTIVATION == _SIGMOID:
        sig = 1.0 / (1.0 + tl.exp(-z))
        out = sig * (1.0 - sig)
    else:  # identity
        out = tl.full(z.shape, 1.0, tl.float32)
    return out


@triton.jit
def _hidden_block(z_ptr, rows, row_mask, hidden, layer, width, units, unit_mask,
                  ACTIVATION: tl.constexpr, negative_slope):
    """h_l = phi(z_l) for a tile of rows, read back from Z; zero outside the tile's valid rows/units."""
    mask = row_mask[:, None] & unit_mask[None, :]
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * hidden + layer * width + units[None, :], mask=mask, other=0.0)
    h = _activate(z.to(tl.float32), ACTIVATION, negative_slope)
    return tl.where(mask, h, 0.0).to(z_ptr.dtype.element_ty)


# ---- dropout: the masks of contract §1, "Masks" -----------------------------------------------------


@triton.jit
def _window_site(layer, split_size, width):
    """First dropout site of layer l's x window: layer 0 has s sites, every later layer s + w
    (its window, then h_{l-1} at _window_site(l) + s). _window_site(L) is the projection's first."""
    return layer * split_size + tl.maximum(layer - 1, 0) * width


@triton.jit
def _dropout_word(seed, counter):
    """First word of Philox4x32-10 with key (seed mod 2^32, seed div 2^32) and counter
    (c mod 2^32, c div 2^32, 0, 0), for an int64 block of counters c (uint32)."""
    return tl.randint(seed, counter)


@triton.jit
def _dropped(values, rows, sites, seed, sites_per_row, threshold, scale):
    """values [rows, sites] in fp32 with the dropout mask of (row b, site j) applied, counter
    b * D + j: kept iff the word >= floor(p * 2^32) (unsigned), scaled by 1 / (1 - p). A product
    with the factor, as the reference's values * mask * scale, so a dropped NaN or inf is NaN."""
    counter = rows.to(tl.int64)[:, None] * sites_per_row + sites.to(tl.int64)[None, :]
    keep = _dropout_word(seed, counter) >= threshold.to(tl.uint32)
    return values.to(tl.float32) * tl.where(keep, scale, 0.0)


# ---- forward ------------------------------------------------------------------------------------


# Not specialised on the seed (new every training call) nor the threshold (a value of 1 would turn constexpr).
@triton.jit(do_not_specialize=["seed", "threshold"])
def _forward_kernel(
    x_ptr, w_in_ptr, w_hidden_ptr, bias_ptr, w_out_ptr, bias_out_ptr, out_ptr, z_ptr,
    num_rows, in_features, split_size, width, num_layers, out_features, negative_slope,
    seed, sites_per_row, threshold, scale,
    HAS_BIAS: tl.constexpr, HAS_OUT: tl.constexpr, ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    hidden = num_layers * width
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < num_rows
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * in_features
    units = tl.arange(0, BLOCK_W)
    unit_mask = units < width
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    hidden_offsets = rows.to(tl.int64)[:, None] * hidden + units[None, :]
    square_mask = unit_mask[:, None] & unit_mask[None, :]

    h = tl.zeros([BLOCK_B, BLOCK_W], dtype)
    for layer in range(num_layers):
        acc = tl.zeros([BLOCK_B, BLOCK_W], tl.float32)
        for j0 in range(0, split_size, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            j_mask = j < split_size
            x_tile = tl.load(x_rows + ((layer * split_size + j) % in_features)[None, :],
                             mask=row_mask[:, None] & j_mask[None, :], other=0.0)
            if DROPOUT:
                x_tile = _dropped(x_tile, rows, _window_site(layer, split_size, width) + j, seed, sites_per_row,
                                  threshold, scale).to(dtype)
            a_tile = tl.load(w_in_ptr + (layer * width + units)[:, None] * split_size + j[None, :],
                             mask=unit_mask[:, None] & j_mask[None, :], other=0.0)
            acc = tl.dot(x_tile, tl.trans(a_tile), acc, input_precision="ieee")
        if layer > 0:
            r_tile = tl.load(w_hidden_ptr + ((layer - 1) * width + units)[:, None] * width + units[None, :],
                             mask=square_mask, other=0.0)
            h_in = h
            if DROPOUT:  # h_{l-1} as layer l's input; H keeps the undropped h
                h_in = _dropped(h, rows, _window_site(layer, split_size, width) + split_size + units, seed,
                                sites_per_row, threshold, scale).to(dtype)
            acc = tl.dot(h_in, tl.trans(r_tile), acc, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(bias_ptr + layer * width + units, mask=unit_mask, other=0.0).to(tl.float32)[None, :]
        z = acc.to(dtype)
        tl.store(z_ptr + hidden_offsets + layer * width, z, mask=tile_mask)
        # Zero the padding units (they may hold inf*0 = NaN) before they meet R's padding.
        h = tl.where(unit_mask[None, :], _activate(z.to(tl.float32), ACTIVATION, negative_slope), 0.0).to(dtype)
        if not HAS_OUT:
            tl.store(out_ptr + hidden_offsets + layer * width, h, mask=tile_mask)

    if HAS_OUT:
        tl.debug_barrier()  # Z rows written above by other threads of this program
        for m0 in range(0, out_features, BLOCK_M):
            outs = m0 + tl.arange(0, BLOCK_M)
            out_mask = outs < out_features
            acc = tl.zeros([BLOCK_B, BLOCK_M], tl.float32)
            for layer in range(num_layers):
                h = _hidden_block(z_ptr, rows, row_mask, hidden, layer, width, units, unit_mask,
                                  ACTIVATION, negative_slope)
                if DROPOUT:  # H as the projection's input
                    h = _dropped(h, rows, _window_site(num_layers, split_size, width) + layer * width + units, seed,
                                 sites_per_row, threshold, scale).to(dtype)
                w_tile = tl.load(w_out_ptr + outs[:, None] * hidden + layer * width + units[None, :],
                                 mask=out_mask[:, None] & unit_mask[None, :], other=0.0)
                acc = tl.dot(h, tl.trans(w_tile), acc, input_precision="ieee")
            if HAS_BIAS:
                acc += tl.load(bias_out_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * out_features + outs[None, :], acc.to(dtype),
                     mask=row_mask[:, None] & out_mask[None, :])


# ---- backward, launch 1: data gradients ----------------------------------------------------------


# Not specialised on the seed (new every training call) nor the threshold (a value of 1 would turn constexpr).
@triton.jit(do_not_specialize=["seed", "threshold"])
def _backward_data_kernel(
    grad_out_ptr, z_ptr, w_in_ptr, w_hidden_ptr, w_out_ptr, grad_z_ptr, grad_x_ptr,
    num_rows, in_features, split_size, width, num_layers, out_features, negative_slope,
    seed, sites_per_row, threshold, scale,
    HAS_OUT: tl.constexpr, ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    dtype = z_ptr.dtype.element_ty
    hidden = num_layers * width
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < num_rows
    rows64 = rows.to(tl.int64)
    units = tl.arange(0, BLOCK_W)
    unit_mask = units < width
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    hidden_offsets = rows64[:, None] * hidden + units[None, :]

    grad_z_next = tl.zeros([BLOCK_B, BLOCK_W], dtype)
    for step in range(num_layers):
        layer = num_layers - 1 - step
        grad_h = tl.zeros([BLOCK_B, BLOCK_W], tl.float32)
        if HAS_OUT:
            for m0 in range(0, out_features, BLOCK_M):
                outs = m0 + tl.arange(0, BLOCK_M)
                out_mask = outs < out_features
                g_tile = tl.load(grad_out_ptr + rows64[:, None] * out_features + outs[None, :],
                                 mask=row_mask[:, None] & out_mask[None, :], other=0.0)
                w_tile = tl.load(w_out_ptr + outs[:, None] * hidden + layer * width + units[None, :],
                                 mask=out_mask[:, None] & unit_mask[None, :], other=0.0)
                grad_h = tl.dot(g_tile, w_tile, grad_h, input_precision="ieee")
            if DROPOUT:  # through the projection input's mask
                grad_h = _dropped(grad_h, rows, _window_site(num_layers, split_size, width) + layer * width + units,
                                  seed, sites_per_row, threshold, scale)
        else:
            grad_h += tl.load(grad_out_ptr + hidden_offsets + layer * width, mask=tile_mask, other=0.0).to(tl.float32)
        if layer < num_layers - 1:
            # weight_hidden[layer] is R_{layer+1}, which fed h_layer into z_{layer+1}.
            r_tile = tl.load(w_hidden_ptr + (layer * width + units)[:, None] * width + units[None, :],
                             mask=unit_mask[:, None] & unit_mask[None, :], other=0.0)
            if DROPOUT:  # through layer + 1's mask on h_layer: its own product, then the mask
                grad_h += _dropped(tl.dot(grad_z_next, r_tile, input_precision="ieee"), rows,
                                   _window_site(layer + 1, split_size, width) + split_size + units, seed,
                                   sites_per_row, threshold, scale)
            else:
                grad_h = tl.dot(grad_z_next, r_tile, grad_h, input_precision="ieee")
        z = tl.load(z_ptr + hidden_offsets + layer * width, mask=tile_mask, other=0.0).to(tl.float32)
        grad_z = tl.where(unit_mask[None, :], grad_h * _activate_grad(z, ACTIVATION, negative_slope), 0.0).to(dtype)
        tl.store(grad_z_ptr + hidden_offsets + layer * width, grad_z, mask=tile_mask)
        grad_z_next = grad_z

    tl.debug_barrier()  # dZ rows written above by other threads of this program
    for c0 in range(0, in_features, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        col_mask = cols < in_features
        acc = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
        for layer in range(num_layers):
            # Position of column c in layer l's window, valid when < s.
            j = (cols + in_features - (layer * split_size) % in_features) % in_features
            j_mask = col_mask & (j < split_size)
            if tl.max(j_mask.to(tl.int32), axis=0) > 0:
                grad_z = tl.load(grad_z_ptr + hidden_offsets + layer * width, mask=tile_mask, other=0.0)
                a_tile = tl.load(w_in_ptr + (layer * width + units)[:, None] * split_size + j[None, :],
                                 mask=unit_mask[:, None] & j_mask[None, :], other=0.0)
                # Columns outside the window are masked after the product, where inf*0 may sit.
                part = tl.dot(grad_z, a_tile, input_precision="ieee")
                if DROPOUT:  # through layer l's mask on its window
                    part = _dropped(part, rows, _window_site(layer, split_size, width) + j, seed, sites_per_row,
                                    threshold, scale)
                acc += tl.where(j_mask[None, :], part, 0.0)
        tl.store(grad_x_ptr + rows64[:, None] * in_features + cols[None, :], acc.to(dtype),
                 mask=row_mask[:, None] & col_mask[None, :])


# ---- backward, launch 2: weight and bias gradients -------------------------------------------------


@triton.jit
def _grad_weight_in_tile(
    x_ptr, grad_z_ptr, grad_w_in_ptr, grad_bias_ptr, layer, split_tile,
    num_rows, in_features, split_size, width, hidden, seed, sites_per_row, threshold, scale,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW_in[l][:, j-chunk] = dZ_l^T @ x[:, window chunk] (dropped); the first chunk also gives db_l."""
    units = tl.arange(0, BLOCK_W)
    unit_mask = units < width
    j = split_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    j_mask = j < split_size
    cols = (layer * split_size + j) % in_features
    acc = tl.zeros([BLOCK_W, BLOCK_K], tl.float32)
    bias_acc = tl.zeros([BLOCK_W], tl.float32)
    for b0 in range(0, num_rows, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < num_rows
        rows64 = rows.to(tl.int64)
        grad_z = tl.load(grad_z_ptr + rows64[:, None] * hidden + layer * width + units[None, :],
                         mask=row_mask[:, None] & unit_mask[None, :], other=0.0)
        x_tile = tl.load(x_ptr + rows64[:, None] * in_features + cols[None, :],
                         mask=row_mask[:, None] & j_mask[None, :], other=0.0)
        if DROPOUT:
            x_tile = _dropped(x_tile, rows, _window_site(layer, split_size, width) + j, seed, sites_per_row,
                              threshold, scale).to(grad_z.dtype)
        acc = tl.dot(tl.trans(grad_z), x_tile, acc, input_precision="ieee")
        bias_acc += tl.sum(grad_z.to(tl.float32), axis=0)
    tl.store(grad_w_in_ptr + (layer * width + units)[:, None] * split_size + j[None, :],
             acc.to(grad_w_in_ptr.dtype.element_ty), mask=unit_mask[:, None] & j_mask[None, :])
    if HAS_BIAS:
        if split_tile == 0:
            tl.store(grad_bias_ptr + layer * width + units, bias_acc.to(grad_bias_ptr.dtype.element_ty),
                     mask=unit_mask)


@triton.jit
def _grad_weight_hidden_tile(
    z_ptr, grad_z_ptr, grad_w_hidden_ptr, layer, num_rows, split_size, width, hidden, negative_slope,
    seed, sites_per_row, threshold, scale,
    ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """dR_l = dZ_l^T @ h_{l-1} (dropped as layer l's input), stored at weight_hidden[l-1]."""
    units = tl.arange(0, BLOCK_W)
    unit_mask = units < width
    acc = tl.zeros([BLOCK_W, BLOCK_W], tl.float32)
    for b0 in range(0, num_rows, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < num_rows
        grad_z = tl.load(grad_z_ptr + rows.to(tl.int64)[:, None] * hidden + layer * width + units[None, :],
                         mask=row_mask[:, None] & unit_mask[None, :], other=0.0)
        h_prev = _hidden_block(z_ptr, rows, row_mask, hidden, layer - 1, width, units, unit_mask,
                               ACTIVATION, negative_slope)
        if DROPOUT:
            h_prev = _dropped(h_prev, rows, _window_site(layer, split_size, width) + split_size + units, seed,
                              sites_per_row, threshold, scale).to(grad_z.dtype)
        acc = tl.dot(tl.trans(grad_z), h_prev, acc, input_precision="ieee")
    tl.store(grad_w_hidden_ptr + ((layer - 1) * width + units)[:, None] * width + units[None, :],
             acc.to(grad_w_hidden_ptr.dtype.element_ty), mask=unit_mask[:, None] & unit_mask[None, :])


@triton.jit
def _grad_weight_out_tile(
    grad_out_ptr, z_ptr, grad_w_out_ptr, grad_bias_out_ptr, layer, out_tile,
    num_rows, width, hidden, out_features, negative_slope, projection_site, seed, sites_per_row, threshold, scale,
    HAS_BIAS_OUT: tl.constexpr, ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dW_out[m-chunk, l-th block] = grad_out^T @ h_l (dropped as the projection's input); layer 0's
    tiles also give db_out."""
    units = tl.arange(0, BLOCK_W)
    unit_mask = units < width
    outs = out_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    out_mask = outs < out_features
    acc = tl.zeros([BLOCK_M, BLOCK_W], tl.float32)
    bias_acc = tl.zeros([BLOCK_M], tl.float32)
    for b0 in range(0, num_rows, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < num_rows
        g_tile = tl.load(grad_out_ptr + rows.to(tl.int64)[:, None] * out_features + outs[None, :],
                         mask=row_mask[:, None] & out_mask[None, :], other=0.0)
        h = _hidden_block(z_ptr, rows, row_mask, hidden, layer, width, units, unit_mask,
                          ACTIVATION, negative_slope)
        if DROPOUT:
            h = _dropped(h, rows, projection_site + layer * width + units, seed, sites_per_row, threshold,
                         scale).to(g_tile.dtype)
        acc = tl.dot(tl.trans(g_tile), h, acc, input_precision="ieee")
        bias_acc += tl.sum(g_tile.to(tl.float32), axis=0)
    tl.store(grad_w_out_ptr + outs[:, None] * hidden + layer * width + units[None, :],
             acc.to(grad_w_out_ptr.dtype.element_ty), mask=out_mask[:, None] & unit_mask[None, :])
    if HAS_BIAS_OUT:
        if layer == 0:
            tl.store(grad_bias_out_ptr + outs, bias_acc.to(grad_bias_out_ptr.dtype.element_ty), mask=out_mask)


# Not specialised on the seed (new every training call) nor the threshold (a value of 1 would turn constexpr).
@triton.jit(do_not_specialize=["seed", "threshold"])
def _backward_weights_kernel(
    grad_out_ptr, x_ptr, z_ptr, grad_z_ptr,
    grad_w_in_ptr, grad_w_hidden_ptr, grad_bias_ptr, grad_w_out_ptr, grad_bias_out_ptr,
    num_rows, in_features, split_size, width, num_layers, out_features, negative_slope,
    seed, sites_per_row, threshold, scale,
    HAS_BIAS: tl.constexpr, HAS_BIAS_OUT: tl.constexpr, HAS_OUT: tl.constexpr, ACTIVATION: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Each branch is a helper call: Triton requires names assigned in both arms of a runtime
    # `if` to share one type, and the three tile kinds have different accumulator shapes.
    hidden = num_layers * width
    split_tiles = tl.cdiv(split_size, BLOCK_K)
    w_in_tiles = num_layers * split_tiles
    tile = tl.program_id(0)
    if tile < w_in_tiles:
        _grad_weight_in_tile(x_ptr, grad_z_ptr, grad_w_in_ptr, grad_bias_ptr, tile // split_tiles,
                             tile % split_tiles, num_rows, in_features, split_size, width, hidden,
                             seed, sites_per_row, threshold, scale, HAS_BIAS, DROPOUT, BLOCK_B, BLOCK_W, BLOCK_K)
    elif tile < w_in_tiles + num_layers - 1:
        _grad_weight_hidden_tile(z_ptr, grad_z_ptr, grad_w_hidden_ptr, tile - w_in_tiles + 1, num_rows,
                                 split_size, width, hidden, negative_slope, seed, sites_per_row, threshold, scale,
                                 ACTIVATION, DROPOUT, BLOCK_B, BLOCK_W)
    elif HAS_OUT:
        out_tile = tile - w_in_tiles - (num_layers - 1)
        _grad_weight_out_tile(grad_out_ptr, z_ptr, grad_w_out_ptr, grad_bias_out_ptr, out_tile % num_layers,
                              out_tile // num_layers, num_rows, width, hidden, out_features, negative_slope,
                              _window_site(num_layers, split_size, width), seed, sites_per_row, threshold, scale,
                              HAS_BIAS_OUT, ACTIVATION, DROPOUT, BLOCK_B, BLOCK_W, BLOCK_M)


# ---- host side: block sizes and launches -------------------------------------------------------------


def block_width(layer_width: int) -> int:
    """Units of one layer held by a program: a power of two >= 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(layer_width))


def launch_config(layer_width: int) -> dict:
    """Block sizes and warps of every launch: heuristics sized for the register budget, not yet
    tuned on a GPU (tests/triton_aot.py reports registers and spills per variant)."""
    block_w = block_width(layer_width)
    return dict(
        BLOCK_B=16 if block_w >= 64 else 32,
        BLOCK_W=block_w,
        BLOCK_K=32,
        BLOCK_M=32,
        num_warps=8 if block_w >= 128 else 4,
    )


def _activation_id(activation: str) -> int:
    return ACTIVATIONS.index(activation)


# The kernels' dropout scalars (seed, sites_per_row, threshold, scale) of a call without dropout:
# with DROPOUT=False the kernels never read them.
NO_DROPOUT = (0, 0, 0, 1.0)


def shape_arguments(x: torch.Tensor, weight_in: torch.Tensor, weight_out: Optional[torch.Tensor],
                    negative_slope: float) -> tuple[tuple, bool]:
    """The scalar arguments every kernel of both kernel sets takes, in their order (B, N, s, w, L,
    M, negative_slope), and whether the layer has an output projection."""
    num_rows, in_features = x.shape
    num_layers, width, split_size = weight_in.shape
    has_out = weight_out is not None
    out_features = weight_out.shape[0] if has_out else num_layers * width
    return (num_rows, in_features, split_size, width, num_layers, out_features, float(negative_slope)), has_out


def data_gradients(kernel, blocks: dict, grad_out: torch.Tensor, x: torch.Tensor, pre_activation: torch.Tensor,
                   weight_in: torch.Tensor, weight_hidden: torch.Tensor, weight_out: Optional[torch.Tensor],
                   common: tuple, act: int, dropout: Optional[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dZ) from backward launch 1 of either kernel set (``kernel``: its data-gradient kernel,
    one program per BLOCK_B rows; ``dropout``: the dropout scalars of launch.py, or None)."""
    stand_in = weight_in  # pointer for absent tensors, never read or written
    grad_x = torch.empty_like(x)
    grad_z = torch.empty_like(pre_activation)
    if x.shape[0] > 0:
        kernel[(triton.cdiv(x.shape[0], blocks["BLOCK_B"]),)](
            grad_out, pre_activation, weight_in, weight_hidden if weight_hidden.numel() else stand_in,
            weight_out if weight_out is not None else stand_in, grad_z, grad_x, *common, *(dropout or NO_DROPOUT),
            HAS_OUT=weight_out is not None, ACTIVATION=act, DROPOUT=dropout is not None, **blocks,
        )
    return grad_x, grad_z


def weight_gradient_outputs(x: torch.Tensor, weight_in: torch.Tensor, weight_hidden: torch.Tensor,
                            weight_out: Optional[torch.Tensor], has_bias: bool,
                            has_bias_out: bool) -> tuple[torch.Tensor, ...]:
    """Uninitialised weight gradients (dW_in, dR, db, dW_out, db_out); the unwanted bias ones empty."""
    num_layers, width, _ = weight_in.shape
    grad_bias = x.new_empty((num_layers, width) if has_bias else (0,))
    grad_w_out = torch.empty_like(weight_out) if weight_out is not None else x.new_empty(0)
    grad_bias_out = x.new_empty(weight_out.shape[0] if has_bias_out else 0)
    return torch.empty_like(weight_in), torch.empty_like(weight_hidden), grad_bias, grad_w_out, grad_bias_out


def spinal_forward(
    x: torch.Tensor,
    weight_in: torch.Tensor,
    weight_hidden: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight_out: Optional[torch.Tensor],
    bias_out: Optional[torch.Tensor],
    activation: str,
    negative_slope: float,
    dropout: Optional[tuple] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, Z) of the fused forward, in one launch. Inputs are contiguous and checked by the caller.
    The kernel always writes Z (its only cost is the store). ``dropout``: the scalars (seed, D,
    threshold, scale) of a training call that drops, else None."""
    num_rows, in_features = x.shape
    num_layers, width, split_size = weight_in.shape
    has_out = weight_out is not None
    out_features = weight_out.shape[0] if has_out else num_layers * width
    out = x.new_empty(num_rows, out_features)
    z = x.new_empty(num_rows, num_layers * width)
    if num_rows == 0:
        return out, z
    blocks = launch_config(width)
    grid = (triton.cdiv(num_rows, blocks["BLOCK_B"]),)
    # Absent tensors are never read; any valid pointer stands in for them.
    _forward_kernel[grid](
        x, weight_in, weight_hidden if weight_hidden.numel() else weight_in,
        bias if bias is not None else weight_in, weight_out if has_out else weight_in,
        bias_out if bias_out is not None else weight_in, out, z,
        num_rows, in_features, split_size, width, num_layers, out_features, float(negative_slope),
        *(dropout or NO_DROPOUT),
        HAS_BIAS=bias is not None, HAS_OUT=has_out, ACTIVATION=_activation_id(activation),
        DROPOUT=dropout is not None, **blocks,
    )
    return out, z


def spinal_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    pre_activation: torch.Tensor,
    weight_in: torch.Tensor,
    weight_hidden: torch.Tensor,
    weight_out: Optional[torch.Tensor],
    has_bias: bool,
    has_bias_out: bool,
    activation: str,
    negative_slope: float,
    dropout: Optional[tuple] = None,
) -> tuple[torch.Tensor, ...]:
    """Every gradient of the fused op in two launches (data, then weights); see the module docstring.
    ``has_bias`` / ``has_bias_out``: whether the layer-bias / output-bias gradients are wanted;
    ``dropout``: the forward's dropout scalars (launch.py), or None (the masks are recomputed)."""
    num_layers, width, split_size = weight_in.shape
    common, has_out = shape_arguments(x, weight_in, weight_out, negative_slope)
    out_features = common[5]
    blocks = launch_config(width)
    act = _activation_id(activation)
    stand_in = weight_in  # pointer for absent tensors, never read or written
    grad_x, grad_z = data_gradients(_backward_data_kernel, blocks, grad_out, x, pre_activation, weight_in,
                                    weight_hidden, weight_out, common, act, dropout)
    has_bias_out = has_bias_out and has_out
    grad_w_in, grad_w_hidden, grad_bias, grad_w_out, grad_bias_out = weight_gradient_outputs(
        x, weight_in, weight_hidden, weight_out, has_bias, has_bias_out)
    num_tiles = num_layers * triton.cdiv(split_size, blocks["BLOCK_K"]) + num_layers - 1
    if has_out:
        num_tiles += num_layers * triton.cdiv(out_features, blocks["BLOCK_M"])
    _backward_weights_kernel[(num_tiles,)](
        grad_out, x, pre_activation, grad_z,
        grad_w_in, grad_w_hidden if grad_w_hidden.numel() else stand_in,
        grad_bias if has_bias else stand_in, grad_w_out if has_out else stand_in,
        grad_bias_out if has_bias_out else stand_in,
        *common, *(dropout or NO_DROPOUT),
        HAS_BIAS=has_bias, HAS_BIAS_OUT=has_bias_out, HAS_OUT=has_out, ACTIVATION=act, DROPOUT=dropout is not None,
        **blocks,
    )
    return grad_x, grad_w_in, grad_w_hidden, grad_bias, grad_w_out, grad_bias_out

"""The tiled Triton kernels of the spinal layer: any layer width, weight gradients split over rows.

Run only when the switch of settings.py is on (``SPINAL_OPS_TRITON_TILED=1``): not yet measured on
a GPU. Imported lazily, like kernels.py, whose activation helpers they share.

Tiling and launch scheme
------------------------
Every tensor is row-major contiguous. B rows, N inputs, layer width w, L layers, split size s,
M outputs, hidden = L*w. Block sizes come from TILED_BLOCKS (per GPU generation and dtype, below). Nothing
holds a whole layer: every product loops over K-chunks (BLOCK_K) and output-column chunks
(BLOCK_N units, BLOCK_M outputs), so w, s, M and N are unbounded. h_{l-1} and dZ_{l+1} for a row
tile are read back from the Z / dZ buffer that the same program wrote (global memory, in L1/L2),
with a CTA barrier (tl.debug_barrier) between the layer that writes and the layer that reads.

forward  grid (cdiv(B, BLOCK_B),), one program per tile of BLOCK_B rows (BLOCK_B_SMALL rows when
  that gives fewer programs than SMs).
  phase 1, the chain: for l in 0..L-1, barrier, then for each chunk n of BLOCK_N units:
      acc[BLOCK_B, BLOCK_N]  = sum_j x[:, (l*s + j) % N] @ A_l[n, j]^T      j in BLOCK_K chunks
      acc                   += sum_k phi(Z[:, (l-1)*w + k]) @ R_l[n, k]^T  k in BLOCK_K chunks
      Z[:, l*w + n] = acc + b_l[n]     (M is None: out[:, l*w + n] = phi of it too)
  phase 2, the projection (M given), after a barrier: for each chunk m of BLOCK_M outputs,
      y[:, m] = sum_k phi(Z[:, k]) @ W_out[m, k]^T + b_out[m]        k over all of hidden
backward launch 1, data gradients: grid (cdiv(B, BLOCK_B),)
  phase 1: for l = L-1..0, barrier, then for each chunk n of BLOCK_N units:
      dH = grad_out @ W_out[:, l*w + n]  (M in BLOCK_M chunks; or grad_out[:, l*w + n])
      dH += sum_k dZ[:, (l+1)*w + k] @ R_{l+1}[k, n]                  k in BLOCK_K chunks
      dZ[:, l*w + n] = dH * phi'(Z[:, l*w + n])
  phase 2, after a barrier: for each chunk c of BLOCK_K input columns, for each layer whose
      window holds a column of c and each chunk n of units: dx[:, c] += dZ_l[:, n] @ A_l[n, j(c)]
      (the overlapping windows add up in registers in a fixed order: no races).
backward launch 2, weight gradients: grid (tiles, splits). A tile is one output block of one
  gradient; a split is one range of rows_per_split rows (a multiple of BLOCK_WB):
      L*cdiv(w,BLOCK_N)*cdiv(s,BLOCK_K) tiles  dW_in[l][n, j] = dZ_l[:, n]^T @ x[:, window j] (j = 0: + db_l[n])
      (L-1)*cdiv(w,BLOCK_N)*cdiv(w,BLOCK_K)    dR_l[n, k]    = dZ_l[:, n]^T @ phi(Z_{l-1}[:, k])
      cdiv(M,BLOCK_M)*cdiv(hidden,BLOCK_K)      dW_out[m, k]  = grad_out[:, m]^T @ phi(Z[:, k])   (k = 0: + db_out[m])
  Each program sums its rows in order. With one split it stores the gradient itself; with more it
  stores an fp32 partial sum in a workspace [splits, T] (T: every gradient's elements, one after
  another) and
backward launch 3 (only with splits > 1): grid (cdiv(T, BLOCK_R),), each program adds the splits'
  partial sums of BLOCK_R elements in split order 0, 1, ... and stores the gradients.
  The splits and their row ranges are a function of (B, the layer's shape, the block table) only,
  and every sum runs in a fixed order, so the gradients are bitwise the same on every run (no
  atomics); a different split count rounds differently, within contract §4.

Dropout (DROPOUT constexpr) uses the masks and sites of kernels.py (_dropped, _window_site) at the
same loads: the forward's x tiles (again for every unit chunk n) and K-chunks of h_{l-1} and of H;
launch 1's dH from the projection, the recurrence's sum over k (accumulated on its own, then
masked) and each dx part; launch 2's x tiles, h_{l-1} and H chunks. Launch 3 sums as before.

Accumulation is fp32 (tl.dot with input_precision="ieee"; half inputs on tensor cores). Z, dZ and
the gradients are stored in the input dtype. Row offsets are int64 (B*N may pass 2^31).

What a GPU must still measure: each unit chunk rereads the layer's window of x (w / BLOCK_N times
per layer, from L2 at best); the projection recomputes phi(Z) once per output chunk; at small B
few row tiles means few programs (B = 64: one), each walking the whole chain.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .kernels import (
    NO_DROPOUT,
    _activate,
    _activate_grad,
    _activation_id,
    _dropped,
    _hidden_block,
    _window_site,
    data_gradients,
    shape_arguments,
    weight_gradient_outputs,
)

# ---- block sizes per GPU generation ------------------------------------------------------------------
# UNMEASURED: not chosen from timings. Seeded so that `python scripts/triton_aot.py 90` (and 80)
# reports no spills (fp32's tl.dot on CUDA cores holds both operands in registers, hence its narrower
# unit chunks), with about 4 weight-gradient programs per SM. A GPU run of scripts/gpu_session.sh's
# triton stage (triton-tiled against triton-default and cuda) is to choose them; until then the
# tiled kernels run only behind the switch of settings.py. Keyed by compute capability major (a newer
# GPU takes the newest older row), then "half" (float16, bfloat16) or "float32"; "interpreter" is
# for CPU tensors under TRITON_INTERPRET=1 (small blocks, so that tests run every loop more than once).
#   BLOCK_B   rows per program of the forward and the data-gradient launch; BLOCK_B_SMALL when
#             BLOCK_B would leave SMs idle (fewer row tiles than sms): more programs walk the chain
#   BLOCK_N   units per output chunk; BLOCK_K: depth of each product chunk; BLOCK_M: outputs per chunk
#   BLOCK_WB  rows per step of the weight-gradient programs; BLOCK_R: elements per reduction program
#   target_programs     weight-gradient programs to aim for (about 4 per SM)
#   min_rows_per_split  fewest rows one split of the weight gradients sums
#   max_workspace       most fp32 elements of the split workspace (splits x gradients' elements)


def _generation(sms: int, float32_rows: int) -> dict:
    common = dict(BLOCK_R=1024, BLOCK_B_SMALL=16, sms=sms, target_programs=4 * sms, min_rows_per_split=1024,
                  max_workspace=1 << 26)
    return {
        "half": dict(BLOCK_B=64, BLOCK_N=64, BLOCK_K=32, BLOCK_M=64, BLOCK_WB=64, num_warps=8, **common),
        "float32": dict(BLOCK_B=float32_rows, BLOCK_N=32, BLOCK_K=32, BLOCK_M=32, BLOCK_WB=float32_rows, num_warps=8,
                        **common),
    }


TILED_BLOCKS: dict = {
    8: _generation(sms=108, float32_rows=32),  # A100-like (sm_80 spills fp32 at 64 rows)
    9: _generation(sms=132, float32_rows=64),  # H100, H200
    "interpreter": dict(BLOCK_B=16, BLOCK_N=16, BLOCK_K=16, BLOCK_M=16, BLOCK_WB=16, BLOCK_R=256, num_warps=4,
                        BLOCK_B_SMALL=16, sms=1, target_programs=256, min_rows_per_split=16, max_workspace=1 << 20),
}
LAUNCH_KEYS = ("BLOCK_B", "BLOCK_N", "BLOCK_K", "BLOCK_M", "num_warps")


@functools.lru_cache(maxsize=None)
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def block_table(device: torch.device, dtype: torch.dtype) -> dict:
    """The TILED_BLOCKS row for this device and dtype: its compute capability's, the newest older
    one's for a newer GPU, the oldest's for an older one."""
    if device.type != "cuda":
        return TILED_BLOCKS["interpreter"]
    major = _capability_major(device.index if device.index is not None else torch.cuda.current_device())
    known = sorted(key for key in TILED_BLOCKS if isinstance(key, int))
    older = [key for key in known if key <= major]
    generation = TILED_BLOCKS[older[-1] if older else known[0]]
    return generation["float32" if dtype == torch.float32 else "half"]


def row_splits(num_rows: int, num_tiles: int, workspace_per_split: int, table: dict) -> tuple[int, int]:
    """(splits, rows_per_split) of the weight-gradient launch: enough programs to fill the GPU,
    each split at least min_rows_per_split rows, the workspace within max_workspace. A function of
    the shape and the table only (never of timing), so the result's bits are too."""
    block = table["BLOCK_WB"]
    splits = max(1, min(
        table["target_programs"] // max(num_tiles, 1),
        num_rows // table["min_rows_per_split"],
        table["max_workspace"] // max(workspace_per_split, 1),
    ))
    rows_per_split = triton.cdiv(triton.cdiv(max(num_rows, 1), splits), block) * block
    return triton.cdiv(max(num_rows, 1), rows_per_split), rows_per_split


# ---- forward ------------------------------------------------------------------------------------


# Not specialised on the seed (new every training call) nor the threshold (a value of 1 would turn constexpr).
@triton.jit(do_not_specialize=["seed", "threshold"])
def _tiled_forward_kernel(
    x_ptr, w_in_ptr, w_hidden_ptr, bias_ptr, w_out_ptr, bias_out_ptr, out_ptr, z_ptr,
    num_rows, in_features, split_size, width, num_layers, out_features, negative_slope,
    seed, sites_per_row, threshold, scale,
    HAS_BIAS: tl.constexpr, HAS_OUT: tl.constexpr, ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    hidden = num_layers * width
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < num_rows
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * in_features
    chunk = tl.arange(0, BLOCK_K)

    for layer in range(num_layers):
        tl.debug_barrier()  # Z of layer - 1, written by other threads of this program
        for n0 in range(0, width, BLOCK_N):
            units = n0 + tl.arange(0, BLOCK_N)
            unit_mask = units < width
            acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
            for j0 in range(0, split_size, BLOCK_K):
                j = j0 + chunk
                j_mask = j < split_size
                x_tile = tl.load(x_rows + ((layer * split_size + j) % in_features)[None, :],
                                 mask=row_mask[:, None] & j_mask[None, :], other=0.0)
                if DROPOUT:
                    x_tile = _dropped(x_tile, rows, _window_site(layer, split_size, width) + j, seed,
                                      sites_per_row, threshold, scale).to(dtype)
                a_tile = tl.load(w_in_ptr + (layer * width + units)[:, None] * split_size + j[None, :],
                                 mask=unit_mask[:, None] & j_mask[None, :], other=0.0)
                acc = tl.dot(x_tile, tl.trans(a_tile), acc, input_precision="ieee")
            if layer > 0:
                for k0 in range(0, width, BLOCK_K):
                    k = k0 + chunk
                    k_mask = k < width
                    # h_{l-1} from the Z this program stored; zero past the valid rows and units.
                    h = _hidden_block(z_ptr, rows, row_mask, hidden, layer - 1, width, k, k_mask,
                                      ACTIVATION, negative_slope)
                    if DROPOUT:  # h_{l-1} as layer l's input
                        h = _dropped(h, rows, _window_site(layer, split_size, width) + split_size + k, seed,
                                     sites_per_row, threshold, scale).to(dtype)
                    r_tile = tl.load(w_hidden_ptr + ((layer - 1) * width + units)[:, None] * width + k[None, :],
                                     mask=unit_mask[:, None] & k_mask[None, :], other=0.0)
                    acc = tl.dot(h, tl.trans(r_tile), acc, input_precision="ieee")
            if HAS_BIAS:
                acc += tl.load(bias_ptr + layer * width + units, mask=unit_mask, other=0.0).to(tl.float32)[None, :]
            z = acc.to(dtype)
            offsets = rows64[:, None] * hidden + (layer * width + units)[None, :]
            tile_mask = row_mask[:, None] & unit_mask[None, :]
            tl.store(z_ptr + offsets, z, mask=tile_mask)
            if not HAS_OUT:
                tl.store(out_ptr + offsets, _activate(z.to(tl.float32), ACTIVATION, negative_slope).to(dtype),
                         mask=tile_mask)

    if HAS_OUT:
        tl.debug_barrier()  # Z of every layer
        for m0 in range(0, out_features, BLOCK_M):
            outs = m0 + tl.arange(0, BLOCK_M)
            out_mask = outs < out_features
            acc = tl.zeros([BLOCK_B, BLOCK_M], tl.float32)
            # H is Z's row with phi applied: one reduction over all hidden columns, layers in order.
            for k0 in range(0, hidden, BLOCK_K):
                k = k0 + chunk
                k_mask = k < hidden
                h = _hidden_block(z_ptr, rows, row_mask, hidden, 0, 0, k, k_mask, ACTIVATION, negative_slope)
                if DROPOUT:  # H as the projection's input
                    h = _dropped(h, rows, _window_site(num_layers, split_size, width) + k, seed, sites_per_row,
                                 threshold, scale).to(dtype)
                w_tile = tl.load(w_out_ptr + outs[:, None] * hidden + k[None, :],
                                 mask=out_mask[:, None] & k_mask[None, :], other=0.0)
                acc = tl.dot(h, tl.trans(w_tile), acc, input_precision="ieee")
            if HAS_BIAS:
                acc += tl.load(bias_out_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rows64[:, None] * out_features + outs[None, :], acc.to(dtype),
                     mask=row_mask[:, None] & out_mask[None, :])


# ---- backward, launch 1: data gradients ----------------------------------------------------------


# Not specialised on the seed (new every training call) nor the threshold (a value of 1 would turn constexpr).
@triton.jit(do_not_specialize=["seed", "threshold"])
def _tiled_backward_data_kernel(
    grad_out_ptr, z_ptr, w_in_ptr, w_hidden_ptr, w_out_ptr, grad_z_ptr, grad_x_ptr,
    num_rows, in_features, split_size, width, num_layers, out_features, negative_slope,
    seed, sites_per_row, threshold, scale,
    HAS_OUT: tl.constexpr, ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    dtype = z_ptr.dtype.element_ty
    hidden = num_layers * width
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < num_rows
    rows64 = rows.to(tl.int64)
    hidden_rows = rows64[:, None] * hidden
    chunk = tl.arange(0, BLOCK_K)

    for step in range(num_layers):
        layer = num_layers - 1 - step
        tl.debug_barrier()  # dZ of layer + 1, written by other threads of this program
        for n0 in range(0, width, BLOCK_N):
            units = n0 + tl.arange(0, BLOCK_N)
            unit_mask = units < width
            tile_mask = row_mask[:, None] & unit_mask[None, :]
            grad_h = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
            if HAS_OUT:
                for m0 in range(0, out_features, BLOCK_M):
                    outs = m0 + tl.arange(0, BLOCK_M)
                    out_mask = outs < out_features
                    g_tile = tl.load(grad_out_ptr + rows64[:, None] * out_features + outs[None, :],
                                     mask=row_mask[:, None] & out_mask[None, :], other=0.0)
                    w_tile = tl.load(w_out_ptr + outs[:, None] * hidden + (layer * width + units)[None, :],
                                     mask=out_mask[:, None] & unit_mask[None, :], other=0.0)
                    grad_h = tl.dot(g_tile, w_tile, grad_h, input_precision="ieee")
                if DROPOUT:  # through the projection input's mask
                    grad_h = _dropped(grad_h, rows, _window_site(num_layers, split_size, width) + layer * width + units,
                                      seed, sites_per_row, threshold, scale)
            else:
                grad_h += tl.load(grad_out_ptr + hidden_rows + (layer * width + units)[None, :],
                                  mask=tile_mask, other=0.0).to(tl.float32)
            if layer < num_layers - 1:
                # With dropout the recurrence's part is summed on its own, then goes through layer
                # + 1's mask on h_layer.
                grad_next = tl.zeros([BLOCK_B, BLOCK_N], tl.float32) if DROPOUT else grad_h
                for k0 in range(0, width, BLOCK_K):
                    k = k0 + chunk
                    k_mask = k < width
                    grad_z_next = tl.load(grad_z_ptr + hidden_rows + ((layer + 1) * width + k)[None, :],
                                          mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                    # weight_hidden[layer] is R_{layer+1}, which fed h_layer into z_{layer+1}.
                    r_tile = tl.load(w_hidden_ptr + (layer * width + k)[:, None] * width + units[None, :],
                                     mask=k_mask[:, None] & unit_mask[None, :], other=0.0)
                    grad_next = tl.dot(grad_z_next, r_tile, grad_next, input_precision="ieee")
                if DROPOUT:
                    grad_h += _dropped(grad_next, rows, _window_site(layer + 1, split_size, width) + split_size + units,
                                       seed, sites_per_row, threshold, scale)
                else:
                    grad_h = grad_next
            z = tl.load(z_ptr + hidden_rows + (layer * width + units)[None, :], mask=tile_mask, other=0.0)
            grad_z = grad_h * _activate_grad(z.to(tl.float32), ACTIVATION, negative_slope)
            tl.store(grad_z_ptr + hidden_rows + (layer * width + units)[None, :], grad_z.to(dtype), mask=tile_mask)

    tl.debug_barrier()  # dZ of every layer
    for c0 in range(0, in_features, BLOCK_K):
        cols = c0 + chunk
        col_mask = cols < in_features
        acc = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
        for layer in range(num_layers):
            # Position of column c in layer l's window, valid when < s.
            j = (cols + in_features - (layer * split_size) % in_features) % in_features
            j_mask = col_mask & (j < split_size)
            if tl.max(j_mask.to(tl.int32), axis=0) > 0:
                for n0 in range(0, width, BLOCK_N):
                    units = n0 + tl.arange(0, BLOCK_N)
                    unit_mask = units < width
                    grad_z = tl.load(grad_z_ptr + hidden_rows + (layer * width + units)[None, :],
                                     mask=row_mask[:, None] & unit_mask[None, :], other=0.0)
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


# ---- backward, launch 2: weight and bias gradients, per (tile, row split) --------------------------


@triton.jit
def _store_gradient(grad_ptr, workspace_ptr, workspace_offset, index, values, mask, SPLIT: tl.constexpr):
    """One split: the gradient itself, in its dtype. Several: this split's fp32 partial sum."""
    if SPLIT:
        tl.store(workspace_ptr + workspace_offset + index, values, mask=mask)
    else:
        tl.store(grad_ptr + index, values.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tiled_grad_weight_in(
    x_ptr, grad_z_ptr, grad_w_in_ptr, grad_bias_ptr, workspace_ptr, split_offset, bias_segment,
    layer, unit_tile, split_tile, row_begin, row_end, in_features, split_size, width, hidden,
    seed, sites_per_row, threshold, scale,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_WB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW_in[l][n, j] = dZ_l[:, n]^T @ x[:, window j] (dropped) over this split's rows; j-chunk 0 also
    db_l[n]."""
    units = unit_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    unit_mask = units < width
    j = split_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    j_mask = j < split_size
    cols = (layer * split_size + j) % in_features
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    bias_acc = tl.zeros([BLOCK_N], tl.float32)
    for b0 in range(row_begin, row_end, BLOCK_WB):
        rows = b0 + tl.arange(0, BLOCK_WB)
        row_mask = rows < row_end
        rows64 = rows.to(tl.int64)
        grad_z = tl.load(grad_z_ptr + rows64[:, None] * hidden + (layer * width + units)[None, :],
                         mask=row_mask[:, None] & unit_mask[None, :], other=0.0)
        x_tile = tl.load(x_ptr + rows64[:, None] * in_features + cols[None, :],
                         mask=row_mask[:, None] & j_mask[None, :], other=0.0)
        if DROPOUT:
            x_tile = _dropped(x_tile, rows, _window_site(layer, split_size, width) + j, seed, sites_per_row,
                              threshold, scale).to(grad_z.dtype)
        acc = tl.dot(tl.trans(grad_z), x_tile, acc, input_precision="ieee")
        bias_acc += tl.sum(grad_z.to(tl.float32), axis=0)
    _store_gradient(grad_w_in_ptr, workspace_ptr, split_offset,
                    (layer * width + units)[:, None] * split_size + j[None, :], acc,
                    unit_mask[:, None] & j_mask[None, :], SPLIT)
    if HAS_BIAS:
        if split_tile == 0:
            _store_gradient(grad_bias_ptr, workspace_ptr, split_offset + bias_segment, layer * width + units,
                            bias_acc, unit_mask, SPLIT)


@triton.jit
def _tiled_grad_weight_hidden(
    z_ptr, grad_z_ptr, grad_w_hidden_ptr, workspace_ptr, split_offset,
    layer, unit_tile, k_tile, row_begin, row_end, split_size, width, hidden, negative_slope,
    seed, sites_per_row, threshold, scale,
    ACTIVATION: tl.constexpr, SPLIT: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_WB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dR_l[n, k] = dZ_l[:, n]^T @ phi(Z_{l-1}[:, k]) (dropped as layer l's input), stored at
    weight_hidden[l-1]."""
    units = unit_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    unit_mask = units < width
    k = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < width
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for b0 in range(row_begin, row_end, BLOCK_WB):
        rows = b0 + tl.arange(0, BLOCK_WB)
        row_mask = rows < row_end
        grad_z = tl.load(grad_z_ptr + rows.to(tl.int64)[:, None] * hidden + (layer * width + units)[None, :],
                         mask=row_mask[:, None] & unit_mask[None, :], other=0.0)
        h_prev = _hidden_block(z_ptr, rows, row_mask, hidden, layer - 1, width, k, k_mask,
                               ACTIVATION, negative_slope)
        if DROPOUT:
            h_prev = _dropped(h_prev, rows, _window_site(layer, split_size, width) + split_size + k, seed,
                              sites_per_row, threshold, scale).to(grad_z.dtype)
        acc = tl.dot(tl.trans(grad_z), h_prev, acc, input_precision="ieee")
    _store_gradient(grad_w_hidden_ptr, workspace_ptr, split_offset,
                    ((layer - 1) * width + units)[:, None] * width + k[None, :], acc,
                    unit_mask[:, None] & k_mask[None, :], SPLIT)


@triton.jit
def _tiled_grad_weight_out(
    grad_out_ptr, z_ptr, grad_w_out_ptr, grad_bias_out_ptr, workspace_ptr, split_offset, bias_out_segment,
    out_tile, k_tile, row_begin, row_end, hidden, out_features, negative_slope,
    projection_site, seed, sites_per_row, threshold, scale,
    HAS_BIAS_OUT: tl.constexpr, ACTIVATION: tl.constexpr, SPLIT: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_WB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW_out[m, k] = grad_out[:, m]^T @ phi(Z[:, k]) (dropped as the projection's input); k-chunk 0
    also db_out[m]."""
    outs = out_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    out_mask = outs < out_features
    k = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < hidden
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    bias_acc = tl.zeros([BLOCK_M], tl.float32)
    for b0 in range(row_begin, row_end, BLOCK_WB):
        rows = b0 + tl.arange(0, BLOCK_WB)
        row_mask = rows < row_end
        g_tile = tl.load(grad_out_ptr + rows.to(tl.int64)[:, None] * out_features + outs[None, :],
                         mask=row_mask[:, None] & out_mask[None, :], other=0.0)
        h = _hidden_block(z_ptr, rows, row_mask, hidden, 0, 0, k, k_mask, ACTIVATION, negative_slope)
        if DROPOUT:
            h = _dropped(h, rows, projection_site + k, seed, sites_per_row, threshold, scale).to(g_tile.dtype)
        acc = tl.dot(tl.trans(g_tile), h, acc, input_precision="ieee")
        bias_acc += tl.sum(g_tile.to(tl.float32), axis=0)
    _store_gradient(grad_w_out_ptr, workspace_ptr, split_offset, outs[:, None] * hidden + k[None, :], acc,
                    out_mask[:, None] & k_mask[None, :], SPLIT)
    if HAS_BIAS_OUT:
        if k_tile == 0:
            _store_gradient(grad_bias_out_ptr, workspace_ptr, split_offset + bias_out_segment, outs, bias_acc,
                            out_mask, SPLIT)


# Not specialised on the seed (new every training call) nor the threshold (a value of 1 would turn constexpr).
@triton.jit(do_not_specialize=["seed", "threshold"])
def _tiled_backward_weights_kernel(
    grad_out_ptr, x_ptr, z_ptr, grad_z_ptr,
    grad_w_in_ptr, grad_w_hidden_ptr, grad_bias_ptr, grad_w_out_ptr, grad_bias_out_ptr, workspace_ptr,
    num_rows, in_features, split_size, width, num_layers, out_features, negative_slope,
    seed, sites_per_row, threshold, scale,
    rows_per_split, workspace_stride, hidden_segment, bias_segment, out_segment, bias_out_segment,
    HAS_BIAS: tl.constexpr, HAS_BIAS_OUT: tl.constexpr, HAS_OUT: tl.constexpr, ACTIVATION: tl.constexpr,
    SPLIT: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_WB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Each tile kind is a helper call: names assigned in both arms of a runtime `if` must share
    # one type in Triton, and the kinds' accumulators differ. The *_segment arguments are the
    # workspace offsets of each gradient (SPLIT only).
    hidden = num_layers * width
    unit_tiles = tl.cdiv(width, BLOCK_N)
    split_tiles = tl.cdiv(split_size, BLOCK_K)
    width_tiles = tl.cdiv(width, BLOCK_K)
    w_in_tiles = num_layers * unit_tiles * split_tiles
    hidden_tiles = (num_layers - 1) * unit_tiles * width_tiles
    tile = tl.program_id(0)
    split = tl.program_id(1)
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, num_rows)
    split_offset = split.to(tl.int64) * workspace_stride
    if tile < w_in_tiles:
        per_layer = unit_tiles * split_tiles
        rest = tile % per_layer
        _tiled_grad_weight_in(x_ptr, grad_z_ptr, grad_w_in_ptr, grad_bias_ptr, workspace_ptr, split_offset,
                              bias_segment, tile // per_layer, rest // split_tiles, rest % split_tiles,
                              row_begin, row_end, in_features, split_size, width, hidden,
                              seed, sites_per_row, threshold, scale, HAS_BIAS, SPLIT, DROPOUT,
                              BLOCK_WB, BLOCK_N, BLOCK_K)
    elif tile < w_in_tiles + hidden_tiles:
        t = tile - w_in_tiles
        per_layer = unit_tiles * width_tiles
        rest = t % per_layer
        _tiled_grad_weight_hidden(z_ptr, grad_z_ptr, grad_w_hidden_ptr, workspace_ptr, split_offset + hidden_segment,
                                  t // per_layer + 1, rest // width_tiles, rest % width_tiles, row_begin, row_end,
                                  split_size, width, hidden, negative_slope, seed, sites_per_row, threshold, scale,
                                  ACTIVATION, SPLIT, DROPOUT, BLOCK_WB, BLOCK_N, BLOCK_K)
    elif HAS_OUT:
        t = tile - w_in_tiles - hidden_tiles
        hidden_k_tiles = tl.cdiv(hidden, BLOCK_K)
        _tiled_grad_weight_out(grad_out_ptr, z_ptr, grad_w_out_ptr, grad_bias_out_ptr, workspace_ptr,
                               split_offset + out_segment, bias_out_segment - out_segment,
                               t // hidden_k_tiles, t % hidden_k_tiles, row_begin, row_end, hidden, out_features,
                               negative_slope, _window_site(num_layers, split_size, width), seed, sites_per_row,
                               threshold, scale, HAS_BIAS_OUT, ACTIVATION, SPLIT, DROPOUT, BLOCK_WB, BLOCK_M, BLOCK_K)


# ---- backward, launch 3 (splits > 1): the fixed-order sum of the splits ----------------------------


@triton.jit
def _store_segment(grad_ptr, index, begin, end, values):
    mask = (index >= begin) & (index < end)
    tl.store(grad_ptr + (index - begin), values.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_splits_kernel(
    workspace_ptr, grad_w_in_ptr, grad_w_hidden_ptr, grad_bias_ptr, grad_w_out_ptr, grad_bias_out_ptr,
    splits, workspace_stride, hidden_segment, bias_segment, out_segment, bias_out_segment,
    BLOCK_R: tl.constexpr,
):
    index = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = index < workspace_stride
    acc = tl.zeros([BLOCK_R], tl.float32)
    partial_ptr = workspace_ptr + index
    for _ in range(splits):  # split order 0, 1, ...: the same bits on every run
        acc += tl.load(partial_ptr, mask=mask, other=0.0)
        partial_ptr += workspace_stride  # pointer arithmetic: 64-bit
    # Segments [0, hidden) w_in, [hidden, bias) w_hidden, [bias, out) bias, [out, bias_out) w_out,
    # [bias_out, stride) bias_out; an absent gradient's segment is empty.
    _store_segment(grad_w_in_ptr, index, 0, hidden_segment, acc)
    _store_segment(grad_w_hidden_ptr, index, hidden_segment, bias_segment, acc)
    _store_segment(grad_bias_ptr, index, bias_segment, out_segment, acc)
    _store_segment(grad_w_out_ptr, index, out_segment, bias_out_segment, acc)
    _store_segment(grad_bias_out_ptr, index, bias_out_segment, workspace_stride, acc)


# ---- host side -------------------------------------------------------------------------------------


def launch_blocks(table: dict, num_rows: int) -> dict:
    """Block sizes of the forward and data-gradient launches: smaller row tiles when the table's
    would give fewer programs than SMs."""
    blocks = {key: table[key] for key in LAUNCH_KEYS}
    if triton.cdiv(num_rows, blocks["BLOCK_B"]) < table["sms"]:
        blocks["BLOCK_B"] = table["BLOCK_B_SMALL"]
    return blocks


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
    """(out, Z) in one launch of the tiled forward. Inputs are contiguous and checked by the caller.
    ``dropout``: the dropout scalars of launch.py, or None."""
    num_rows, in_features = x.shape
    num_layers, width, split_size = weight_in.shape
    has_out = weight_out is not None
    out_features = weight_out.shape[0] if has_out else num_layers * width
    out = x.new_empty(num_rows, out_features)
    z = x.new_empty(num_rows, num_layers * width)
    if num_rows == 0:
        return out, z
    blocks = launch_blocks(block_table(x.device, x.dtype), num_rows)
    grid = (triton.cdiv(num_rows, blocks["BLOCK_B"]),)
    _tiled_forward_kernel[grid](
        x, weight_in, weight_hidden if weight_hidden.numel() else weight_in,
        bias if bias is not None else weight_in, weight_out if has_out else weight_in,
        bias_out if bias_out is not None else weight_in, out, z,
        num_rows, in_features, split_size, width, num_layers, out_features, float(negative_slope),
        *(dropout or NO_DROPOUT),
        HAS_BIAS=bias is not None, HAS_OUT=has_out, ACTIVATION=_activation_id(activation),
        DROPOUT=dropout is not None, **blocks,
    )
    return out, z


def weight_tiles(num_layers: int, width: int, split_size: int, out_features: Optional[int], table: dict) -> int:
    """Output tiles of the weight-gradient launch (its grid's first dimension)."""
    cdiv = triton.cdiv
    tiles = num_layers * cdiv(width, table["BLOCK_N"]) * cdiv(split_size, table["BLOCK_K"])
    tiles += (num_layers - 1) * cdiv(width, table["BLOCK_N"]) * cdiv(width, table["BLOCK_K"])
    if out_features is not None:
        tiles += cdiv(out_features, table["BLOCK_M"]) * cdiv(num_layers * width, table["BLOCK_K"])
    return tiles


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
    splits: Optional[int] = None,
) -> tuple[torch.Tensor, ...]:
    """Every gradient in two launches (data, weights), three when the weight gradients are split
    over rows. ``dropout``: the forward's dropout scalars (launch.py), or None (the masks are
    recomputed). ``splits`` overrides row_splits() (tests)."""
    num_rows = x.shape[0]
    num_layers, width, split_size = weight_in.shape
    common, has_out = shape_arguments(x, weight_in, weight_out, negative_slope)
    out_features = common[5]
    table = block_table(x.device, x.dtype)
    blocks = launch_blocks(table, num_rows)
    act = _activation_id(activation)
    stand_in = weight_in  # pointer for absent tensors, never read or written
    grad_x, grad_z = data_gradients(_tiled_backward_data_kernel, blocks, grad_out, x, pre_activation, weight_in,
                                    weight_hidden, weight_out, common, act, dropout)
    has_bias_out = has_bias_out and has_out
    grad_w_in, grad_w_hidden, grad_bias, grad_w_out, grad_bias_out = weight_gradient_outputs(
        x, weight_in, weight_hidden, weight_out, has_bias, has_bias_out)
    # Workspace segments, one per gradient, in the order of the reduction kernel.
    hidden_segment = grad_w_in.numel()
    bias_segment = hidden_segment + grad_w_hidden.numel()
    out_segment = bias_segment + grad_bias.numel()
    bias_out_segment = out_segment + grad_w_out.numel()
    workspace_stride = bias_out_segment + grad_bias_out.numel()

    num_tiles = weight_tiles(num_layers, width, split_size, out_features if has_out else None, table)
    if splits is None:
        splits, rows_per_split = row_splits(num_rows, num_tiles, workspace_stride, table)
    else:
        rows_per_split = triton.cdiv(triton.cdiv(max(num_rows, 1), splits), table["BLOCK_WB"]) * table["BLOCK_WB"]
        splits = triton.cdiv(max(num_rows, 1), rows_per_split)
    split = splits > 1
    workspace = x.new_empty((splits, workspace_stride) if split else (0,), dtype=torch.float32)
    grads = (grad_w_in, grad_w_hidden if grad_w_hidden.numel() else stand_in, grad_bias if has_bias else stand_in,
             grad_w_out if has_out else stand_in, grad_bias_out if has_bias_out else stand_in)
    segments = (hidden_segment, bias_segment, out_segment, bias_out_segment)
    _tiled_backward_weights_kernel[(num_tiles, splits)](
        grad_out, x, pre_activation, grad_z, *grads, workspace if split else stand_in,
        *common, *(dropout or NO_DROPOUT), rows_per_split, workspace_stride, *segments,
        HAS_BIAS=has_bias, HAS_BIAS_OUT=has_bias_out, HAS_OUT=has_out, ACTIVATION=act, SPLIT=split,
        DROPOUT=dropout is not None,
        BLOCK_WB=table["BLOCK_WB"], BLOCK_N=table["BLOCK_N"], BLOCK_K=table["BLOCK_K"], BLOCK_M=table["BLOCK_M"],
        num_warps=table["num_warps"],
    )
    if split:
        _reduce_splits_kernel[(triton.cdiv(workspace_stride, table["BLOCK_R"]),)](
            workspace, *grads, splits, workspace_stride, *segments, BLOCK_R=table["BLOCK_R"],
        )
    return grad_x, grad_w_in, grad_w_hidden, grad_bias, grad_w_out, grad_bias_out

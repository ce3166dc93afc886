// Tile backward kernels of the spinal layer (launched by backward.cu): TWO launches whatever L is.
//
// Launch 1, spinal_data_grad_kernel (data gradients, one CTA per tile of kTileM rows, 256 threads;
//   kTileM as in forward_kernel.cuh: 64 for fp16/bf16 on sm_80+, 32 for fp32 and for fp16 on sm_75):
//   walks the chain backwards with dz_{l+1} kept on chip (two smem state buffers, as in forward):
//     dh_l = g * W_out[:, l*w:(l+1)*w]   (K = M, g staged from grad_out; or dh_l = g[:, l] without M)
//          + dz_{l+1} * R_{l+1}          (K = w, A operand = the on-chip state buffer)
//     dz_l = dh_l * phi'(Z_l)  -> dZ workspace [B, L*w] (dtype) and the other state buffer
//   then dx in 128-column chunks: dx[:, c0:c0+128] = sum over the layers whose window meets the
//   chunk of dZ_l * A_l restricted to those columns (wrap-around resolved per column), accumulated
//   in fp32 over all layers and written once: deterministic, no atomics, no zero-fill of dx.
//   It also zeroes the split-K tile counters launch 2 uses (saves a memset launch).
// Launch 2, spinal_weight_grad_kernel (every weight/bias gradient as a batched reduction over rows):
//   jobs  IN_l  (l < L):    grad_weight_in[l] (w x s) and grad_bias[l] = dZ_l^T [x[:, window_l] | 1]
//         HID_l (1 <= l < L): grad_weight_hidden[l-1] (w x w) = dZ_l^T phi(Z_{l-1})
//         OUT   (M given):  grad_weight_out (M x L*w) and grad_bias_out = g^T [phi(Z) | 1]
//   (the "| 1" column turns the bias gradient into one more output column of the same GEMM).
//   grid = (tiles of kTileM x 128 over all jobs) x splits; a CTA reduces rows
//   [split*rows_per_split, ...) in 32-row chunks (A operand column-major: dZ rows as staged).
//   splits > 1 only when there are too few tiles to fill the GPU: each CTA then writes its fp32
//   partial tile to a workspace, and the last CTA of the tile to arrive (atomic ticket) sums the
//   partials in split order 0..splits-1: the result does not depend on arrival order, so it is
//   deterministic without float atomics.
// Dropout (the kernels' Drops instances, as in forward_kernel.cuh): the backward
//   recomputes the forward's factors, one Philox per element where it scales or stages one.
//   Launch 1: dh_l = (g W_out) * F_H + (dz_{l+1} R_{l+1}) * F_h,l+1, each product scaled in the
//   epilogue by its own factors; with both, the first is stored, scaled and parked in dz_l's state
//   columns of the chunk (rounded to the dtype; only this chunk's epilogue writes them) while the
//   recurrence's product runs (one extra acc store and barrier per chunk). dx: each layer's
//   dz_l A_l is scaled by its window's factors, so instead of summing on chip it is stored and
//   added into dx as each layer is done (dx rounded to the dtype per layer, as eager's dx is):
//   per 128-column chunk of x, s words per row and layer that reads it.
//   Launch 2: the input side is staged dropped, as the forward read it: x's window, h_{l-1}, H
//   (one Philox per staged element: each is staged once per kTileM-row tile of its gradient,
//   ceil(w / kTileM) times for x and h, ceil(M / kTileM) for H).
// Smem: the same SmemLayout as forward (tile_mma.cuh): <= 117 KB (launch 1), <= 52 KB (launch 2).
//   sm_75 (T4, 64 KB): fp16 in 32-row tiles, <= 62 KB (launch 1) and 29 KB (launch 2); fp32 on
//   SimtMma, w <= 96 (launch 1) and 37 KB (launch 2); bf16 and TF32 are not run there (forward_kernel.cuh).
//   ptxas -v, sm_75: launch 1 SimtMma<32> 79 registers, WmmaMma<32, half> 71; launch 2 63 and 64;
//   no spills. sm_90 (CUDA 13.0), without / with dropout: launch 1 SimtMma<32> 48 / 64, TF32
//   78 / 80, WmmaMma<64, half> 124 / 122, bf16 128 / 128 (82 bytes spilled with dropout); launch 2
//   SimtMma<32> 63 / 48 (12 bytes spilled with dropout), half 72 / 76, bf16 72 / 80.
// Offsets into x, grad_out, Z, dZ and dx are 64-bit.
#pragma once

#include <algorithm>

#include "kernels.h"
#include "tile_mma.cuh"

namespace spinal_ops {
namespace cuda_kernels {

template <typename T>
struct DataGradArgs : ChainDims {
  const T* grad_out;
  const T* pre_activation;
  const T* weight_in;
  const T* weight_hidden;
  const T* weight_out;  // nullable
  T* grad_pre;          // dZ workspace [B, L*w]
  T* grad_x;
  int* tile_counters;  // zeroed here for launch 2 (nullable)
  int64_t num_counters;
  DropoutKey dropout_key;  // last (tile_mma.cuh)
};

// Launch 1 zeroes launch 2's split-K tile counters (saves a memset launch), over the whole grid.
template <typename T>
__device__ __forceinline__ void zero_split_k_counters(const DataGradArgs<T>& p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.num_counters; i += stride) {
    p.tile_counters[i] = 0;
  }
}

template <class Mma, typename T, bool Drops>
__device__ __forceinline__ void data_grad_tile(const DataGradArgs<T>& p) {
  constexpr int kM = Mma::kTileM;
  extern __shared__ __align__(128) unsigned char smem[];
  const SmemViews<Mma, T> sm(smem, p.state_width);
  const int ld_state = sm.layout.state_ld;
  const int ld_a = SmemLayout<Mma, T>::staged_ld(kTileK);  // sm.a_stage [kM][kTileK]
  const int ld_b = SmemLayout<Mma, T>::staged_ld(kTileN);  // sm.b_stage [kTileK][kTileN]

  zero_split_k_counters(p);

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kM;
  const int64_t hidden = static_cast<int64_t>(p.num_layers) * p.w;
  const auto row_valid = [&](int m) { return row0 + m < p.batch; };
  const Dropout dropout = kernel_dropout(p, p.dropout_key);  // used where drops
  constexpr bool drops = Drops;

  Mma acc;
  for (int layer = p.num_layers - 1; layer >= 0; --layer) {
    const SmemPtr<const T> dz_next = sm.state((layer + 1) & 1);
    const SmemPtr<T> dz_cur = sm.state(layer & 1);
    const T* r_next = p.weight_hidden + static_cast<int64_t>(layer) * p.w * p.w;  // R_{layer+1}
    const int64_t layer_col = static_cast<int64_t>(layer) * p.w;
    const bool has_next = layer + 1 < p.num_layers;
    // Dropout: dH_l is scaled by H's factors, dz_{l+1} R_{l+1} by those of h_l as layer l+1's input.
    const int64_t projection_site = dropout.projection_site() + layer_col;
    const int64_t next_hidden_site = dropout.hidden_site(layer + 1);
    // Both products present: their factors differ, so dH_l's scaled chunk is parked in dz_cur's
    // columns of the chunk (written only by this chunk's epilogue) before the recurrence's product.
    const bool parks = drops && p.out_features > 0 && has_next;

    for (int n0 = 0; n0 < p.w; n0 += kTileN) {
      acc.zero();
      for (int k0 = 0; k0 < p.out_features; k0 += kTileK) {
        __syncthreads();
        fill_tile(sm.a_stage, ld_a, kM, kTileK, [&](int m, int k) {
          return row_valid(m) && k0 + k < p.out_features ? p.grad_out[(row0 + m) * p.out_features + k0 + k] : T(0);
        });
        fill_tile(sm.b_stage, ld_b, kTileK, kTileN, [&](int k, int n) {
          return k0 + k < p.out_features && n0 + n < p.w
                     ? p.weight_out[static_cast<int64_t>(k0 + k) * hidden + layer_col + n0 + n]
                     : T(0);
        });
        __syncthreads();
        acc.template mma<Layout::Row, Layout::Row>(sm.a_stage, ld_a, sm.b_stage, ld_b, kTileK);
      }
      const int cols = min(kTileN, p.state_width - n0);
      if (parks) {  // no barrier before the store: the projection's K-loop (M >= 1) ends with one
        acc.store(sm.acc_tile, kAccLd);
        __syncthreads();
        for (int idx = threadIdx.x; idx < kM * cols; idx += kThreads) {
          const int m = idx / cols, n = idx - m * cols, c = n0 + n;
          if (c < p.w) {
            dz_cur[m * ld_state + c] =
                static_cast<T>(sm.acc_tile[m * kAccLd + n] * dropout.factor(row0 + m, projection_site + c));
          }
        }
        acc.zero();
      }
      if (has_next) {
        for (int k0 = 0; k0 < p.state_width; k0 += kTileK) {
          __syncthreads();
          fill_tile(sm.b_stage, ld_b, kTileK, kTileN, [&](int k, int n) {
            return k0 + k < p.w && n0 + n < p.w ? r_next[static_cast<int64_t>(k0 + k) * p.w + n0 + n] : T(0);
          });
          __syncthreads();
          acc.template mma<Layout::Row, Layout::Row>(dz_next + k0, ld_state, sm.b_stage, ld_b, kTileK);
        }
      }
      __syncthreads();
      acc.store(sm.acc_tile, kAccLd);
      __syncthreads();
      for (int idx = threadIdx.x; idx < kM * cols; idx += kThreads) {
        const int m = idx / cols, n = idx - m * cols, c = n0 + n;
        T dz = T(0);
        if (c < p.w && row_valid(m)) {
          const int64_t offset = (row0 + m) * hidden + layer_col + c;
          float dh = sm.acc_tile[m * kAccLd + n];
          if (parks) {
            const T parked = dz_cur[m * ld_state + c];
            dh = dh * dropout.factor(row0 + m, next_hidden_site + c) + static_cast<float>(parked);
          } else if (drops && (p.out_features > 0 || has_next)) {
            dh *= dropout.factor(row0 + m, p.out_features > 0 ? projection_site + c : next_hidden_site + c);
          }
          if (p.out_features == 0) dh += static_cast<float>(p.grad_out[offset]);
          const float z = static_cast<float>(p.pre_activation[offset]);
          dz = static_cast<T>(dh * activate_grad(p.act, z, p.slope));
          p.grad_pre[offset] = dz;
        }
        dz_cur[m * ld_state + c] = dz;
      }
    }
  }

  // dx, one 128-column chunk at a time, summed over the layers that read it. With dropout each
  // layer's product is scaled by its own window factors, so each is added into dx as it is done
  // (rounded to T per layer, as the eager reference's dx); without, they add up on chip.
  for (int c0 = 0; c0 < p.n; c0 += kTileN) {
    const int c_end = min(c0 + kTileN, p.n);
    bool dropped_written = false;  // dropout: dx's chunk holds the layers so far
    acc.zero();
    for (int layer = 0; layer < p.num_layers; ++layer) {
      const Window window = window_of(layer, p.n, p.s);
      if (!window.intersects(c0, c_end)) continue;
      const T* a_l = p.weight_in + static_cast<int64_t>(layer) * p.w * p.s;
      const int64_t layer_col = static_cast<int64_t>(layer) * p.w;
      for (int k0 = 0; k0 < p.state_width; k0 += kTileK) {
        __syncthreads();  // also orders this CTA's dZ stores before the loads below
        fill_tile(sm.a_stage, ld_a, kM, kTileK, [&](int m, int k) {
          return row_valid(m) && k0 + k < p.w ? p.grad_pre[(row0 + m) * hidden + layer_col + k0 + k] : T(0);
        });
        fill_tile(sm.b_stage, ld_b, kTileK, kTileN, [&](int k, int n) {
          if (k0 + k >= p.w || c0 + n >= c_end) return T(0);
          const int j = window.position(c0 + n);
          return j >= 0 ? a_l[static_cast<int64_t>(k0 + k) * p.s + j] : T(0);
        });
        __syncthreads();
        acc.template mma<Layout::Row, Layout::Row>(sm.a_stage, ld_a, sm.b_stage, ld_b, kTileK);
      }
      if constexpr (drops) {
        const int64_t window_site = dropout.window_site(layer);
        acc.store(sm.acc_tile, kAccLd);  // as the park above: the K-loop (w >= 1) ordered it
        __syncthreads();
        for (int idx = threadIdx.x; idx < kM * kTileN; idx += kThreads) {
          const int m = idx / kTileN, n = idx - m * kTileN;
          if (!row_valid(m) || c0 + n >= c_end) continue;
          const int j = window.position(c0 + n);
          const int64_t offset = (row0 + m) * p.n + c0 + n;
          float dx = j >= 0 ? sm.acc_tile[m * kAccLd + n] * dropout.factor(row0 + m, window_site + j) : 0.f;
          if (dropped_written) dx += static_cast<float>(p.grad_x[offset]);
          p.grad_x[offset] = static_cast<T>(dx);
        }
        acc.zero();
        dropped_written = true;
      }
    }
    if (dropped_written) continue;
    __syncthreads();
    acc.store(sm.acc_tile, kAccLd);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kM * kTileN; idx += kThreads) {
      const int m = idx / kTileN, n = idx - m * kTileN;
      if (row_valid(m) && c0 + n < c_end) p.grad_x[(row0 + m) * p.n + c0 + n] = static_cast<T>(sm.acc_tile[m * kAccLd + n]);
    }
  }
}

// Drops: compiled with the dropout stage or without it, as spinal_forward_kernel.
template <class Mma, typename T, bool Drops>
__global__ void __launch_bounds__(kThreads) spinal_data_grad_kernel(const DataGradArgs<T> p) {
  if constexpr (kRunsOnThisArch<Mma, T>) {
    data_grad_tile<Mma, T, Drops>(p);
  } else {
    unsupported_arch();
  }
}

// Tiles of the weight-gradient jobs, in launch order IN_0..IN_{L-1}, HID_1..HID_{L-1}, OUT.
struct GradTiles {
  int64_t in_i, in_j, hid_i, hid_j, out_i, out_j;
  int64_t in_total, hid_total, total;
};

enum class JobKind { In, Hidden, Out };

template <typename T>
struct WeightGradArgs : ChainDims {
  bool has_bias, has_bias_out;  // extra "ones" column of the IN / OUT jobs
  GradTiles tiles;
  int splits;
  int64_t rows_per_split;
  const T* grad_out;
  const T* x;
  const T* pre_activation;
  const T* grad_pre;
  T* grad_weight_in;
  T* grad_weight_hidden;
  T* grad_bias;        // nullable
  T* grad_weight_out;  // nullable
  T* grad_bias_out;    // nullable
  float* partials;     // [tiles.total * splits][kTileM * kTileN] when splits > 1
  int* tile_counters;  // [tiles.total] when splits > 1
  DropoutKey dropout_key;  // last (tile_mma.cuh)
};

// Which gradient a launch-2 tile computes: its job (kind and layer), its position among that
// job's tiles, and the job's extent (rows i x columns j, bias column included).
struct GradJob {
  JobKind kind;
  int layer;           // IN_l / HID_l: l; OUT: 0
  int64_t local_tile;  // index among the job's tiles, row-major over tiles_j columns of tiles
  int64_t tiles_j;
  int i_extent, j_extent;
};

template <typename T>
__device__ GradJob decode_grad_job(const WeightGradArgs<T>& p, int64_t tile) {
  const GradTiles& t = p.tiles;
  if (tile < t.in_total) {
    const int64_t per_job = t.in_i * t.in_j;
    return {JobKind::In, static_cast<int>(tile / per_job), tile % per_job, t.in_j, p.w, p.s + (p.has_bias ? 1 : 0)};
  }
  if (tile < t.in_total + t.hid_total) {
    const int64_t per_job = t.hid_i * t.hid_j, local = tile - t.in_total;
    return {JobKind::Hidden, 1 + static_cast<int>(local / per_job), local % per_job, t.hid_j, p.w, p.w};
  }
  return {JobKind::Out, 0, tile - t.in_total - t.hid_total, t.out_j, p.out_features,
          p.num_layers * p.w + (p.has_bias_out ? 1 : 0)};
}

template <class Mma, typename T, bool Drops>
__device__ __forceinline__ void weight_grad_tile(const WeightGradArgs<T>& p) {
  constexpr int kM = Mma::kTileM;
  extern __shared__ __align__(128) unsigned char smem[];
  // No state buffers; a_stage [kTileK][kM] holds rows of P (A column-major), b_stage [kTileK][kTileN] rows of Q.
  const SmemViews<Mma, T> sm(smem, 0);
  const int ld_a = SmemLayout<Mma, T>::staged_ld(kM);
  const int ld_b = SmemLayout<Mma, T>::staged_ld(kTileN);

  const int64_t tile = static_cast<int64_t>(blockIdx.x) / p.splits;
  const int split = static_cast<int>(static_cast<int64_t>(blockIdx.x) % p.splits);
  const int hidden = p.num_layers * p.w;
  const GradJob job = decode_grad_job(p, tile);
  const JobKind kind = job.kind;
  const int layer = job.layer, i_extent = job.i_extent, j_extent = job.j_extent;
  const int i0 = static_cast<int>(job.local_tile / job.tiles_j) * kM;
  const int j0 = static_cast<int>(job.local_tile % job.tiles_j) * kTileN;
  const int64_t layer_col = static_cast<int64_t>(layer) * p.w;
  const Window window = window_of(layer, p.n, p.s);

  // P(r, i): the gradient side; Q(r, j): the input side (with the bias column of ones).
  const auto p_value = [&](int64_t r, int i) -> T {
    return kind == JobKind::Out ? p.grad_out[r * p.out_features + i] : p.grad_pre[r * hidden + layer_col + i];
  };
  // With dropout, the input side is what the forward's product read: x's window, h_{l-1} and H
  // times their factors (the bias column stays 1).
  const Dropout dropout = kernel_dropout(p, p.dropout_key);  // used where drops
  constexpr bool drops = Drops;
  const int64_t q_site = kind == JobKind::In       ? dropout.window_site(layer)
                         : kind == JobKind::Hidden ? dropout.hidden_site(layer)
                                                   : dropout.projection_site();
  const auto q_value = [&](int64_t r, int j) -> T {
    T v;
    switch (kind) {
      case JobKind::In:
        if (j >= p.s) return T(1);
        v = p.x[r * p.n + window.column(j)];
        break;
      case JobKind::Hidden:
        v = static_cast<T>(
            activate(p.act, static_cast<float>(p.pre_activation[r * hidden + layer_col - p.w + j]), p.slope));
        break;
      default:
        if (j >= hidden) return T(1);
        v = static_cast<T>(activate(p.act, static_cast<float>(p.pre_activation[r * hidden + j]), p.slope));
    }
    return drops ? dropped(dropout, v, r, q_site + j) : v;
  };

  const int64_t r_begin = split * p.rows_per_split;
  const int64_t r_end = r_begin + p.rows_per_split < p.batch ? r_begin + p.rows_per_split : p.batch;
  Mma acc;
  acc.zero();
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kTileK) {
    __syncthreads();
    fill_tile(sm.a_stage, ld_a, kTileK, kM, [&](int r, int i) {
      return r0 + r < r_end && i0 + i < i_extent ? p_value(r0 + r, i0 + i) : T(0);
    });
    fill_tile(sm.b_stage, ld_b, kTileK, kTileN, [&](int r, int j) {
      return r0 + r < r_end && j0 + j < j_extent ? q_value(r0 + r, j0 + j) : T(0);
    });
    __syncthreads();
    acc.template mma<Layout::Col, Layout::Row>(sm.a_stage, ld_a, sm.b_stage, ld_b, kTileK);
  }
  acc.store(sm.acc_tile, kAccLd);
  __syncthreads();

  const auto write = [&](int i, int j, float value) {
    const T v = static_cast<T>(value);
    switch (kind) {
      case JobKind::In:
        if (j < p.s) {
          p.grad_weight_in[(layer_col + i) * p.s + j] = v;
        } else {
          p.grad_bias[layer_col + i] = v;
        }
        break;
      case JobKind::Hidden:
        p.grad_weight_hidden[(layer_col - p.w + i) * p.w + j] = v;
        break;
      default:
        if (j < hidden) {
          p.grad_weight_out[static_cast<int64_t>(i) * hidden + j] = v;
        } else {
          p.grad_bias_out[i] = v;
        }
    }
  };

  constexpr int kTileElems = kM * kTileN;
  if (p.splits == 1) {
    for (int idx = threadIdx.x; idx < kTileElems; idx += kThreads) {
      const int m = idx / kTileN, n = idx - m * kTileN;
      if (i0 + m < i_extent && j0 + n < j_extent) write(i0 + m, j0 + n, sm.acc_tile[m * kAccLd + n]);
    }
    return;
  }
  const GlobalPtr<float> tile_partials = p.partials + tile * p.splits * kTileElems;
  for (int idx = threadIdx.x; idx < kTileElems; idx += kThreads) {
    tile_partials[split * kTileElems + idx] = sm.acc_tile[(idx / kTileN) * kAccLd + idx % kTileN];
  }
  __threadfence();  // publish the partial before taking a ticket
  __syncthreads();
  const bool last_to_arrive =
      __syncthreads_or(threadIdx.x == 0 && atomicAdd(&p.tile_counters[tile], 1) == p.splits - 1);
  if (!last_to_arrive) return;
  __threadfence();
  for (int idx = threadIdx.x; idx < kTileElems; idx += kThreads) {
    const int m = idx / kTileN, n = idx - m * kTileN;
    if (i0 + m >= i_extent || j0 + n >= j_extent) continue;
    float sum = 0.f;
    for (int sp = 0; sp < p.splits; ++sp) sum += __ldcg(tile_partials + sp * kTileElems + idx);  // L2, not stale L1
    write(i0 + m, j0 + n, sum);
  }
  if (threadIdx.x == 0) p.tile_counters[tile] = 0;
}

template <class Mma, typename T, bool Drops>
__global__ void __launch_bounds__(kThreads) spinal_weight_grad_kernel(const WeightGradArgs<T> p) {
  if constexpr (kRunsOnThisArch<Mma, T>) {
    weight_grad_tile<Mma, T, Drops>(p);
  } else {
    unsupported_arch();
  }
}

// How launch 2 splits its work: tiles of every job, and the row split (split-K).
struct WeightGradPlan {
  GradTiles tiles;
  int64_t splits, rows_per_split;
};

template <int TileM>
WeightGradPlan plan_weight_grads(const SpinalShape& shape, int sm_count) {
  const int64_t w = shape.layer_width, bias_col = shape.has_bias ? 1 : 0;
  WeightGradPlan plan{};
  GradTiles& tiles = plan.tiles;
  tiles.in_i = ceil_div(w, TileM);
  tiles.in_j = ceil_div(shape.split_size + bias_col, kTileN);
  tiles.hid_i = ceil_div(w, TileM);
  tiles.hid_j = ceil_div(w, kTileN);
  tiles.out_i = shape.out_features > 0 ? ceil_div(shape.out_features, TileM) : 0;
  tiles.out_j = ceil_div(shape.hidden() + (shape.has_bias_out ? 1 : 0), kTileN);
  tiles.in_total = shape.num_layers * tiles.in_i * tiles.in_j;
  tiles.hid_total = (shape.num_layers - 1) * tiles.hid_i * tiles.hid_j;
  tiles.total = tiles.in_total + tiles.hid_total + tiles.out_i * tiles.out_j;
  // Split the rows only to fill the GPU (about two CTAs per SM), keeping >= 256 rows per split.
  const int64_t target_ctas = 2 * static_cast<int64_t>(sm_count);
  const int64_t splits =
      std::max<int64_t>(1, std::min(ceil_div(target_ctas, tiles.total), ceil_div(shape.batch, 256)));
  plan.rows_per_split = round_up(ceil_div(shape.batch, splits), kTileK);
  plan.splits = ceil_div(shape.batch, plan.rows_per_split);  // no empty split
  return plan;
}

template <typename T>
T* nonempty_data(const at::Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// Launch 1's arguments. tile_counters: launch 2's counters to zero (nullptr when splits == 1).
template <typename T>
DataGradArgs<T> make_data_grad_args(const SpinalShape& shape, const at::Tensor& grad_out,
                                    const at::Tensor& pre_activation, const at::Tensor& weight_in,
                                    const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
                                    Activation act, float slope, const Dropout& dropout, const at::Tensor& grad_pre,
                                    const at::Tensor& grad_x, int* tile_counters, int64_t num_counters) {
  DataGradArgs<T> d{};
  static_cast<ChainDims&>(d) = chain_dims(shape, act, slope);
  d.grad_out = grad_out.data_ptr<T>();
  d.pre_activation = pre_activation.data_ptr<T>();
  d.weight_in = weight_in.data_ptr<T>();
  d.weight_hidden = weight_hidden.data_ptr<T>();
  d.weight_out = optional_data<T>(weight_out);
  d.grad_pre = grad_pre.data_ptr<T>();
  d.grad_x = grad_x.data_ptr<T>();
  d.tile_counters = tile_counters;
  d.num_counters = tile_counters ? num_counters : 0;
  d.dropout_key = dropout_key(dropout);
  return d;
}

// Launch 2's arguments. partials/tile_counters: the split-K workspace (nullptr when splits == 1).
template <typename T>
WeightGradArgs<T> make_weight_grad_args(const SpinalShape& shape, const WeightGradPlan& plan,
                                        const at::Tensor& grad_out, const at::Tensor& x,
                                        const at::Tensor& pre_activation, const at::Tensor& grad_pre,
                                        Activation act, float slope, const Dropout& dropout,
                                        const BackwardOutputs& grads, float* partials, int* tile_counters) {
  WeightGradArgs<T> g{};
  static_cast<ChainDims&>(g) = chain_dims(shape, act, slope);
  g.has_bias = shape.has_bias;
  g.has_bias_out = shape.has_bias_out;
  g.tiles = plan.tiles;
  g.splits = static_cast<int>(plan.splits);
  g.rows_per_split = plan.rows_per_split;
  g.grad_out = grad_out.data_ptr<T>();
  g.x = x.data_ptr<T>();
  g.pre_activation = pre_activation.data_ptr<T>();
  g.grad_pre = grad_pre.data_ptr<T>();
  g.grad_weight_in = grads.grad_weight_in.data_ptr<T>();
  g.grad_weight_hidden = nonempty_data<T>(grads.grad_weight_hidden);
  g.grad_bias = nonempty_data<T>(grads.grad_bias);
  g.grad_weight_out = nonempty_data<T>(grads.grad_weight_out);
  g.grad_bias_out = nonempty_data<T>(grads.grad_bias_out);
  g.partials = partials;
  g.tile_counters = tile_counters;
  g.dropout_key = dropout_key(dropout);
  return g;
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

// Persistent backward launch 1 of the spinal layer (data gradients; launched by
// persistent_backward.cu, behind SPINAL_OPS_CUDA_PERSISTENT=1): ONE launch computes dZ and dx for
// any w and N, spread over every SM. Same dZ workspace (dtype, [B][L*w], layer order, rounded once)
// as the tile launch 1 (backward_kernels.cuh), so launch 2, spinal_weight_grad_kernel, follows
// unchanged (its tiles and shared memory do not grow with w); like the tile launch 1 it zeroes
// launch 2's split-K tile counters. It reads Z from the persistent or tile forward.
//
// Work units (one shape, as the persistent forward's: a kTileM x 128 tile of fp32 accumulators, K
// staged in chunks of 32 through shared memory by the tile policies of tile_mma.cuh; every B
// operand staged [k][n], the weights read down their columns):
//   layer unit (layer l, row tile r, column tile c)
//       dH_l = g W_out[:, l*w + c]   (K = M; without projection dH_l is grad_out's block l)
//            + dZ_{l+1} R_{l+1}[:, c] (K = w; none for l = L-1), one fp32 accumulator
//       dZ_l = dtype(dH_l * phi'(Z_l)) -> the dZ workspace, and as fp32 into the state buffer
//   dx unit (row tile r, column tile c of x)
//       dx = sum over the layers whose window reads columns c (wrap-around resolved per column) of
//            dZ_l A_l[:, window positions], in layer order 0..L-1 in one fp32 accumulator, written
//            once: deterministic, no atomics, no zero-fill of dx
// Launch scheme: grid = min(units, co-resident CTAs) (cudaOccupancyMaxActiveBlocksPerMultiprocessor
// x SMs), 256 threads; each CTA takes tickets from a global counter and runs their units
// (persistent_units.cuh: run_units). Ticket order: layer L-1's units (row tile major, then column
// tile), then layer L-2's, ..., layer 0's, then the dx units (row tile major).
// Dependencies, one counter per (layer, row tile) of finished column tiles of dZ_l:
//   layer unit (l < L-1, r)  waits for layer_ready[l+1][r] == col tiles
//   dx unit (r)              waits for layer_ready[0][r] == col tiles (dZ_{l > 0} finished before,
//                            transitively: layer l waited for l+1, and its fences are cumulative)
// Thread 0 polls with atomicAdd(counter, 0) and __nanosleep, then __syncthreads, __threadfence,
// __ldcg loads of the state buffer; a finished layer tile is published by every thread's
// __threadfence after its stores, __syncthreads, then thread 0's atomicAdd (persistent_units.cuh).
// Why it cannot deadlock: a unit waits only for units earlier in ticket order (layer l + 1 before
// layer l, every layer before dx); a ticket is taken by a running CTA, which finishes its unit
// before taking another. So the earliest unfinished unit waits for nothing unfinished and its CTA
// progresses; by induction every unit finishes, for any grid size and CTA start order.
// Workspace (persistent_backward.cu, torch's caching allocator): the fp32 state buffer [B][L*w]
// (dZ_l for the units that read it back) and 1 + L*row_tiles ints (ticket, layer_ready) zeroed by
// at::zeros on the stream every call.
// Smem: persistent_smem_bytes, the persistent forward's (persistent_forward.cuh: 49280 B for
// bf16/fp16, 38144 B fp32 SIMT, 42624 B TF32); independent of w, N and M.
// Numerics: fp32 accumulation; dZ = dtype((g W_out + dZ_{l+1} R_{l+1}) * phi'(Z)), as the tile
// kernel's; dx rounded to the dtype once after the sum over layers.
// Registers (nvcc -O3 with setup.py's and torch's flags, persistent_backward.cu alone for
// -gencode arch=compute_90,code=sm_90 and for compute_80/sm_80, cuobjdump -res-usage / -sass; CUDA 13.1):
//   policy            sm_90 / sm_80   SASS
//   bf16 WmmaMma<64>  147 / 147       48 HMMA.16816.F32.BF16   -> 1 CTA/SM
//   fp16 WmmaMma<64>  120 / 118       48 HMMA.16816.F32        -> 2 CTAs/SM
//   fp32 SimtMma<32>   96 /  94       FFMA only                -> 2 CTAs/SM
//   fp32 TF32 WMMA    125 / 125       96 HMMA.1684.F32.TF32    -> 2 CTAs/SM
//   every one: STACK 0, LOCAL 0 (no STL/LDL in the SASS); __ldcg is LDG.E.STRONG.GPU, __threadfence
//   MEMBAR.SC.GPU, the polls ATOMG.E.ADD.STRONG.GPU + NANOSLEEP. __launch_bounds__(kThreads, 1), as
//   the forward's: with (kThreads, 2) ptxas held bf16 to 128 registers and spilled 24 bytes.
#pragma once

#include "backward_kernels.cuh"
#include "kernels.h"
#include "persistent_units.cuh"
#include "tile_mma.cuh"

namespace spinal_ops {
namespace cuda_kernels {

// Launch 1's arguments (no dropout key is read), then the persistent grid's workspace and unit counts.
template <typename T>
struct PersistentGradArgs : DataGradArgs<T> {
  float* state;       // [B][L*w]: dZ (fp32 holding dtype values)
  int* next_unit;     // the ticket counter
  int* layer_ready;   // [L][row_tiles]: finished column tiles of dZ_l
  int row_tiles, col_tiles, x_tiles;  // x_tiles: 128-column tiles of dx
};

enum class GradUnitKind { Layer, Dx };

struct GradUnit {
  GradUnitKind kind;
  int layer, row_tile, col_tile;  // col_tile: of dZ_l (layer units) or of dx
};

// Units of launch 1 (see the ticket order above).
__host__ __device__ inline int64_t persistent_grad_units(int num_layers, int row_tiles, int col_tiles, int x_tiles) {
  return static_cast<int64_t>(row_tiles) * (static_cast<int64_t>(num_layers) * col_tiles + x_tiles);
}

template <typename T>
__device__ __forceinline__ GradUnit grad_unit_of_ticket(const PersistentGradArgs<T>& p, int ticket) {
  const int per_layer = p.row_tiles * p.col_tiles;
  if (ticket < p.num_layers * per_layer) {
    const int within = ticket % per_layer;
    return {GradUnitKind::Layer, p.num_layers - 1 - ticket / per_layer, within / p.col_tiles, within % p.col_tiles};
  }
  ticket -= p.num_layers * per_layer;
  return {GradUnitKind::Dx, 0, ticket / p.x_tiles, ticket % p.x_tiles};
}

template <class Mma, typename T>
__device__ __forceinline__ void persistent_grad_unit(const PersistentGradArgs<T>& p, const SmemViews<Mma, T>& sm,
                                                     const GradUnit u) {
  constexpr int kM = Mma::kTileM;
  const int64_t hidden = static_cast<int64_t>(p.num_layers) * p.w;
  const int64_t row0 = static_cast<int64_t>(u.row_tile) * kM;
  const bool layer_unit = u.kind == GradUnitKind::Layer;
  const int n0 = u.col_tile * kTileN;
  const int rows = p.batch - row0 < kM ? static_cast<int>(p.batch - row0) : kM;
  const int cols = min(kTileN, (layer_unit ? p.w : p.n) - n0);
  const int64_t layer_col = static_cast<int64_t>(u.layer) * p.w;  // layer units: dZ_l's columns
  const bool has_next = layer_unit && u.layer + 1 < p.num_layers;

  if (has_next || !layer_unit) {
    if (threadIdx.x == 0) {
      wait_for_count(p.layer_ready + (has_next ? u.layer + 1 : 0) * p.row_tiles + u.row_tile, p.col_tiles);
    }
    acquire_after_wait();
  }
  // dZ row m, column k (fp32 in the buffer, dtype-exact), as an MMA operand.
  const auto dz_elem = [&](int m, int64_t k) {
    return m < rows ? static_cast<T>(__ldcg(p.state + (row0 + m) * hidden + k)) : T(0);
  };

  Mma acc;
  acc.zero();
  if (layer_unit) {
    if (p.out_features > 0) {
      tile_product<Mma, Layout::Row>(
          acc, sm, p.out_features,
          [&](int m, int k) { return m < rows ? p.grad_out[(row0 + m) * p.out_features + k] : T(0); },
          [&](int n, int k) { return n < cols ? p.weight_out[k * hidden + layer_col + n0 + n] : T(0); });
    }
    if (has_next) {
      const T* r_next = p.weight_hidden + layer_col * p.w;  // R_{l+1}
      tile_product<Mma, Layout::Row>(acc, sm, p.w, [&](int m, int k) { return dz_elem(m, layer_col + p.w + k); },
                                     [&](int n, int k) {
                                       return n < cols ? r_next[static_cast<int64_t>(k) * p.w + n0 + n] : T(0);
                                     });
    }
  } else {
    for (int layer = 0; layer < p.num_layers; ++layer) {
      const Window window = window_of(layer, p.n, p.s);
      if (!window.intersects(n0, n0 + cols)) continue;
      const T* a_l = p.weight_in + static_cast<int64_t>(layer) * p.w * p.s;
      const int64_t dz_col = static_cast<int64_t>(layer) * p.w;
      tile_product<Mma, Layout::Row>(acc, sm, p.w, [&](int m, int k) { return dz_elem(m, dz_col + k); },
                                     [&](int n, int k) {
                                       const int j = n < cols ? window.position(n0 + n) : -1;
                                       return j >= 0 ? a_l[static_cast<int64_t>(k) * p.s + j] : T(0);
                                     });
    }
  }
  // A product's first K-loop barrier, or without one the ticket's, ordered the last epilogue's
  // reads of acc_tile before this store.
  acc.store(sm.acc_tile, kAccLd);
  __syncthreads();

  const GlobalPtr<float> state = p.state;
  for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
    const int m = idx / cols, n = idx - m * cols;
    const float value = sm.acc_tile[m * kAccLd + n];
    if (!layer_unit) {
      p.grad_x[(row0 + m) * p.n + n0 + n] = static_cast<T>(value);
      continue;
    }
    const int64_t offset = (row0 + m) * hidden + layer_col + n0 + n;
    const float dh = value + (p.out_features == 0 ? static_cast<float>(p.grad_out[offset]) : 0.f);
    const T dz = static_cast<T>(dh * activate_grad(p.act, static_cast<float>(p.pre_activation[offset]), p.slope));
    p.grad_pre[offset] = dz;
    state[offset] = static_cast<float>(dz);
  }
  if (layer_unit) signal_tile_done(p.layer_ready + u.layer * p.row_tiles + u.row_tile);
}

template <class Mma, typename T>
__device__ __forceinline__ void persistent_data_grad(const PersistentGradArgs<T>& p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const SmemViews<Mma, T> sm(smem, 0);
  zero_split_k_counters(p);
  const int64_t units = persistent_grad_units(p.num_layers, p.row_tiles, p.col_tiles, p.x_tiles);
  run_units(sm, p.next_unit, units, [&](int t) { persistent_grad_unit<Mma, T>(p, sm, grad_unit_of_ticket(p, t)); });
}

template <class Mma, typename T>
__global__ void __launch_bounds__(kThreads, 1) spinal_persistent_data_grad_kernel(const PersistentGradArgs<T> p) {
  if constexpr (kRunsOnThisArch<Mma, T>) {
    persistent_data_grad<Mma, T>(p);
  } else {
    unsupported_arch();
  }
}

// Launches the kernel above for d (a tile launch 1's arguments) on the policy with_kernel_types picks
// for T under allow_tf32 (persistent_backward.cu; instantiated for float, at::Half, at::BFloat16).
// `like`: a tensor on the call's device, for the workspace.
template <typename T>
void launch_persistent_data_grad(const SpinalShape& shape, const DataGradArgs<T>& d, const at::Tensor& like,
                                 bool allow_tf32);

}  // namespace cuda_kernels
}  // namespace spinal_ops

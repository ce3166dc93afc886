// Persistent forward kernel of the spinal layer (launched by persistent_forward.cu, behind
// SPINAL_OPS_CUDA_PERSISTENT=1): ONE launch computes every layer and the output projection for any
// w and N, spread over every SM. Same outputs and the same Z layout as the tile forward
// (forward_kernel.cuh), which the persistent backward launch 1 (persistent_backward.cuh) reads at
// any width under the same switch (the hoisted backward reads its own forward's buffer).
//
// Work units (all of one shape: a kTileM x 128 output tile of fp32 accumulators, K staged in
// chunks of 32 through shared memory by the tile policies of tile_mma.cuh):
//   input unit    (layer l, row tile r, column tile c, piece k)
//                 P_l's piece k = x[rows, window_l[k*split_k, ...)] A_l[:, same]^T -> fp32 (piece 0
//                 in the state buffer's slot of z_l, pieces 1.. in the partials buffer)
//   layer unit    (l, r, c)   z_l = sum_k P_l's pieces (in order k = 0, 1, ...) + h_{l-1} R_l^T + b_l
//   projection    (r, M column tile)   y = H W_out^T + b_out, K = L*w
// When s is not split (splits = 1) layer 0 has no input units: its layer units compute x A_0^T
// themselves and wait for nothing. The launcher splits s (pieces of >= 8 K-chunks) only while the
// unsplit input units would leave co-resident CTAs idle (a long s at a small batch), so that the
// input products, which depend on nothing, spread over every SM; the pieces' fixed summation order
// keeps the result independent of the schedule (deterministic).
// Layer units store Z (dtype, when kept), h_l = dtype(phi(dtype(z))) as fp32 into the state buffer
// [B][L*w] over P_l's slot (the slot's last reader is the unit overwriting it), and h_l into out
// when M is absent. Every cross-CTA operand (P_l's pieces, h_{l-1}, H) is read from fp32 buffers
// with __ldcg (L2, never a stale L1 line). The recurrence's K = w and the projection's K = L*w
// stream through one CTA in 32-deep chunks.
// Launch scheme: grid = min(units, co-resident CTAs) (cudaOccupancyMaxActiveBlocksPerMultiprocessor
// x SMs), 256 threads. Each CTA loops (persistent_units.cuh: run_units): thread 0 takes a ticket
// from a global counter (atomicAdd), the CTA runs that unit to completion, and takes the next;
// tickets past the last unit end the CTA.
// Ticket order: layer 0's layer units (splits = 1 only), every input unit (layer major, then row
// tile, column tile, piece), the other layer units layer by layer (row tile major), the
// projection units.
// Dependencies, counters per (layer, row tile):
//   layer unit (l, r)  waits for inputs_ready[l][r] == col tiles x splits (unless it computes its
//                      own input) and, for l >= 1, layer_ready[l-1][r] == col tiles
//   projection (r)     waits for layer_ready[L-1][r] == col tiles (h_{l < L-1} finished before it,
//                      transitively: layer l waited for l-1, and its fences are cumulative)
// Thread 0 polls with atomicAdd(counter, 0) and __nanosleep, then __syncthreads, __threadfence,
// __ldcg loads. A finished tile is published by every thread's __threadfence after its stores,
// then __syncthreads, then thread 0's atomicAdd on the counter (persistent_units.cuh).
// Why it cannot deadlock: a unit only waits for units earlier in ticket order; a ticket is taken
// by a CTA that is running, and a CTA finishes the unit it holds before taking another. So the
// earliest unfinished unit waits for nothing unfinished and its CTA, resident, progresses; by
// induction every unit finishes, for any grid size and any CTA start order (CTAs not yet started
// hold no ticket). The occupancy-sized grid only spares CTAs that would find no work.
// Workspace (persistent_forward.cu, torch's caching allocator): the fp32 state buffer [B][L*w]
// (needed with or without Z: the projection reads H from it), splits - 1 partial buffers of that
// size (none unless s is split), and 1 + 2*L*row_tiles ints
// (ticket, inputs_ready, layer_ready) zeroed by at::zeros on the stream every call (a memset
// launch before the kernel).
// Smem budget: staged A kTileM x (32 + pad), staged B 128 x (32 + pad), fp32 accumulator tile
// kTileM x 132, ticket slot; independent of w, N and M:
//   bf16/fp16 (kTileM 64): 5120 + 10240 + 33792 + 128 = 49280 B;
//   fp32 SIMT (kTileM 32): 4224 + 16896 + 16896 + 128 = 38144 B (TF32: 5120 + 20480 + 16896 + 128);
//   fp16 on sm_75 (kTileM 32): 2560 + 10240 + 16896 + 128 = 29824 B. Fits every target.
// Numerics: fp32 accumulation; z = (h_{l-1} R_l^T + P_l) + b_l, rounded to the storage dtype once
// (that is Z), h = dtype(phi(float(Z))), as the tile kernel.
// Registers (TORCH_CUDA_ARCH_LIST=9.0 build, cuobjdump -res-usage / -sass on _C*.so; CUDA 13.1):
//   bf16 WmmaMma<64>  128 registers, 48 HMMA.16816.F32.BF16   -> 2 CTAs/SM (264 on an H100)
//   fp16 WmmaMma<64>  102 registers, 48 HMMA.16816.F32        -> 2 CTAs/SM
//   fp32 SimtMma<32>  114 registers, FFMA only                -> 2 CTAs/SM
//   fp32 TF32 WMMA    168 registers, 96 HMMA.1684.F32.TF32    -> 1 CTA/SM
//   every one: STACK 0, LOCAL 0 (no spill stores or loads: no STL/LDL in the SASS); __ldcg is
//   LDG.E.STRONG.GPU, __threadfence MEMBAR.SC.GPU, the polls ATOMG.E.ADD.STRONG.GPU + NANOSLEEP.
//   __launch_bounds__(kThreads, 1): with (kThreads) alone ptxas held SimtMma to 80 registers and
//   spilled 4 bytes. The launcher's occupancy query, not these figures, sizes the grid.
#pragma once

#include "forward_kernel.cuh"
#include "kernels.h"
#include "persistent_units.cuh"
#include "tile_mma.cuh"

namespace spinal_ops {
namespace cuda_kernels {

// The tile forward's arguments (pre_activation null when inference keeps no Z; no dropout key
// is read), then the persistent grid's workspace and unit counts.
template <typename T>
struct PersistentArgs : ForwardArgs<T> {
  float* state;        // [B][L*w]: piece 0 of P_l, then h_l (fp32 holding dtype values)
  float* partials;     // [splits - 1][B][L*w]: pieces 1.. of P_l (nullptr when splits == 1)
  int* next_unit;      // the ticket counter
  int* inputs_ready;   // [L][row_tiles]: finished (column tile, piece) units of P_l
  int* layer_ready;    // [L][row_tiles]: finished column tiles of h_l
  int row_tiles, col_tiles, out_tiles;  // out_tiles = 0 without projection
  int splits, split_k;  // P_l's K = s in `splits` pieces of split_k columns (a multiple of kTileK)
};

enum class UnitKind { Layer, Input, Projection };

struct Unit {
  UnitKind kind;
  int layer, row_tile, col_tile, piece;  // piece: of an input unit's K range
};

// Layers whose layer units compute their own input product: layer 0 when s is not split.
__host__ __device__ inline int own_input_layers(int splits) { return splits == 1 ? 1 : 0; }

// Units of the whole forward (see the ticket order above).
__host__ __device__ inline int64_t persistent_units(int num_layers, int row_tiles, int col_tiles, int out_tiles,
                                                    int splits) {
  const int64_t per_layer = static_cast<int64_t>(row_tiles) * col_tiles;
  const int own = own_input_layers(splits);
  return per_layer * (own + static_cast<int64_t>(num_layers - own) * (splits + 1)) +
         static_cast<int64_t>(row_tiles) * out_tiles;
}

template <typename T>
__device__ __forceinline__ Unit unit_of_ticket(const PersistentArgs<T>& p, int ticket) {
  const int per_layer = p.row_tiles * p.col_tiles;
  const int own = own_input_layers(p.splits);
  if (ticket < own * per_layer) return {UnitKind::Layer, 0, ticket / p.col_tiles, ticket % p.col_tiles, 0};
  ticket -= own * per_layer;
  const int inputs = (p.num_layers - own) * per_layer * p.splits;  // pieces innermost
  if (ticket < inputs) {
    const int tile = ticket / p.splits, within = tile % per_layer;
    return {UnitKind::Input, own + tile / per_layer, within / p.col_tiles, within % p.col_tiles, ticket % p.splits};
  }
  ticket -= inputs;
  const int layers = (p.num_layers - own) * per_layer;
  if (ticket < layers) {
    const int within = ticket % per_layer;
    return {UnitKind::Layer, own + ticket / per_layer, within / p.col_tiles, within % p.col_tiles, 0};
  }
  ticket -= layers;
  return {UnitKind::Projection, p.num_layers - 1, ticket / p.out_tiles, ticket % p.out_tiles, 0};
}

template <class Mma, typename T>
__device__ __forceinline__ void persistent_unit(const PersistentArgs<T>& p, const SmemViews<Mma, T>& sm, const Unit u) {
  constexpr int kM = Mma::kTileM;
  const int64_t hidden = static_cast<int64_t>(p.num_layers) * p.w;
  const int64_t row0 = static_cast<int64_t>(u.row_tile) * kM;
  const int n0 = u.col_tile * kTileN;
  const int rows = p.batch - row0 < kM ? static_cast<int>(p.batch - row0) : kM;
  const int cols = min(kTileN, (u.kind == UnitKind::Projection ? p.out_features : p.w) - n0);
  const GlobalPtr<float> state = p.state;
  const int ready = u.row_tile + u.layer * p.row_tiles;  // this unit's (layer, row tile) counter
  const int64_t slice = p.batch * hidden;                 // one piece of P in the partials
  // Layer units either compute their input product (layer 0, s not split) or add P_l's pieces.
  const bool own_input = u.layer < own_input_layers(p.splits);

  const bool waits = u.kind == UnitKind::Projection || (u.kind == UnitKind::Layer && !own_input);
  if (waits) {
    if (threadIdx.x == 0) {
      if (u.kind == UnitKind::Layer) {
        wait_for_count(p.inputs_ready + ready, p.col_tiles * p.splits);
        if (u.layer > 0) wait_for_count(p.layer_ready + ready - p.row_tiles, p.col_tiles);
      } else {
        wait_for_count(p.layer_ready + ready, p.col_tiles);
      }
    }
    acquire_after_wait();
  }
  // State row m, column k (fp32 in the buffer, dtype-exact), as an MMA operand.
  const auto state_elem = [&](int m, int64_t k) {
    return m < rows ? static_cast<T>(__ldcg(p.state + (row0 + m) * hidden + k)) : T(0);
  };

  Mma acc;
  acc.zero();
  if (u.kind == UnitKind::Projection) {
    tile_product(acc, sm, static_cast<int>(hidden), [&](int m, int k) { return state_elem(m, k); },
                 [&](int n, int k) { return n < cols ? p.weight_out[(n0 + n) * hidden + k] : T(0); });
  } else if (u.kind == UnitKind::Input || own_input) {
    const Window window = window_of(u.layer, p.n, p.s);
    const int k_begin = u.piece * p.split_k;  // this piece's columns of the window
    const T* a_l = p.weight_in + static_cast<int64_t>(u.layer) * p.w * p.s + k_begin;
    tile_product(acc, sm, u.kind == UnitKind::Input ? min(p.split_k, p.s - k_begin) : p.s,
                 [&](int m, int k) { return m < rows ? p.x[(row0 + m) * p.n + window.column(k_begin + k)] : T(0); },
                 [&](int n, int k) { return n < cols ? a_l[static_cast<int64_t>(n0 + n) * p.s + k] : T(0); });
  } else if (u.layer > 0) {
    const T* r_l = p.weight_hidden + static_cast<int64_t>(u.layer - 1) * p.w * p.w;
    const int64_t h_prev = static_cast<int64_t>(u.layer - 1) * p.w;
    tile_product(acc, sm, p.w, [&](int m, int k) { return state_elem(m, h_prev + k); },
                 [&](int n, int k) { return n < cols ? r_l[static_cast<int64_t>(n0 + n) * p.w + k] : T(0); });
  }  // else layer 0 with s split: z_0 = P_0 + b_0, no product here
  // A product's first K-loop barrier, or without one the ticket's, ordered the last epilogue's
  // reads of acc_tile before this store.
  acc.store(sm.acc_tile, kAccLd);
  __syncthreads();

  // An input unit's piece of P_l: piece 0 in P_l's slot of the state buffer, the others in partials.
  const GlobalPtr<float> piece_out = u.piece == 0 ? state : GlobalPtr<float>(p.partials + (u.piece - 1) * slice);
  for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
    const int m = idx / cols, n = idx - m * cols;
    const float value = sm.acc_tile[m * kAccLd + n];
    if (u.kind == UnitKind::Projection) {
      const float y = value + (p.bias_out ? static_cast<float>(p.bias_out[n0 + n]) : 0.f);
      p.out[(row0 + m) * p.out_features + n0 + n] = static_cast<T>(y);
      continue;
    }
    const int64_t offset = (row0 + m) * hidden + static_cast<int64_t>(u.layer) * p.w + n0 + n;
    if (u.kind == UnitKind::Input) {
      piece_out[offset] = value;
      continue;
    }
    float input = 0.f;  // P_l from the input units, its pieces summed in a fixed order
    for (int piece = 0; piece < (own_input ? 0 : p.splits); ++piece) {
      input += __ldcg((piece == 0 ? p.state : p.partials + (piece - 1) * slice) + offset);
    }
    const float z = value + input + (p.bias ? static_cast<float>(p.bias[u.layer * p.w + n0 + n]) : 0.f);
    const T z_stored = static_cast<T>(z);
    const T h = static_cast<T>(activate(p.act, static_cast<float>(z_stored), p.slope));
    if (p.pre_activation) p.pre_activation[offset] = z_stored;
    if (p.out_features == 0) p.out[offset] = h;
    state[offset] = static_cast<float>(h);
  }
  if (u.kind == UnitKind::Input) signal_tile_done(p.inputs_ready + ready);
  if (u.kind == UnitKind::Layer) signal_tile_done(p.layer_ready + ready);
}

// The unit loop of one CTA (persistent_units.cuh).
template <class Mma, typename T>
__device__ __forceinline__ void persistent_forward(const PersistentArgs<T>& p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const SmemViews<Mma, T> sm(smem, 0);
  const int64_t units = persistent_units(p.num_layers, p.row_tiles, p.col_tiles, p.out_tiles, p.splits);
  run_units(sm, p.next_unit, units, [&](int t) { persistent_unit<Mma, T>(p, sm, unit_of_ticket(p, t)); });
}

template <class Mma, typename T>
__global__ void __launch_bounds__(kThreads, 1) spinal_persistent_forward_kernel(const PersistentArgs<T> p) {
  if constexpr (kRunsOnThisArch<Mma, T>) {
    persistent_forward<Mma, T>(p);
  } else {
    unsupported_arch();
  }
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

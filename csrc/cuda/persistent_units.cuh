// What the persistent kernels (persistent_forward.cuh, persistent_backward.cuh) share: the unit
// loop over tickets from a global counter, a unit's K-chunked tile product, and the hand-off of a
// finished tile between CTAs through a ready counter. Each kernel's comment block says why its
// ticket order cannot deadlock.
#pragma once

#include "tile_mma.cuh"

namespace spinal_ops {
namespace cuda_kernels {

// Dynamic smem: SmemLayout without state buffers, then one int (the ticket broadcast).
template <class Mma, typename T>
constexpr int64_t persistent_smem_bytes() {
  return SmemLayout<Mma, T>(0).total + 128;
}

// acc += A[kTileM x K] * B for a(m, k) (rows of the tile) and b(n, k) (columns of the tile), both
// already guarded against rows, columns past the end; K is guarded here. LB: how B is staged,
// Col as [n][k] (b contiguous in k: weights read along their rows), Row as [k][n] (contiguous in
// n: weights read down their columns), so that consecutive threads load consecutive addresses.
template <class Mma, Layout LB = Layout::Col, typename T, typename FA, typename FB>
__device__ __forceinline__ void tile_product(Mma& acc, const SmemViews<Mma, T>& sm, int k_extent, FA a, FB b) {
  const int ld_a = SmemLayout<Mma, T>::staged_ld(kTileK);
  const int ld_b = SmemLayout<Mma, T>::staged_ld(LB == Layout::Col ? kTileK : kTileN);
  for (int k0 = 0; k0 < k_extent; k0 += kTileK) {
    __syncthreads();  // previous users of the staged tiles (and of the ticket slot) are done
    fill_tile(sm.a_stage, ld_a, Mma::kTileM, kTileK, [&](int m, int k) { return k0 + k < k_extent ? a(m, k0 + k) : T(0); });
    if constexpr (LB == Layout::Col) {
      fill_tile(sm.b_stage, ld_b, kTileN, kTileK, [&](int n, int k) { return k0 + k < k_extent ? b(n, k0 + k) : T(0); });
    } else {
      fill_tile(sm.b_stage, ld_b, kTileK, kTileN, [&](int k, int n) { return k0 + k < k_extent ? b(n, k0 + k) : T(0); });
    }
    __syncthreads();
    acc.template mma<Layout::Row, LB>(sm.a_stage, ld_a, sm.b_stage, ld_b, kTileK);
  }
}

// Thread 0 spins until *counter reaches `count` (the caller then meets the CTA at a barrier).
__device__ __forceinline__ void wait_for_count(int* counter, int count) {
  while (atomicAdd(counter, 0) < count) __nanosleep(64);
}

// After thread 0's waits: the CTA meets, and the producers' stores, published before their
// counts, are read after them (with __ldcg: L2, never a stale L1 line).
__device__ __forceinline__ void acquire_after_wait() {
  __syncthreads();
  __threadfence();
}

// Publishes the tile this CTA stored and counts it as finished on `counter`.
__device__ __forceinline__ void signal_tile_done(int* counter) {
  __threadfence();  // publish this thread's stores of the tile before the signal
  __syncthreads();  // every thread's stores fenced before thread 0 signals
  if (threadIdx.x == 0) atomicAdd(counter, 1);
}

// The unit loop of one CTA: thread 0 takes a ticket from *next_unit, the CTA runs its unit
// (run_unit(ticket)) to completion and takes the next, until the tickets pass `units`.
template <class Mma, typename T, typename F>
__device__ __forceinline__ void run_units(const SmemViews<Mma, T>& sm, int* next_unit, int64_t units, F run_unit) {
  const SmemPtr<int> ticket = reinterpret_cast<int*>(sm.base + sm.layout.total);
  for (;;) {
    __syncthreads();  // every thread has read the last ticket
    if (threadIdx.x == 0) ticket[0] = atomicAdd(next_unit, 1);
    __syncthreads();
    const int t = ticket[0];
    if (t >= units) return;
    run_unit(t);
  }
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

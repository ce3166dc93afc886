// Small kernels with the inter-CTA synchronisation patterns a persistent or split-K kernel uses,
// for the model's own tests (emulated_ops.cpp: sync_kernel): each runs correct or with one seeded
// bug, through the fake runtime's cudaLaunchKernel, so the co-residency of the target applies.
//   handoff    CTA 2i produces a tile (every thread stores its part, fences, the CTA meets at a
//              barrier, thread 0 raises a ready flag); CTA 2i+1 spins on the flag, then reads the
//              tile. Seeded bugs: the barrier before the flag removed (thread 0 flags while the
//              others have not stored: the schedule must expose it), the fence removed (the
//              stores are never published: the memory model must expose it).
//   grid_sync  every CTA arrives at a counter and spins until `wait_for` CTAs have arrived (a
//              grid-wide barrier without a cooperative launch): with more CTAs than fit at once it
//              can never finish, and the model must say so instead of hanging.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "cuda_shim.h"
#include "emulated_runtime.h"

namespace emu_tests {

constexpr int kHandoffThreads = 64;
constexpr int kHandoffElems = 256;  // 4 per thread
enum HandoffBug : int { kNoBug = 0, kFlagBeforeTile = 1, kNoFence = 2 };

struct HandoffArgs {
  float* tiles;  // [pairs][kHandoffElems]
  int* ready;    // [pairs]
  float* out;    // [pairs][kHandoffElems]
  int bug;
};

inline float handoff_value(int pair, int i) { return static_cast<float>(1000 * pair + i); }

__global__ void handoff_kernel(const HandoffArgs p) {
  const int pair = blockIdx.x / 2;
  if (blockIdx.x % 2 == 0) {  // producer
    const emu::GlobalPtr<float> tile = p.tiles + pair * kHandoffElems;
    for (int i = threadIdx.x; i < kHandoffElems; i += kHandoffThreads) tile[i] = handoff_value(pair, i);
    if (p.bug != kNoFence) __threadfence();  // publish this thread's part
    if (p.bug != kFlagBeforeTile) __syncthreads();  // every part published before the flag
    if (threadIdx.x == 0) atomicExch(&p.ready[pair], 1);
  } else {  // consumer
    if (threadIdx.x == 0) {
      while (atomicAdd(&p.ready[pair], 0) == 0) __nanosleep(64);
    }
    __syncthreads();
    __threadfence();
    for (int i = threadIdx.x; i < kHandoffElems; i += kHandoffThreads) {
      p.out[pair * kHandoffElems + i] = __ldcg(p.tiles + pair * kHandoffElems + i);
    }
  }
}

struct GridSyncArgs {
  int* arrived;
  int* running;       // CTAs between their start and their exit
  int* most_running;  // the most at once
  int wait_for;
};

__global__ void grid_sync_kernel(const GridSyncArgs p) {
  if (threadIdx.x == 0) {
    atomicMax(p.most_running, atomicAdd(p.running, 1) + 1);
    atomicAdd(p.arrived, 1);
    while (atomicAdd(p.arrived, 0) < p.wait_for) __nanosleep(100);
    atomicSub(p.running, 1);
  }
  __syncthreads();
}

template <typename Args>
void launch_on(int device, void (*kernel)(Args), unsigned grid, unsigned threads, size_t smem, Args args) {
  emu::current_device = device;
  void* launch_args[] = {&args};
  cudaLaunchKernel(kernel, dim3(grid), dim3(threads), launch_args, smem, emu::current_stream(device));
}

// The model's message for the sync kernel `name` on `device` ("" if it passed); `most_running`
// gets the most CTAs that ran at once.
inline std::string run_sync_kernel(const std::string& name, int device, int64_t grid, int64_t* most_running) {
  try {
    if (name == "handoff" || name == "handoff_flag_before_tile" || name == "handoff_no_fence") {
      const int pairs = static_cast<int>(grid / 2);
      std::vector<float> tiles(pairs * kHandoffElems, NAN), out(pairs * kHandoffElems, NAN);  // poisoned
      std::vector<int> ready(pairs, 0);
      const int bug = name == "handoff" ? kNoBug : name == "handoff_no_fence" ? kNoFence : kFlagBeforeTile;
      launch_on(device, handoff_kernel, static_cast<unsigned>(2 * pairs), kHandoffThreads, 0,
                HandoffArgs{tiles.data(), ready.data(), out.data(), bug});
      *most_running = emu::last_launch.max_resident;
      for (int pair = 0; pair < pairs; ++pair) {
        for (int i = 0; i < kHandoffElems; ++i) {
          if (out[pair * kHandoffElems + i] != handoff_value(pair, i)) {
            return "consumer CTA " + std::to_string(2 * pair + 1) + " read element " + std::to_string(i) +
                   " of its tile as " + std::to_string(out[pair * kHandoffElems + i]) + " (not stored, or not published)";
          }
        }
      }
      return "";
    }
    if (name == "grid_sync") {  // 32-thread CTAs with 40 KB of shared memory: 1 per SM on sm_75
      int arrived = 0, running = 0, most = 0;
      const int per_sm = emu::ctas_per_sm(emu::target(device), 32, 40 * 1024);
      const int resident = per_sm * emu::sm_count(emu::target(device));
      launch_on(device, grid_sync_kernel, static_cast<unsigned>(grid), 32, 40 * 1024,
                GridSyncArgs{&arrived, &running, &most, static_cast<int>(std::min<int64_t>(grid, resident))});
      *most_running = most;
      return "";
    }
    if (name == "grid_sync_all") {  // waits for every CTA of the grid
      int arrived = 0, running = 0, most = 0;
      launch_on(device, grid_sync_kernel, static_cast<unsigned>(grid), 32, 40 * 1024,
                GridSyncArgs{&arrived, &running, &most, static_cast<int>(grid)});
      *most_running = most;
      return "";
    }
  } catch (const std::exception& e) {
    return e.what();
  }
  TORCH_CHECK(false, "unknown sync kernel ", name);
}

}  // namespace emu_tests

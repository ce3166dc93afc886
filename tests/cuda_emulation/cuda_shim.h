// A host model of the CUDA features the spinal kernels use, so that the kernel source itself
// (csrc/cuda/*_kernel*.cuh) runs on CPU and is tested against the reference without a GPU.
//
// One CTA at a time runs as 256 std::threads; __syncthreads() is a barrier over them and
// __syncthreads_or() a barrier with an OR reduction. Dynamic shared memory is one global
// buffer (`smem`). nvcuda::wmma is modelled with the documented element layouts
// (matrix_a M x K, matrix_b K x N, row_major / col_major leading dimensions); lane 0 of
// each warp does the warp's fragment work, the other lanes skip it (they never store).
// Not modelled: timing, memory-ordering bugs between CTAs (CTAs run one after another),
// bank conflicts, alignment faults - compute-sanitizer on a GPU covers those.
#pragma once

#define SPINAL_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

// cuda headers map these to (ignored) attributes for host compilers; plain C++ here.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __align__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __align__(n)
#define __launch_bounds__(n)

using std::max;
using std::min;

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 thread_idx;
inline thread_local Dim3 block_idx;
inline Dim3 grid_dim;

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  long generation_ = 0;
};

inline Barrier* block_barrier = nullptr;
inline std::atomic<int> or_flag{0};

// Runs kernel() for every CTA of a 1-D grid of `blocks` x `threads`, one CTA at a time.
template <typename Kernel>
void launch(unsigned blocks, int threads, Kernel kernel) {
  grid_dim = Dim3{blocks, 1, 1};
  for (unsigned b = 0; b < blocks; ++b) {
    Barrier barrier(threads);
    block_barrier = &barrier;
    std::vector<std::thread> workers;
    workers.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([=] {
        thread_idx = Dim3{static_cast<unsigned>(t), 0, 0};
        block_idx = Dim3{b, 0, 0};
        kernel();
      });
    }
    for (auto& worker : workers) worker.join();
  }
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim

inline void __syncthreads() { emu::block_barrier->wait(); }

inline int __syncthreads_or(int predicate) {
  emu::block_barrier->wait();
  if (predicate) emu::or_flag.store(1);
  emu::block_barrier->wait();
  const int result = emu::or_flag.load();
  emu::block_barrier->wait();
  if (threadIdx.x == 0) emu::or_flag.store(0);  // before thread 0 reaches the next barrier
  return result;
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }
inline float __ldcg(const float* address) { return *static_cast<const volatile float*>(address); }

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  float x[num_elements];  // element (r, c) at x[r * kCols + c]
};

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float __float_to_tf32(float v) { return v; }  // indexing is what is modelled, not TF32 rounding

inline bool lane_leader() { return threadIdx.x % 32 == 0; }

template <class Use, int M, int N, int K, class T, class Layout, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  if (!lane_leader()) return;
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.x[r * F::kCols + c] = to_float(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}

template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
  for (float& e : f.x) e = v;
}

template <int M, int N, int K, class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  if (!lane_leader()) return;
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float sum = c.x[m * N + n];
      for (int k = 0; k < K; ++k) sum += a.x[m * K + k] * b.x[k * N + n];
      out[m * N + n] = sum;
    }
  std::copy(out, out + M * N, d.x);
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t) {
  if (!lane_leader()) return;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) p[m * ldm + n] = f.x[m * N + n];
}

}  // namespace wmma
}  // namespace nvcuda

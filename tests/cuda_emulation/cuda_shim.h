// A host model of the CUDA features the spinal kernels use, strict enough to stand in for
// compute-sanitizer and the hardware where there is no GPU. The kernel source itself
// (csrc/cuda/*_kernel*.cuh) and its host launchers (forward.cu, backward.cu) run on CPU.
//
// Execution: each CTA's 256 threads are fibers (ucontext) on one OS thread, run one at a time
// from barrier to barrier; CTAs run one after another in an order shuffled by the seed.
// Checks (a failure raises from the launch, naming kernel, block, threads and smem offset):
//   racecheck  every shared-memory access (thread, bytes, read/write) between two
//              __syncthreads is recorded; two accesses by different threads to the same byte,
//              at least one a write, fail whatever their order. Warp collectives (mma_sync)
//              are not barriers for this rule: warp-synchronous code is held to it too.
//   initcheck  shared memory is poisoned (0xFF bytes: NaN in every float format) at every
//              block start, and reading a byte the block has not written fails.
//   memcheck   shared-memory accesses beyond the launch's dynamic smem size fail.
//   synccheck  threads left waiting at a barrier or warp collective that the others never
//              reach (a deadlock on the GPU) fail; exited threads count as arrived, as on sm_70+.
//   WMMA       fragments are per lane: num_elements values per lane in an element order that is
//              a random permutation (per fragment type, drawn from the seed), so code that
//              assumes a fragment layout computes garbage. load/store_matrix_sync check
//              ldm (a multiple of 16 bytes) and 32-byte pointer alignment, store honours its
//              layout argument, __float_to_tf32 rounds (to nearest, ties away) and mma_sync
//              truncates tf32 inputs to 10 mantissa bits as the tensor cores do.
// The fake CUDA runtime (emulated_runtime.h) checks each launch's configuration.
// Not modelled: timing, bank conflicts, races and ordering in global memory (within a CTA, and
// between CTAs, which do not overlap here).
#pragma once

#define SPINAL_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <typeinfo>
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
#define __launch_bounds__(...)

using std::max;
using std::min;

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline Dim3 thread_idx;  // of the running fiber
inline Dim3 block_idx;
inline Dim3 grid_dim;

inline uint64_t seed = 1;  // CTA order and fragment element orders (set per run, printed by the test)
// Seeded bug for the model's own tests: the __syncthreads at this "file:line" is removed.
inline std::string removed_barrier;
inline std::set<std::string> barrier_sites;  // every __syncthreads reached since the last reset

constexpr int kMaxThreads = 256;
constexpr int kWarpSize = 32;

// ---- fibers -------------------------------------------------------------------------------

enum class FiberState { Runnable, AtBarrier, AtWarpBarrier, Done };

struct Cta {
  ucontext_t main_context;
  std::vector<ucontext_t> contexts;
  std::vector<FiberState> state;
  std::vector<long> barriers_passed;
  int threads = 0, current = 0, at_barrier = 0, done = 0;
  int or_accumulator = 0, or_result = 0;
  int warp_arrived[kMaxThreads / kWarpSize] = {};
  std::function<void()> body;
};
inline Cta* cta = nullptr;

inline void yield_to_scheduler() { swapcontext(&cta->contexts[cta->current], &cta->main_context); }

// ---- shared-memory checks -----------------------------------------------------------------

inline unsigned char* smem_base = nullptr;  // the kernels' `extern __shared__` buffer
inline int64_t smem_capacity = 0;
inline int64_t smem_bytes = 0;  // dynamic smem of the running launch
inline std::string kernel_name;

struct Shadow {  // one per 2-byte granule of smem (the smallest element the kernels store)
  uint32_t epoch = 0;        // barrier interval of writer/reader
  uint32_t written = 0;      // block stamp when written in the current block
  int16_t writer = -1;       // thread that wrote in this interval
  int16_t reader = -1;       // thread that read in this interval; -2: several
};
inline std::vector<Shadow> shadow;
inline uint32_t epoch = 1, block_stamp = 1;
inline std::string first_error;

inline std::string where() {
  std::ostringstream s;
  s << kernel_name << " block " << block_idx.x << " thread " << thread_idx.x << " after "
    << cta->barriers_passed[cta->current] << " barriers";
  return s.str();
}

inline void fail(const std::string& message) {
  if (first_error.empty()) first_error = message + " (" + where() + ")";
}

inline void on_smem_access(const void* address, size_t bytes, bool write) {
  const int64_t offset = static_cast<const unsigned char*>(address) - smem_base;
  if (offset < 0 || offset + static_cast<int64_t>(bytes) > smem_bytes) {
    std::ostringstream s;
    s << "memcheck: shared-memory access at byte " << offset << " outside the launch's " << smem_bytes << " bytes";
    return fail(s.str());
  }
  const auto self = static_cast<int16_t>(thread_idx.x);
  for (int64_t g = offset / 2; g < (offset + static_cast<int64_t>(bytes) + 1) / 2; ++g) {
    Shadow& e = shadow[g];
    if (e.epoch != epoch) {
      e.epoch = epoch;
      e.writer = e.reader = -1;
    }
    const char* hazard = nullptr;
    int other = e.writer;
    if (write) {
      if (e.writer >= 0 && e.writer != self) {
        hazard = "racecheck: write-after-write hazard";
      } else if (e.reader != -1 && e.reader != self) {
        hazard = "racecheck: write-after-read hazard";
        other = e.reader;
      }
      e.writer = self;
      e.written = block_stamp;
    } else {
      if (e.writer >= 0 && e.writer != self) {
        hazard = "racecheck: read-after-write hazard";
      } else if (e.written != block_stamp) {
        hazard = "initcheck: read of shared memory not written by this block";
        other = -1;
      }
      e.reader = e.reader == -1 || e.reader == self ? self : -2;
    }
    if (hazard != nullptr) {
      std::ostringstream s;
      s << hazard << " at smem byte " << 2 * g;
      if (other != -1) s << " with thread " << (other == -2 ? std::string("(several)") : std::to_string(other));
      return fail(s.str());
    }
  }
}

// Element reference through a checked shared-memory pointer: records the read or the write.
template <typename T>
class SmemRef {
 public:
  explicit SmemRef(T* p) : p_(p) {}
  operator T() const {
    on_smem_access(p_, sizeof(T), false);
    return *p_;
  }
  const SmemRef& operator=(const T& value) const {
    on_smem_access(p_, sizeof(T), true);
    *p_ = value;
    return *this;
  }

 private:
  T* p_;
};

// What tile_mma.cuh's SmemPtr<T> is in the model: a T* whose element accesses are recorded.
template <typename T>
class SmemPtr {
 public:
  SmemPtr(T* p) : p_(p) {}  // NOLINT: implicit, like the raw pointer it stands for
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  SmemPtr(SmemPtr<U> other) : p_(other.get()) {}  // NOLINT: T* -> const T*
  T* get() const { return p_; }
  SmemPtr operator+(int64_t i) const { return SmemPtr(p_ + i); }
  auto operator[](int64_t i) const {
    if constexpr (std::is_const_v<T>) {
      return static_cast<std::remove_const_t<T>>(SmemRef<T>(p_ + i));
    } else {
      return SmemRef<T>(p_ + i);
    }
  }

 private:
  T* p_;
};

template <typename U, typename T>
SmemPtr<U> smem_cast(SmemPtr<T> p) {
  return SmemPtr<U>(reinterpret_cast<U*>(p.get()));
}

// ---- barriers -----------------------------------------------------------------------------

inline void release_barrier() {
  for (int t = 0; t < cta->threads; ++t)
    if (cta->state[t] == FiberState::AtBarrier) cta->state[t] = FiberState::Runnable;
  cta->at_barrier = 0;
  cta->or_result = cta->or_accumulator;
  cta->or_accumulator = 0;
  ++epoch;  // a new interval for the race check
}

// __syncthreads() at file:line: every thread of the CTA that has not exited must arrive.
inline int block_barrier(int predicate, const char* file, int line) {
  const int self = cta->current;
  std::string site = std::string(file) + ":" + std::to_string(line);
  if (site == removed_barrier) return predicate;
  if (self == 0) barrier_sites.insert(std::move(site));
  ++cta->barriers_passed[self];
  cta->or_accumulator |= predicate;
  cta->state[self] = FiberState::AtBarrier;
  if (++cta->at_barrier + cta->done == cta->threads) release_barrier();
  yield_to_scheduler();
  return cta->or_result;
}

// The lanes of the caller's warp meet here (the model of a warp-collective instruction).
inline void warp_barrier() {
  const int self = cta->current, warp = self / kWarpSize;
  if (++cta->warp_arrived[warp] == kWarpSize) {
    cta->warp_arrived[warp] = 0;
    for (int t = warp * kWarpSize; t < (warp + 1) * kWarpSize; ++t)
      if (cta->state[t] == FiberState::AtWarpBarrier) cta->state[t] = FiberState::Runnable;
    return;
  }
  cta->state[self] = FiberState::AtWarpBarrier;
  yield_to_scheduler();
}

inline void fiber_entry() {
  cta->body();
  cta->state[cta->current] = FiberState::Done;
  ++cta->done;
  if (cta->at_barrier > 0 && cta->at_barrier + cta->done == cta->threads) release_barrier();
}

// ---- launch -------------------------------------------------------------------------------

constexpr size_t kFiberStack = 128 * 1024;

// Runs kernel() for every CTA of a 1-D grid in a shuffled order, `threads` fibers per CTA, with
// `dynamic_smem` bytes of poisoned, checked shared memory. Raises on the first check that fails.
template <typename Kernel>
void launch(const char* name, unsigned blocks, int threads, int64_t dynamic_smem, Kernel kernel) {
  if (threads > kMaxThreads || threads % kWarpSize != 0) throw std::runtime_error("emu: unsupported block size");
  if (dynamic_smem > smem_capacity) throw std::runtime_error("emu: dynamic smem beyond the model's buffer");
  kernel_name = name;
  grid_dim = Dim3{blocks, 1, 1};
  smem_bytes = dynamic_smem;
  shadow.assign(static_cast<size_t>((smem_capacity + 1) / 2), Shadow{});
  first_error.clear();
  std::vector<unsigned> order(blocks);
  std::iota(order.begin(), order.end(), 0u);
  std::mt19937_64 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);

  static std::vector<std::unique_ptr<char[]>> stacks;  // reused across launches
  while (stacks.size() < static_cast<size_t>(threads)) stacks.emplace_back(new char[kFiberStack]);
  Cta state;
  cta = &state;
  state.threads = threads;
  state.body = [&] { kernel(); };
  for (unsigned b : order) {
    block_idx = Dim3{b, 0, 0};
    std::memset(smem_base, 0xFF, static_cast<size_t>(smem_capacity));  // NaN in fp32, fp16 and bf16
    ++block_stamp;
    ++epoch;
    state.contexts.assign(threads, ucontext_t{});
    state.state.assign(threads, FiberState::Runnable);
    state.barriers_passed.assign(threads, 0);
    state.at_barrier = state.done = state.or_accumulator = 0;
    std::fill(std::begin(state.warp_arrived), std::end(state.warp_arrived), 0);
    for (int t = 0; t < threads; ++t) {
      getcontext(&state.contexts[t]);
      state.contexts[t].uc_stack.ss_sp = stacks[t].get();
      state.contexts[t].uc_stack.ss_size = kFiberStack;
      state.contexts[t].uc_link = &state.main_context;
      makecontext(&state.contexts[t], fiber_entry, 0);
    }
    while (state.done < threads) {
      bool progressed = false;
      for (int t = 0; t < threads; ++t) {
        if (state.state[t] != FiberState::Runnable) continue;
        state.current = t;
        thread_idx = Dim3{static_cast<unsigned>(t), 0, 0};
        swapcontext(&state.main_context, &state.contexts[t]);
        progressed = true;
      }
      if (!progressed) {
        fail("synccheck: deadlock, a barrier that not every thread of the block reaches");
        break;
      }
    }
    if (!first_error.empty()) break;
  }
  cta = nullptr;
  if (!first_error.empty()) throw std::runtime_error(first_error + " [seed " + std::to_string(seed) + "]");
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim

#define __syncthreads() emu::block_barrier(0, __FILE__, __LINE__)
#define __syncthreads_or(predicate) emu::block_barrier((predicate), __FILE__, __LINE__)

// Fibers run one at a time: a CTA's global-memory effects are complete before the next starts.
inline void __threadfence() {}
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}
inline float __ldcg(const float* address) { return *address; }

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

// Per-lane fragment: lane l holds elements x[0..num_elements) of the tile, at the positions
// element_order<fragment>() gives to index l * num_elements + i.
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols / emu::kWarpSize;
  float x[num_elements];
};

// position (r * kCols + c) of each (lane, element) of a fragment type, a permutation drawn from
// the seed and the type: no two fragment types share an order and none is the row-major one.
template <class F>
const std::vector<int>& element_order() {
  static uint64_t drawn_for = 0;
  static std::vector<int> order;
  if (order.empty() || drawn_for != emu::seed) {
    order.resize(F::kRows * F::kCols);
    std::iota(order.begin(), order.end(), 0);
    std::mt19937_64 rng(emu::seed ^ std::hash<std::string>{}(typeid(F).name()));
    do {
      std::shuffle(order.begin(), order.end(), rng);
    } while (order[0] == 0 && order[1] == 1);
    drawn_for = emu::seed;
  }
  return order;
}

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// cvt.rna.tf32.f32: 10 mantissa bits, round to nearest, ties away from zero.
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

// The tensor cores read only the tf32 bits of an fp32 operand.
inline float tf32_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits &= 0xFFFFE000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

inline void check_matrix_pointer(const void* p, unsigned ldm, size_t element_bytes, const char* op) {
  std::ostringstream s;
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    s << op << ": pointer " << p << " is not 32-byte aligned";
  } else if ((ldm * element_bytes) % 16 != 0) {
    s << op << ": ldm " << ldm << " is not a multiple of " << 16 / element_bytes << " elements";
  }
  if (!s.str().empty()) emu::fail(s.str());
}

template <class Use, int M, int N, int K, class T, class Layout, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, emu::SmemPtr<P> p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  check_matrix_pointer(p.get(), ldm, sizeof(P), "load_matrix_sync");
  const auto& order = element_order<F>();
  const int lane = emu::thread_idx.x % emu::kWarpSize;
  for (int i = 0; i < F::num_elements; ++i) {
    const int pos = order[lane * F::num_elements + i], r = pos / F::kCols, c = pos % F::kCols;
    f.x[i] = to_float(static_cast<std::remove_const_t<P>>(
        std::is_same_v<Layout, row_major> ? p[static_cast<int64_t>(r) * ldm + c] : p[static_cast<int64_t>(c) * ldm + r]));
  }
}

template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
  for (float& e : f.x) e = v;
}

// Warp-collective: every lane publishes its fragments, then computes its own elements of d.
template <int M, int N, int K, class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  using FA = fragment<matrix_a, M, N, K, TA, LA>;
  using FB = fragment<matrix_b, M, N, K, TB, LB>;
  using FC = fragment<accumulator, M, N, K, float>;
  static const FA* a_of[emu::kMaxThreads];
  static const FB* b_of[emu::kMaxThreads];
  const int self = emu::thread_idx.x, lane = self % emu::kWarpSize, warp0 = self - lane;
  a_of[self] = &a;
  b_of[self] = &b;
  emu::warp_barrier();
  float tile_a[M * K], tile_b[K * N];  // gathered from the 32 lanes' fragments
  const auto& order_a = element_order<FA>();
  const auto& order_b = element_order<FB>();
  for (int e = 0; e < M * K; ++e) {
    const float v = a_of[warp0 + e / FA::num_elements]->x[e % FA::num_elements];
    tile_a[order_a[e]] = std::is_same_v<TA, precision::tf32> ? tf32_bits(v) : v;
  }
  for (int e = 0; e < K * N; ++e) {
    const float v = b_of[warp0 + e / FB::num_elements]->x[e % FB::num_elements];
    tile_b[order_b[e]] = std::is_same_v<TB, precision::tf32> ? tf32_bits(v) : v;
  }
  emu::warp_barrier();  // no lane overwrites a fragment another lane still reads
  const auto& order_c = element_order<FC>();
  float out[FC::num_elements];
  for (int i = 0; i < FC::num_elements; ++i) {
    const int pos = order_c[lane * FC::num_elements + i], m = pos / N, n = pos % N;
    float sum = c.x[i];
    for (int k = 0; k < K; ++k) sum += tile_a[m * K + k] * tile_b[k * N + n];
    out[i] = sum;
  }
  std::copy(out, out + FC::num_elements, d.x);
}

template <int M, int N, int K>
void store_matrix_sync(emu::SmemPtr<float> p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  check_matrix_pointer(p.get(), ldm, sizeof(float), "store_matrix_sync");
  const auto& order = element_order<F>();
  const int lane = emu::thread_idx.x % emu::kWarpSize;
  for (int i = 0; i < F::num_elements; ++i) {
    const int pos = order[lane * F::num_elements + i], m = pos / N, n = pos % N;
    p[layout == mem_row_major ? static_cast<int64_t>(m) * ldm + n : static_cast<int64_t>(n) * ldm + m] = f.x[i];
  }
}

}  // namespace wmma
}  // namespace nvcuda

// A host model of the CUDA features the spinal kernels use, strict enough to stand in for
// compute-sanitizer and the hardware where there is no GPU. The kernel source itself
// (csrc/cuda/*_kernel*.cuh) and its host launchers (forward.cu, backward.cu) run on CPU.
//
// Execution: every thread is a fiber (ucontext) on one OS thread; one fiber runs at a time and
// hands control back only at a scheduling point, so every interleaving is chosen by the
// scheduler below from the seed and replays exactly.
//   CTAs      a launch's CTAs start in an order shuffled by the seed; as many run at once as are
//             co-resident on the emulated target (emulated_runtime.h: SMs x CTAs per SM from shared
//             memory, threads and a register budget), the rest start as earlier ones exit. Each
//             resident CTA has its own shared memory (swapped in when it runs).
//   threads   within a CTA, fibers run round-robin, each until it blocks at a barrier or warp
//             collective (as before: from barrier to barrier).
//   switches  the scheduler moves to another resident CTA only at the scheduling points: after
//             an atomic that writes (with probability 1/2, and the CTA is then parked), at a
//             barrier's release (1/16), at a thread's exit (1/16), and always after a spin-wait
//             step (before atomicAdd(p, 0), an atomic load: so a poll sees what others did
//             meanwhile and goes on at once; after a failed atomicCAS or another atomic that left
//             the value as it was; __nanosleep). The next CTA is a random one that neither is parked nor
//             spins; if there is none, a spinning one or (probability 1/2) a parked one, which is
//             unparked. So a CTA preempted after publishing something (a ticket, a
//             flag) is overtaken for long by the others: the schedules that expose a missing
//             barrier or fence before the atomic are frequent, not a 1-in-256 chance.
//   deadlock  spin-wait steps with no progress anywhere (no writing atomic, barrier release or
//             thread exit) beyond spin_budget fail the launch, naming the grid and co-residency:
//             CTAs spinning on CTAs that can never be scheduled fail instead of hanging.
// Memory model (global memory):
//   plain pointers   loads and stores take effect at once, in the order the schedule runs them.
//   GlobalPtr<T>     stores go to the storing thread's buffer, invisible to other CTAs; a
//                    __syncthreads moves every thread's buffer into its CTA's (visible to the
//                    CTA, published by a later fence: PTX's cumulativity), __threadfence publishes
//                    the caller's buffer and its CTA's, the end of the grid publishes the rest.
//                    Loads (GlobalPtr, __ldcg) see the thread's own and its CTA's buffered stores,
//                    else memory. A store released without a fence stays invisible to other CTAs.
//   atomics          act on memory at once (relaxed: they publish nothing).
//   not modelled     stale loads (a missing fence on the reading side, L1 staleness), reordering
//                    of plain-pointer stores, stores of several sizes to one address in a buffer.
// Checks (a failure raises from the launch, naming kernel, block, threads and smem offset):
//   racecheck  every shared-memory access (thread, bytes, read/write) between two
//              __syncthreads is recorded; two accesses by different threads to the same byte,
//              at least one a write, fail whatever their order, unless both threads are in one
//              warp and a __syncwarp of that warp lies between them. Warp collectives (mma_sync)
//              are not barriers for this rule: warp-synchronous code is held to it too.
//   cp.async   cp_async_16 records its shared-memory write when issued (against the accesses
//              before it) and performs it, recorded again, when the issuing thread's
//              cp_async_wait<N> retires its group (cp_async_commit closes one): a read by another
//              lane before the wait and a __syncwarp fails, and a copy never waited for never lands.
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
// Not modelled: timing, bank conflicts, data races in global memory as such (a race shows only
// through the values the schedule makes the kernel read: outputs and workspaces are poisoned).
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
#include <stdexcept>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
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
inline Dim3 block_dim;
inline Dim3 grid_dim;

inline uint64_t seed = 1;  // CTA order, schedule and fragment element orders (set per run, printed by the test)
// Seeded bug for the model's own tests: the __syncthreads, __syncwarp or __threadfence at this "file:line" is removed.
inline std::string removed_barrier;
inline std::set<std::string> barrier_sites;  // every __syncthreads reached since the last reset
// Spin-wait steps with no progress anywhere before a launch is declared deadlocked.
inline long spin_budget = 100000;

constexpr int kMaxThreads = 512;
constexpr int kWarpSize = 32;

// ---- fibers and CTAs ----------------------------------------------------------------------

enum class FiberState { Runnable, AtBarrier, AtWarpBarrier, Done };
// Why a fiber handed control back to the scheduler.
enum class Yield { Blocked, Atomic, Spin, Exit };

struct Shadow {  // one per 2-byte granule of smem (the smallest element the kernels store)
  uint32_t epoch = 0;        // barrier interval of writer/reader
  uint32_t written = 0;      // CTA stamp when written by the current CTA
  int16_t writer = -1;       // thread that wrote in this interval
  int16_t reader = -1;       // thread that read in this interval; -2: several
  int16_t reader_warp = -1;  // warp of the readers; -2: several
  uint32_t writer_sync = 0;  // the writer's warp's __syncwarp count at the write
  uint32_t reader_sync = 0;  // the readers' warp's __syncwarp count at the last read
};

// A cp.async copy issued and not yet performed: it lands when its group is waited for.
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  size_t bytes;
  int group;
};

// A global store not yet visible to other CTAs (the memory model above).
struct PendingStore {
  void* address;
  size_t bytes;
  uint64_t value;
};
using StoreBuffer = std::unordered_map<uintptr_t, PendingStore>;

inline void publish(StoreBuffer& buffer) {
  for (auto& entry : buffer) std::memcpy(entry.second.address, &entry.second.value, entry.second.bytes);
  buffer.clear();
}

// One resident CTA. Slots are reused across CTAs and launches, their buffers with them.
struct Cta {
  unsigned block = 0;
  int threads = 0, current = 0, cursor = 0, at_barrier = 0, done = 0;
  int or_accumulator = 0, or_result = 0;
  int warp_arrived[kMaxThreads / kWarpSize] = {};
  uint32_t warp_syncs[kMaxThreads / kWarpSize] = {};  // __syncwarp releases per warp (racecheck)
  uint32_t epoch = 0, stamp = 0;  // racecheck interval and initcheck stamp of this CTA
  bool released = false;          // the fiber that just ran released a barrier
  bool parked = false;            // preempted after an atomic: runs again when no other CTA can
  bool spinning = false;          // its last scheduling point was a spin-wait step
  Yield reason = Yield::Blocked;
  const void* fragment_a[kMaxThreads] = {};  // mma_sync: each lane's A and B fragments
  const void* fragment_b[kMaxThreads] = {};
  std::vector<ucontext_t> contexts;
  std::vector<FiberState> state;
  std::vector<long> barriers_passed;
  std::vector<StoreBuffer> pending;  // per thread: its buffered global stores
  std::vector<std::vector<AsyncCopy>> copies;  // per thread: its cp.async copies in flight
  std::vector<int> copy_groups;                // per thread: cp_async_commit calls
  StoreBuffer ordered;               // stores before a barrier this CTA passed
  std::vector<Shadow> shadow;
  std::vector<unsigned char> smem;   // this CTA's shared memory while another CTA runs
  std::unique_ptr<char[]> stacks;
  size_t stack_bytes = 0;
};
inline Cta* cta = nullptr;  // the CTA of the running fiber
inline ucontext_t scheduler_context;
inline uint32_t epoch_counter = 1, stamp_counter = 1;

inline void yield_to_scheduler(Yield reason) {
  cta->reason = reason;
  swapcontext(&cta->contexts[cta->current], &scheduler_context);
}

// ---- shared-memory checks -----------------------------------------------------------------

inline unsigned char* smem_base = nullptr;  // the kernels' `extern __shared__` buffer
inline int64_t smem_capacity = 0;
inline int64_t smem_bytes = 0;  // dynamic smem of the running launch
inline std::string kernel_name;
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
  const auto warp = static_cast<int16_t>(self / kWarpSize);
  const uint32_t syncs = cta->warp_syncs[warp];
  for (int64_t g = offset / 2; g < (offset + static_cast<int64_t>(bytes) + 1) / 2; ++g) {
    Shadow& e = cta->shadow[g];
    if (e.epoch != cta->epoch) {
      e.epoch = cta->epoch;
      e.writer = e.reader = e.reader_warp = -1;
    }
    // The write is ordered before this access: same thread, or same warp with a __syncwarp since.
    const bool write_ordered = e.writer == self || (e.writer / kWarpSize == warp && e.writer_sync != syncs);
    const char* hazard = nullptr;
    int other = e.writer;
    if (write) {
      if (e.writer >= 0 && !write_ordered) {
        hazard = "racecheck: write-after-write hazard";
      } else if (e.reader != -1 && e.reader != self) {
        if (e.reader_warp == warp && e.reader_sync != syncs) {
          e.reader = e.reader_warp = -1;  // every read so far is ordered before this write
        } else {
          hazard = "racecheck: write-after-read hazard";
          other = e.reader;
        }
      }
      e.writer = self;
      e.writer_sync = syncs;
      e.written = cta->stamp;
    } else {
      if (e.writer >= 0 && !write_ordered) {
        hazard = "racecheck: read-after-write hazard";
      } else if (e.written != cta->stamp) {
        hazard = "initcheck: read of shared memory not written by this block";
        other = -1;
      }
      e.reader = e.reader == -1 || e.reader == self ? self : -2;
      e.reader_warp = e.reader_warp == -1 || e.reader_warp == warp ? warp : -2;
      e.reader_sync = syncs;
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

// ---- global memory: buffered stores (the memory model above) ------------------------------

template <typename T>
void global_store(T* address, T value) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  if (cta == nullptr) {
    *address = value;
    return;
  }
  PendingStore s{address, sizeof(T), 0};
  std::memcpy(&s.value, &value, sizeof(T));
  cta->pending[cta->current][reinterpret_cast<uintptr_t>(address)] = s;
}

template <typename T>
T global_load(const T* address) {
  if (cta != nullptr) {
    const auto key = reinterpret_cast<uintptr_t>(address);
    for (const StoreBuffer* buffer : {&cta->pending[cta->current], &cta->ordered}) {
      const auto hit = buffer->find(key);
      if (hit != buffer->end()) {
        T value;
        std::memcpy(&value, &hit->second.value, sizeof(T));
        return value;
      }
    }
  }
  return *address;
}

template <typename T>
class GlobalRef {
 public:
  explicit GlobalRef(T* p) : p_(p) {}
  operator T() const { return global_load(p_); }
  const GlobalRef& operator=(const T& value) const {
    global_store(p_, value);
    return *this;
  }

 private:
  T* p_;
};

// A pointer to global memory whose stores follow the model's weak ordering.
template <typename T>
class GlobalPtr {
 public:
  GlobalPtr(T* p) : p_(p) {}  // NOLINT: implicit, like the raw pointer it stands for
  T* get() const { return p_; }
  GlobalPtr operator+(int64_t i) const { return GlobalPtr(p_ + i); }
  auto operator[](int64_t i) const {
    if constexpr (std::is_const_v<T>) {
      return global_load(p_ + i);
    } else {
      return GlobalRef<T>(p_ + i);
    }
  }

 private:
  T* p_;
};

// ---- barriers -----------------------------------------------------------------------------

inline void release_barrier() {
  for (int t = 0; t < cta->threads; ++t)
    if (cta->state[t] == FiberState::AtBarrier) cta->state[t] = FiberState::Runnable;
  cta->at_barrier = 0;
  cta->or_result = cta->or_accumulator;
  cta->or_accumulator = 0;
  cta->epoch = ++epoch_counter;  // a new interval for the race check
  cta->released = true;
  for (StoreBuffer& buffer : cta->pending) {  // the stores before the barrier are ordered before it
    for (auto& entry : buffer) cta->ordered[entry.first] = entry.second;
    buffer.clear();
  }
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
  yield_to_scheduler(Yield::Blocked);
  return cta->or_result;
}

// The lanes of the caller's warp meet here (the model of a warp-collective instruction); with
// `orders_smem` (__syncwarp) the shared-memory accesses before it are ordered before those after.
inline void warp_barrier(bool orders_smem = false) {
  const int self = cta->current, warp = self / kWarpSize;
  if (++cta->warp_arrived[warp] == kWarpSize) {
    cta->warp_arrived[warp] = 0;
    if (orders_smem) ++cta->warp_syncs[warp];
    for (int t = warp * kWarpSize; t < (warp + 1) * kWarpSize; ++t)
      if (cta->state[t] == FiberState::AtWarpBarrier) cta->state[t] = FiberState::Runnable;
    return;
  }
  cta->state[self] = FiberState::AtWarpBarrier;
  yield_to_scheduler(Yield::Blocked);
}

// __syncwarp() at file:line: the caller's warp meets and its shared-memory accesses are ordered.
inline void warp_sync(const char* file, int line) {
  std::string site = std::string(file) + ":" + std::to_string(line);
  if (site == removed_barrier) return;
  if (cta->current % kWarpSize == 0) barrier_sites.insert(std::move(site));
  warp_barrier(true);
}

// cp.async of 16 bytes (cuda_shim.h's header: the write is recorded at issue, performed at the wait).
template <typename T>
void cp_async_16(SmemPtr<T> dst, const T* src) {
  on_smem_access(dst.get(), 16, true);
  cta->copies[cta->current].push_back(AsyncCopy{reinterpret_cast<unsigned char*>(dst.get()),
                                                reinterpret_cast<const unsigned char*>(src), 16,
                                                cta->copy_groups[cta->current]});
}
inline void cp_async_commit() { ++cta->copy_groups[cta->current]; }
// Performs the caller's copies of all but its kPending most recent committed groups.
template <int kPending>
void cp_async_wait() {
  std::vector<AsyncCopy>& copies = cta->copies[cta->current];
  const int done_below = cta->copy_groups[cta->current] - kPending;
  std::vector<AsyncCopy> left;
  for (const AsyncCopy& c : copies) {
    if (c.group < done_below) {
      on_smem_access(c.dst, c.bytes, true);
      std::memcpy(c.dst, c.src, c.bytes);
    } else {
      left.push_back(c);
    }
  }
  copies.swap(left);
}

// After an atomic: a scheduling point. One that left the value as it was is a spin-wait step.
inline void after_atomic(bool wrote) {
  if (cta != nullptr) yield_to_scheduler(wrote ? Yield::Atomic : Yield::Spin);
}

inline std::function<void()> body;  // the running launch's kernel

inline void fiber_entry() {
  body();
  cta->state[cta->current] = FiberState::Done;
  ++cta->done;
  if (cta->at_barrier > 0 && cta->at_barrier + cta->done == cta->threads) release_barrier();
  cta->reason = Yield::Exit;  // returns to the scheduler (uc_link)
}

// ---- the scheduler ------------------------------------------------------------------------

constexpr size_t kFiberStack = 128 * 1024;

inline std::vector<std::unique_ptr<Cta>> slots;  // one per co-resident CTA

// What the last launch did (for the model's own tests).
struct LaunchRecord {
  unsigned grid = 0;
  unsigned resident_limit = 0;  // CTAs that may run at once
  unsigned max_resident = 0;    // the most that did
  long switches = 0;            // moves from one CTA to another
  int threads = 0;              // per CTA
};
inline LaunchRecord last_launch;

inline void start_cta(Cta& c, unsigned block, int threads) {
  c.block = block;
  c.threads = threads;
  c.current = c.cursor = c.at_barrier = c.done = c.or_accumulator = c.or_result = 0;
  std::fill(std::begin(c.warp_arrived), std::end(c.warp_arrived), 0);
  c.epoch = ++epoch_counter;
  c.stamp = ++stamp_counter;
  c.released = c.parked = c.spinning = false;
  c.state.assign(threads, FiberState::Runnable);
  c.barriers_passed.assign(threads, 0);
  c.pending.resize(threads);
  for (StoreBuffer& buffer : c.pending) buffer.clear();
  c.copies.assign(threads, {});
  c.copy_groups.assign(threads, 0);
  c.ordered.clear();
  const auto granules = static_cast<size_t>((smem_bytes + 1) / 2);
  if (c.shadow.size() < granules) c.shadow.resize(granules);  // stale entries carry older stamps
  c.smem.assign(static_cast<size_t>(smem_bytes), 0xFF);       // NaN in fp32, fp16 and bf16
  const size_t stack_bytes = static_cast<size_t>(threads) * kFiberStack;
  if (c.stack_bytes < stack_bytes) {
    c.stacks.reset(new char[stack_bytes]);
    c.stack_bytes = stack_bytes;
  }
  c.contexts.assign(threads, ucontext_t{});
  for (int t = 0; t < threads; ++t) {
    getcontext(&c.contexts[t]);
    c.contexts[t].uc_stack.ss_sp = c.stacks.get() + static_cast<size_t>(t) * kFiberStack;
    c.contexts[t].uc_stack.ss_size = kFiberStack;
    c.contexts[t].uc_link = &scheduler_context;
    makecontext(&c.contexts[t], fiber_entry, 0);
  }
}

// The next runnable thread of c from its cursor on, -1 if none.
inline int next_runnable(const Cta& c) {
  for (int i = 0; i < c.threads; ++i) {
    const int t = (c.cursor + i) % c.threads;
    if (c.state[t] == FiberState::Runnable) return t;
  }
  return -1;
}

// Runs kernel() for every CTA of a 1-D grid, `threads` fibers per CTA, with `dynamic_smem` bytes
// of poisoned, checked shared memory per CTA and at most `resident_limit` CTAs at once (0: all;
// `residency` says where the limit comes from). Raises on the first check that fails.
template <typename Kernel>
void launch(const char* name, unsigned blocks, int threads, int64_t dynamic_smem, Kernel kernel,
            unsigned resident_limit = 0, const std::string& residency = "") {
  if (threads > kMaxThreads || threads % kWarpSize != 0) throw std::runtime_error("emu: unsupported block size");
  if (dynamic_smem > smem_capacity) throw std::runtime_error("emu: dynamic smem beyond the model's buffer");
  kernel_name = name;
  grid_dim = Dim3{blocks, 1, 1};
  block_dim = Dim3{static_cast<unsigned>(threads), 1, 1};
  smem_bytes = dynamic_smem;
  first_error.clear();
  std::vector<unsigned> order(blocks);
  std::iota(order.begin(), order.end(), 0u);
  std::mt19937_64 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);
  // The schedule's choices: from the seed and the launch (not from the launches before it, so a
  // test run alone replays its schedule).
  std::mt19937_64 pick(seed ^ (std::hash<std::string>{}(name) + 0x9E3779B97F4A7C15ull * (blocks + 1) +
                               static_cast<uint64_t>(dynamic_smem) * 31 + static_cast<uint64_t>(threads)));
  const auto coin = [&](unsigned n) { return pick() % n == 0; };

  const unsigned limit = resident_limit == 0 ? blocks : std::min(blocks, resident_limit);
  while (slots.size() < limit) slots.emplace_back(new Cta);
  std::vector<Cta*> free_slots, active;
  for (unsigned i = 0; i < limit; ++i) free_slots.push_back(slots[i].get());
  std::memset(smem_base, 0xFF, static_cast<size_t>(smem_capacity));
  body = [&] { kernel(); };
  StoreBuffer retired;  // buffered stores of exited CTAs: published at the end of the grid
  last_launch = LaunchRecord{blocks, limit, 0, 0, threads};

  Cta* running = nullptr;  // whose shared memory is in smem_base
  Cta* chosen = nullptr;
  unsigned started = 0, finished = 0;
  long spins = 0;
  while (first_error.empty()) {
    while (started < blocks && !free_slots.empty()) {
      Cta* c = free_slots.back();
      free_slots.pop_back();
      start_cta(*c, order[started++], threads);
      active.push_back(c);
      spins = 0;
    }
    if (active.empty()) break;
    last_launch.max_resident = std::max<unsigned>(last_launch.max_resident, static_cast<unsigned>(active.size()));
    if (chosen == nullptr) {
      // A random CTA that can run and neither is parked nor spins; else, with probability 1/2 if
      // some are parked, one that spins; else one of the parked ones (unparked).
      const size_t n = active.size();
      const auto random_runnable = [&](bool parked, bool spinning) -> Cta* {
        const size_t first = pick() % n;
        for (size_t i = 0; i < n; ++i) {
          Cta* c = active[(first + i) % n];
          if (c->parked == parked && c->spinning == spinning && next_runnable(*c) >= 0) return c;
        }
        return nullptr;
      };
      chosen = random_runnable(false, false);
      if (chosen == nullptr) {
        Cta* parked = random_runnable(true, false);
        chosen = random_runnable(false, true);
        if (chosen == nullptr || (parked != nullptr && coin(2))) {
          chosen = parked;
          chosen->parked = false;
        }
      }
      if (chosen == nullptr) {  // every resident CTA waits at a barrier (checked after each run: not reached)
        fail("synccheck: deadlock, no resident CTA can run");
        break;
      }
    }
    const int t = next_runnable(*chosen);
    if (running != chosen) {
      if (running != nullptr) std::memcpy(running->smem.data(), smem_base, static_cast<size_t>(smem_bytes));
      std::memcpy(smem_base, chosen->smem.data(), static_cast<size_t>(smem_bytes));
      running = chosen;
      ++last_launch.switches;
    }
    cta = chosen;
    chosen->current = t;
    chosen->released = false;
    thread_idx = Dim3{static_cast<unsigned>(t), 0, 0};
    block_idx = Dim3{chosen->block, 0, 0};
    swapcontext(&scheduler_context, &chosen->contexts[t]);

    bool switch_now = false;
    switch (chosen->reason) {
      case Yield::Blocked:
        chosen->cursor = t + 1;
        if (chosen->released) switch_now = coin(16);
        break;
      case Yield::Atomic:
        chosen->cursor = t;  // the same thread goes on when its CTA runs again
        switch_now = chosen->parked = coin(2);
        break;
      case Yield::Spin:
        chosen->cursor = t + 1;
        switch_now = true;
        break;
      case Yield::Exit:
        chosen->cursor = t + 1;
        switch_now = coin(16);
        break;
    }
    chosen->spinning = chosen->reason == Yield::Spin;
    if (chosen->reason == Yield::Spin) {
      ++spins;
    } else if (chosen->reason != Yield::Blocked || chosen->released) {
      spins = 0;  // progress
    }
    if (chosen->done == chosen->threads) {  // the CTA exits; its slot takes the next one
      StoreBuffer& left = chosen->ordered;  // a thread's later stores win over those before a barrier
      for (StoreBuffer& buffer : chosen->pending) {
        for (auto& entry : buffer) left[entry.first] = entry.second;
      }
      for (auto& entry : left) retired[entry.first] = entry.second;
      active.erase(std::find(active.begin(), active.end(), chosen));
      free_slots.push_back(chosen);
      if (running == chosen) running = nullptr;
      chosen = nullptr;
      ++finished;
      continue;
    }
    if (next_runnable(*chosen) < 0) {
      fail("synccheck: deadlock, a barrier that not every thread of the block reaches");
      break;
    }
    if (spins > spin_budget) {
      std::ostringstream s;
      s << "deadlock: " << kernel_name << ": grid of " << blocks << " CTAs, " << limit << " co-resident"
        << (residency.empty() ? "" : " (" + residency + ")") << "; " << finished << " CTAs finished, "
        << active.size() << " resident spin-wait with no progress for " << spins << " steps, " << blocks - started
        << " never started: CTAs spin-waiting on CTAs that cannot be scheduled";
      fail(s.str());
      break;
    }
    if (switch_now) chosen = nullptr;
  }
  body = nullptr;
  cta = nullptr;
  if (!first_error.empty()) throw std::runtime_error(first_error + " [seed " + std::to_string(seed) + "]");
  publish(retired);
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim
#define blockDim emu::block_dim

#define __syncthreads() emu::block_barrier(0, __FILE__, __LINE__)
#define __syncthreads_or(predicate) emu::block_barrier((predicate), __FILE__, __LINE__)
#define __syncwarp(...) emu::warp_sync(__FILE__, __LINE__)

namespace emu {
// __threadfence() at file:line: publishes the caller's buffered stores and those ordered before it
// by a barrier (cumulativity). A fence at removed_barrier's "file:line" does nothing (a seeded bug).
inline void thread_fence(const char* file, int line) {
  if (cta == nullptr || removed_barrier == std::string(file) + ":" + std::to_string(line)) return;
  publish(cta->pending[cta->current]);
  publish(cta->ordered);
}
}  // namespace emu
#define __threadfence() emu::thread_fence(__FILE__, __LINE__)
// Atomics act on memory at once and are scheduling points.
inline int atomicAdd(int* address, int value) {
  if (value == 0) {  // an atomic load (a spin-wait's poll): other CTAs run first, then it reads
    emu::after_atomic(false);
    return *address;
  }
  const int old = *address;
  *address = old + value;
  emu::after_atomic(true);
  return old;
}
inline int atomicSub(int* address, int value) { return atomicAdd(address, -value); }
inline int atomicExch(int* address, int value) {
  const int old = *address;
  *address = value;
  emu::after_atomic(old != value);
  return old;
}
inline int atomicCAS(int* address, int compare, int value) {
  const int old = *address;
  if (old == compare) *address = value;
  emu::after_atomic(old == compare && value != old);
  return old;
}
inline int atomicMax(int* address, int value) {
  const int old = *address;
  if (value > old) *address = value;
  emu::after_atomic(value > old);
  return old;
}
inline void __nanosleep(unsigned) { emu::after_atomic(false); }  // a spin-wait step
inline float __ldcg(const float* address) { return emu::global_load(address); }
inline float __ldcg(emu::GlobalPtr<float> address) { return emu::global_load(address.get()); }

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
  // Per CTA: another CTA may run while this warp is between its two warp barriers.
  const void** a_of = emu::cta->fragment_a;
  const void** b_of = emu::cta->fragment_b;
  const int self = emu::thread_idx.x, lane = self % emu::kWarpSize, warp0 = self - lane;
  a_of[self] = &a;
  b_of[self] = &b;
  emu::warp_barrier();
  float tile_a[M * K], tile_b[K * N];  // gathered from the 32 lanes' fragments
  const auto& order_a = element_order<FA>();
  const auto& order_b = element_order<FB>();
  for (int e = 0; e < M * K; ++e) {
    const float v = static_cast<const FA*>(a_of[warp0 + e / FA::num_elements])->x[e % FA::num_elements];
    tile_a[order_a[e]] = std::is_same_v<TA, precision::tf32> ? tf32_bits(v) : v;
  }
  for (int e = 0; e < K * N; ++e) {
    const float v = static_cast<const FB*>(b_of[warp0 + e / FB::num_elements])->x[e % FB::num_elements];
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

// CTA-level building blocks shared by the spinal CUDA kernels (forward.cu, backward.cu).
//
// Every kernel here is a chain of small GEMMs computed by one CTA of kThreads = 256 threads
// (8 warps) on one output tile of kTileM x kTileN fp32 accumulators, with operands staged in
// shared memory in K-chunks of kTileK:
//
//   acc[kTileM x kTileN] += A[kTileM x K] * B[K x kTileN]
//
// Interchangeable accumulator policies (template parameter `Mma`) do the math:
//   SimtMma<32>          fp32, exact FMA (no TF32). Thread t owns rows warp + 8*i, columns lane + 32*j.
//   WmmaMma<32, Tf32>    fp32 inputs rounded to TF32 on tensor cores (only when the user allows TF32;
//                        sm_80 and newer).
//   WmmaMma<64, half/bf16>  tensor cores (WMMA m16n16k16), fp32 accumulation (sm_80 and newer).
//   WmmaMma<32, half>    the fp16 policy of sm_75 (T4): 32-row tiles, so that the widest layer's
//                        shared memory (62 KB at w = 256) fits its 64 KB per block.
// The WMMA policies arrange the 8 warps as 2 (rows) x 4 (columns); each warp owns a
// (kTileM/2) x 32 sub-tile, i.e. (kTileM/32) x 2 fragments of 16x16.
// Architectures: bf16 and TF32 have no tensor cores before sm_80 (mma.h declares neither their
// fragments nor __float_to_tf32 there), so the kernels of those policies, and every bf16 kernel,
// hold device code only for sm_80+ (kRunsOnThisArch); the op routes bf16 on older GPUs to the
// hoisted chain and runs float32 there on SimtMma whatever the TF32 setting (launch.cuh).
// Policies expose: kTileM, kPad (row padding of staged operands, in elements), zero(), mma(), store().
// All operand pointers handed to mma() must be 32-byte aligned and their leading dimensions
// multiples of kPad (WMMA: 16-byte multiples); the smem layouts below guarantee it.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifndef SPINAL_CUDA_EMULATION  // tests/cuda_emulation/ supplies a host model of nvcuda::wmma instead
#include <mma.h>
#endif

#include <algorithm>
#include <cstdint>

#include "../common/activation.h"
#include "../common/message_text.h"
#include "../common/philox.h"
#include "../common/spinal_shape.h"

namespace spinal_ops {
namespace cuda_kernels {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileN = 128;  // output columns per CTA tile
constexpr int kTileK = 32;   // K-chunk staged in shared memory per step
constexpr int kAccLd = kTileN + 4;  // leading dimension of the fp32 accumulator tile in smem

// Widest layer (w) the tile kernels keep on chip; wider layers take the hoisted chain, and so
// do narrower ones whose shared memory exceeds the device's opt-in maximum (tile_kernel_width_limit).
// Python reads it through torch.ops.spinal_ops.cuda_tile_kernel_max_width() (one source of truth).
constexpr int64_t kTileKernelMaxWidth = 256;

enum class Layout { Row, Col };

// A pointer into shared memory. The CPU model of CUDA (tests/cuda_emulation) substitutes a
// pointer that records every access, for its race and uninitialized-read checks.
// GlobalPtr: a pointer into global memory that other CTAs read after a fence; the model
// substitutes one whose stores stay invisible to other CTAs until a fence publishes them.
#ifdef SPINAL_CUDA_EMULATION
using emu::GlobalPtr;
using emu::smem_cast;
using emu::SmemPtr;
#else
template <typename T>
using SmemPtr = T*;
template <typename T>
using GlobalPtr = T*;
template <typename U, typename T>
__device__ __forceinline__ U* smem_cast(T* p) {
  return reinterpret_cast<U*>(p);
}
#endif

// Whether this compilation pass's device code has sm_80's bf16/TF32 tensor-core operations: the
// host pass and the CPU model of CUDA (no __CUDA_ARCH__) see every type.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define SPINAL_SM80_MMA 1
#endif

// The TF32 policy's element tag. One type in every pass (the kernels' mangled names must agree
// between the host and device passes); mapped to mma.h's precision::tf32 where that exists.
struct Tf32 {};

// Element (m, k) of A: Row -> A[m * ld + k], Col -> A[k * ld + m].
template <Layout L, typename P>
__device__ __forceinline__ auto a_elem(P a, int ld, int m, int k) {
  return L == Layout::Row ? a[m * ld + k] : a[k * ld + m];
}

// Element (k, n) of B: Row -> B[k * ld + n], Col -> B[n * ld + k].
template <Layout L, typename P>
__device__ __forceinline__ auto b_elem(P b, int ld, int k, int n) {
  return L == Layout::Row ? b[k * ld + n] : b[n * ld + k];
}

// Exact fp32 on CUDA cores.
template <int TileM>
struct SimtMma {
  static constexpr int kTileM = TileM;
  static constexpr int kPad = 1;  // odd leading dimensions: column-major B reads are conflict-free
  static constexpr int kRows = TileM / kWarps;
  static constexpr int kCols = kTileN / 32;
  static_assert(TileM % kWarps == 0, "tile rows must split evenly over the warps");

  float acc[kRows][kCols];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc[i][j] = 0.f;
  }

  // a, b: shared-memory pointers (SmemPtr) to the staged operands.
  template <Layout LA, Layout LB, typename PA, typename PB>
  __device__ __forceinline__ void mma(PA a, int lda, PB b, int ldb, int k_extent) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int k = 0; k < k_extent; ++k) {
      float av[kRows], bv[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) av[i] = static_cast<float>(a_elem<LA>(a, lda, warp + kWarps * i, k));
#pragma unroll
      for (int j = 0; j < kCols; ++j) bv[j] = static_cast<float>(b_elem<LB>(b, ldb, k, lane + 32 * j));
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int j = 0; j < kCols; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }

  // Writes the tile to c[kTileM x kTileN] (row-major, leading dimension ldc).
  __device__ __forceinline__ void store(SmemPtr<float> c, int ldc) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) c[(warp + kWarps * i) * ldc + lane + 32 * j] = acc[i][j];
  }
};

// The WMMA fragment element type and K-step for a storage type.
template <typename Element>
struct WmmaTraits;
template <>
struct WmmaTraits<__half> {
  using Storage = at::Half;
  static constexpr int kStep = 16;
};
template <>
struct WmmaTraits<__nv_bfloat16> {
  using Storage = at::BFloat16;
  static constexpr int kStep = 16;
};
template <>
struct WmmaTraits<Tf32> {
  using Storage = float;
  static constexpr int kStep = 8;
};

// The element type of mma.h's fragments for a policy's element.
template <typename Element>
struct WmmaFragmentElement {
  using type = Element;
};
#ifdef SPINAL_SM80_MMA
template <>
struct WmmaFragmentElement<Tf32> {
  using type = nvcuda::wmma::precision::tf32;
};
#endif

// Stand-in for a fragment type the architecture lacks (the TF32 accumulator, m16n16k8, before
// sm_80): the host's shared-memory arithmetic still names the policy; its kernels are not
// compiled there (kRunsOnThisArch).
struct MissingFragment {};

template <int TileM, typename Element>
struct WmmaMma {
  static constexpr int kTileM = TileM;
  static constexpr int kPad = 8;  // keeps leading dimensions 16-byte multiples (WMMA requirement)
  static constexpr int kStep = WmmaTraits<Element>::kStep;
  static constexpr int kFragRows = TileM / 32;  // warp sub-tile is (TileM/2) x 32
  static constexpr int kFragCols = 2;
  static_assert(TileM % 32 == 0, "WMMA tile rows must be a multiple of 32");
  using Storage = typename WmmaTraits<Element>::Storage;
  using LoadType = std::conditional_t<std::is_same_v<Storage, float>, float, Element>;
  template <Layout L>
  using WmmaLayout = std::conditional_t<L == Layout::Row, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using FragmentElement = typename WmmaFragmentElement<Element>::type;
#ifdef SPINAL_SM80_MMA
  static constexpr bool kFragmentsDeclared = true;
#else
  static constexpr bool kFragmentsDeclared = kStep == 16;  // m16n16k16 accumulators exist from sm_70
#endif
  using Accumulator = std::conditional_t<kFragmentsDeclared,
                                         nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kStep, float>,
                                         MissingFragment>;

  Accumulator acc[kFragRows][kFragCols];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kFragRows; ++i)
#pragma unroll
      for (int j = 0; j < kFragCols; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }

  template <Layout LA, Layout LB>
  __device__ __forceinline__ void mma(SmemPtr<const Storage> a_tile, int lda, SmemPtr<const Storage> b_tile, int ldb,
                                      int k_extent) {
    namespace wmma = nvcuda::wmma;
    const SmemPtr<const LoadType> a = smem_cast<const LoadType>(a_tile);
    const SmemPtr<const LoadType> b = smem_cast<const LoadType>(b_tile);
    const int warp = threadIdx.x / 32;
    const int row0 = (warp / 4) * (TileM / 2), col0 = (warp % 4) * 32;
    for (int k = 0; k < k_extent; k += kStep) {
      wmma::fragment<wmma::matrix_a, 16, 16, kStep, FragmentElement, WmmaLayout<LA>> af[kFragRows];
      wmma::fragment<wmma::matrix_b, 16, 16, kStep, FragmentElement, WmmaLayout<LB>> bf[kFragCols];
#pragma unroll
      for (int i = 0; i < kFragRows; ++i) {
        const int m = row0 + 16 * i;
        wmma::load_matrix_sync(af[i], LA == Layout::Row ? a + m * lda + k : a + k * lda + m, lda);
        round_if_tf32(af[i]);
      }
#pragma unroll
      for (int j = 0; j < kFragCols; ++j) {
        const int n = col0 + 16 * j;
        wmma::load_matrix_sync(bf[j], LB == Layout::Row ? b + k * ldb + n : b + n * ldb + k, ldb);
        round_if_tf32(bf[j]);
      }
#pragma unroll
      for (int i = 0; i < kFragRows; ++i)
#pragma unroll
        for (int j = 0; j < kFragCols; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(SmemPtr<float> c, int ldc) const {
    const int warp = threadIdx.x / 32;
    const int row0 = (warp / 4) * (TileM / 2), col0 = (warp % 4) * 32;
#pragma unroll
    for (int i = 0; i < kFragRows; ++i)
#pragma unroll
      for (int j = 0; j < kFragCols; ++j)
        nvcuda::wmma::store_matrix_sync(c + (row0 + 16 * i) * ldc + col0 + 16 * j, acc[i][j], ldc,
                                        nvcuda::wmma::mem_row_major);
  }

 private:
  template <typename Fragment>
  __device__ __forceinline__ static void round_if_tf32(Fragment& f) {
#ifdef SPINAL_SM80_MMA
    if constexpr (std::is_same_v<Element, Tf32>) {
#pragma unroll
      for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
    }
#endif
  }
};

// Device code per architecture. __CUDA_ARCH__ of this pass (0 in the host pass and in the CPU
// model, where every kernel is compiled).
#ifdef __CUDA_ARCH__
constexpr int kDeviceArch = __CUDA_ARCH__;
#else
constexpr int kDeviceArch = 0;
#endif
constexpr int kSm80 = 800;
// Row tile of the fp16 policy on compute capability < 8.0 (sm_75) and on 8.0+.
constexpr int kHalfTileMSm75 = 32;
constexpr int kHalfTileM = 64;

// The architectures [kMin, kMax] (as __CUDA_ARCH__) whose device code holds a policy's kernels:
// SimtMma everywhere; bf16 and TF32 from sm_80 (their tensor cores); fp16 in 64-row tiles from
// sm_80 and in 32-row tiles before (launch.cuh picks the same per device).
template <class Mma>
struct MmaArchRange {
  static constexpr int kMin = 0, kMax = 1 << 30;
};
template <int TileM, typename Element>
struct MmaArchRange<WmmaMma<TileM, Element>> {
  static constexpr bool kHalf = std::is_same_v<Element, __half>;
  static constexpr int kMin = kHalf && TileM == kHalfTileMSm75 ? 0 : kSm80;
  static constexpr int kMax = kHalf && TileM == kHalfTileMSm75 ? kSm80 - 1 : 1 << 30;
};

// Whether this pass compiles the kernels of storage type T (bf16: sm_80+) with policy Mma (void:
// no tile policy, the narrow kernels). Where false, the kernel's body is a trap: the op never
// launches it there (use_native_kernels, with_kernel_types).
template <class Mma, typename T>
constexpr bool runs_on_this_arch() {
  if (kDeviceArch == 0) return true;
  if (std::is_same_v<T, at::BFloat16> && kDeviceArch < kSm80) return false;
  if constexpr (std::is_void_v<Mma>) {
    return true;
  } else {
    return kDeviceArch >= MmaArchRange<Mma>::kMin && kDeviceArch <= MmaArchRange<Mma>::kMax;
  }
}
template <class Mma, typename T>
constexpr bool kRunsOnThisArch = runs_on_this_arch<Mma, T>();

// The body of a kernel compiled for an architecture that does not run it.
__device__ __forceinline__ void unsupported_arch() {
#ifdef __CUDA_ARCH__
  __trap();
#endif
}

// Cooperative fill of a rows x cols tile at dst (leading dimension ld) with value(r, c).
template <typename T, typename F>
__device__ __forceinline__ void fill_tile(SmemPtr<T> dst, int ld, int rows, int cols, F value) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
    const int r = idx / cols, c = idx - r * cols;
    dst[r * ld + c] = value(r, c);
  }
}

constexpr int64_t align128(int64_t bytes) { return (bytes + 127) / 128 * 128; }
constexpr int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shared-memory layout common to the three kernels (byte offsets from the dynamic smem base):
//   two on-chip state buffers  [kTileM][state_ld]  (h_{l-1}, h_l forward; dz_{l+1}, dz_l backward)
//   staged A operand           kTileM x kTileK, either layout
//   staged B operand           kTileK x kTileN, either layout
//   fp32 accumulator tile      [kTileM][kAccLd]
// state_width = 0 gives no state buffers (weight-gradient kernel).
template <class Mma, typename T>
struct SmemLayout {
  int state_ld;
  int64_t state_bytes, a_offset, b_offset, acc_offset, total;

  __host__ __device__ explicit SmemLayout(int state_width) {
    constexpr int64_t kM = Mma::kTileM, kP = Mma::kPad;
    state_ld = state_width > 0 ? state_width + static_cast<int>(kP) : 0;
    state_bytes = align128(kM * state_ld * static_cast<int64_t>(sizeof(T)));
    a_offset = 2 * state_bytes;
    const int64_t a_elems = kM * (kTileK + kP) > kTileK * (kM + kP) ? kM * (kTileK + kP) : kTileK * (kM + kP);
    b_offset = a_offset + align128(a_elems * static_cast<int64_t>(sizeof(T)));
    const int64_t b_elems =
        kTileN * (kTileK + kP) > kTileK * (kTileN + kP) ? kTileN * (kTileK + kP) : kTileK * (kTileN + kP);
    acc_offset = b_offset + align128(b_elems * static_cast<int64_t>(sizeof(T)));
    total = acc_offset + align128(kM * kAccLd * static_cast<int64_t>(sizeof(float)));
  }
  // Leading dimension of a staged operand whose contiguous extent is `extent`.
  __host__ __device__ static constexpr int staged_ld(int extent) { return extent + Mma::kPad; }
};

// The chain's sizes as every kernel receives them (each launch's Args struct derives from this).
struct ChainDims {
  int64_t batch;
  int n, s, w, num_layers, out_features;  // out_features = 0: no projection
  int state_width;                        // w rounded up to kTileK: columns of the on-chip state
  Activation act;
  float slope;
};

inline ChainDims chain_dims(const SpinalShape& shape, Activation act, float slope) {
  // The kernels index within a row in int: N, s, M and L*w (+ 1, the bias column) must fit, and
  // Window's sums (start + j, c + N - start, both < 2N) too.
  TORCH_CHECK(shape.in_features <= INT32_MAX / 2, "spinal_ops: N = ", text(shape.in_features),
              " is too large for the CUDA tile kernels");
  TORCH_CHECK(shape.split_size <= INT32_MAX && shape.out_features <= INT32_MAX && shape.hidden() < INT32_MAX,
              "spinal_ops: s = ", text(shape.split_size), ", M = ", text(shape.out_features), " or L*w = ",
              text(shape.hidden()),
              " is too large for the CUDA tile kernels");
  ChainDims d{};
  d.batch = shape.batch;
  d.n = static_cast<int>(shape.in_features);
  d.s = static_cast<int>(shape.split_size);
  d.w = static_cast<int>(shape.layer_width);
  d.num_layers = static_cast<int>(shape.num_layers);
  d.out_features = static_cast<int>(shape.out_features);
  d.state_width = static_cast<int>(round_up(shape.layer_width, kTileK));
  d.act = act;
  d.slope = slope;
  return d;
}

// What the kernels receive of a call's dropout (common/philox.h): the Philox key and keep rule; the
// site layout follows from ChainDims. The last member of each launch's Args: with the whole
// Dropout (64 bytes) there, ptxas allocated the kernels without dropout differently (sm_90: the
// SIMT forward 64 registers and 44 bytes spilled instead of 128 and none); these 16 bytes leave
// them as they were.
struct DropoutKey {
  uint64_t seed;
  uint32_t threshold;
  float scale;
};

inline DropoutKey dropout_key(const Dropout& dropout) {
  return {dropout.seed, dropout.threshold, dropout.scale};
}

// The call's (active) Dropout in a kernel compiled with its dropout stage.
__device__ __forceinline__ Dropout kernel_dropout(const ChainDims& dims, const DropoutKey& key) {
  Dropout dropout;
  dropout.seed = key.seed;
  dropout.threshold = key.threshold;
  dropout.scale = key.scale;
  dropout.active = true;
  dropout.split_size = dims.s;
  dropout.layer_width = dims.w;
  dropout.num_layers = dims.num_layers;
  dropout.has_projection = dims.out_features > 0;
  return dropout;
}

// v times its dropout factor (0 or 1/(1-p)) at site `site` of row `row`, scaled in fp32 and rounded
// once to T, as eager dropout's output is rounded; a dropped NaN stays NaN, as in the reference.
template <typename T>
__device__ __forceinline__ T dropped(const Dropout& dropout, T v, int64_t row, int64_t site) {
  return static_cast<T>(static_cast<float>(v) * dropout.factor(row, site));
}

// Typed views of the dynamic smem buffer as SmemLayout carves it (every kernel's prologue).
template <class Mma, typename T>
struct SmemViews {
  unsigned char* base;
  SmemLayout<Mma, T> layout;
  SmemPtr<T> a_stage;       // staged A operand tile
  SmemPtr<T> b_stage;       // staged B operand tile
  SmemPtr<float> acc_tile;  // [kTileM][kAccLd] fp32 accumulator tile
  __device__ SmemViews(unsigned char* smem, int state_width)
      : base(smem),
        layout(state_width),
        a_stage(reinterpret_cast<T*>(smem + layout.a_offset)),
        b_stage(reinterpret_cast<T*>(smem + layout.b_offset)),
        acc_tile(reinterpret_cast<float*>(smem + layout.acc_offset)) {}
  // State buffer 0 or 1: [kTileM][layout.state_ld], the chain's on-chip state (h or dZ).
  __device__ SmemPtr<T> state(int which) const { return reinterpret_cast<T*>(base + which * layout.state_bytes); }
};

// Column window of layer l: c(j) = (start + j) mod N for j < s. Its sums stay below 2N, which
// chain_dims() checks fits an int.
struct Window {
  int start, n, s;
  __host__ __device__ __forceinline__ int column(int j) const {
    const int c = start + j;
    return c >= n ? c - n : c;
  }
  // Position j of column c in the window, or -1 when the window does not read c.
  __host__ __device__ __forceinline__ int position(int c) const {
    const int j = c >= start ? c - start : c + n - start;
    return j < s ? j : -1;
  }
  // Whether the window reads any column of [begin, end).
  __host__ __device__ __forceinline__ bool intersects(int begin, int end) const {
    const int head_end = start + s < n ? start + s : n;  // [start, head_end) and, wrapping, [0, start + s - n)
    const int tail_end = start + s - n;
    return (begin < head_end && start < end) || (tail_end > 0 && begin < tail_end);
  }
};

__host__ __device__ __forceinline__ Window window_of(int layer, int n, int s) {
  return Window{static_cast<int>((static_cast<int64_t>(layer) * s) % n), n, s};
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

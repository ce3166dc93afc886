// Warp-level tensor-core forward for narrow layers (w <= kWarpNarrowMaxWidth = 32, M <=
// kWarpNarrowMaxOut = 32), half types (fp16, bf16) on sm_80+:
//   spinal_warp_narrow_forward_kernel  in place of spinal_narrow_forward_kernel (narrow_kernels.cuh)
//                                      or the tiled forward (forward_kernel.cuh);
// and its backward partner, spinal_warp_narrow_data_grad_kernel (launch 1), described below.
// Same outputs and Z layout as those (out; Z [B, L*w], written only when its pointer is set), with
// the same rounding (z rounded to T once, h = T(phi(float(Z)))), so backward launches 1 and 2
// follow unchanged. No dropout stage: calls with a dropout never reach it (register.cu routes them
// to the hoisted chain). Opt-in only (SPINAL_OPS_CUDA_WARP_NARROW=1, forward.cu) until a GPU run
// has measured it.
//
// Why: the narrow kernels (one thread per row) issue one FMA per shared-memory weight read and are
// issue-bound (mnist, bf16, H200, B = 65536: 40 % SM, 9 % DRAM throughput). Here the chain stays on
// the tensor cores: one warp owns 16 rows and computes each layer as WMMA m16n16k16 products with
// fp32 accumulators, with w and M padded to 16 or 32 (W, MP).
//
// Tiling and launch scheme
//   block = 32 * warps threads (warps <= kWarpNarrowMaxWarps = 16: the most whose shared memory fits
//   the device's opt-in maximum, at most one per 16-row tile); persistent grid of
//   min(co-resident CTAs, ceil(tiles / warps)) CTAs (forward.cu). Each CTA stages every layer's
//   weights once (the only __syncthreads), then each warp loops over the 16-row tiles
//   blockIdx.x * warps + warp + k * gridDim.x * warps on its own, with warp-level sync only.
//   Persistent rather than one CTA per tile group: the weights (mnist: 40 KB, as much as 64 rows of
//   x) are read from L2 once per CTA instead of once per 16 * warps rows, and a warp's next window
//   is in flight across the tile boundary.
// Per warp and tile, per layer l:
//   wait for the window x[rows, c_l(0..s-1)] staged in smem (16 x s16, s16 = s rounded up to 16,
//   zero past s and past the batch), then issue the copies of the next window (layer l + 1, or
//   the next tile's layer 0) into the other buffer: cp.async for 16-byte pieces that are
//   contiguous and aligned in x (a window wraps, and WMMA needs 32-byte aligned pointers, so x is
//   always staged), element copies for the rest;
//   acc(16 x W) = x_window A_l^T (s16 / 16 k-steps) + h_{l-1} R_l^T (W / 16 k-steps, l >= 1);
//   acc -> the warp's fp32 tile; per element z = acc + b_l -> Z (rounded to T once),
//   h_l = T(phi(float(Z))) -> the warp's h tile (zero past w: the next products' A operand);
//   y_acc(16 x MP) += h_l W_out[:, l*w:(l+1)*w]^T (fragments kept in registers across layers).
//   After the last layer y_acc -> the fp32 tile -> out (+ b_out), or without projection h_l went
//   straight to out.
// Shared memory (WarpNarrowLayout, 128-byte aligned regions; T elements are 2 bytes):
//   weights  A [L][W][s16 + 8], R [L-1][W][W + 8], W_out [L][MP][W + 8] (T, zero-padded),
//            b [L][W], b_out [MP] (fp32); the +8 keeps ldm a 16-byte multiple off the bank stride
//   per warp two x windows [16][s16 + 8], h [16][W + 8] (T), acc [16][max(W, MP) + 4] (fp32)
//   mnist (N = 320, s = 160, w = 8, L = 6, M = 10: W = MP = 16): 40.3 KB of weights + 12.5 KB per
//   warp; the 227 KB of sm_90 hold 14 warps (one CTA per SM), the 163 KB of sm_80 9, 99 KB parts 4.
//   Layers whose weights and one warp's tiles do not fit run today's kernels
//   (warp_narrow_forward_fits, forward.cu).
// Registers: the z and y accumulators (W / 16 + MP / 16 fragments of 8 fp32) and one A and B
//   fragment at a time. ptxas -v and cuobjdump -sass of sm_90 and sm_80 cubins of one translation
//   unit that instantiates this header's kernels for both types and every W/MP (nvcc -cubin -O3
//   -lineinfo --expt-relaxed-constexpr, CUDA 13.0; __launch_bounds__(512): at most 128), sm_90
//   registers bf16 / fp16 for W/MP 16/16: 49 / 48, 16/32: 64 / 64, 32/16: 64 / 61, 32/32: 64 / 64;
//   sm_80: 50..64. 0 bytes of stack, no spills, no STL/LDL. Shared memory is read and written only
//   as such: fragments by LDSM (load_matrix_shared; with mma.h's bf16 loads: 72..132 generic LD.E
//   per bf16 instance, 56..86 registers), accumulators and h by STS, no LD.E/ST.E; the window
//   copies are LDGSTS (cp.async). HMMA.16816.F32.BF16 (bf16) and HMMA.16816.F32 (fp16),
//   two per m16n16k16 mma_sync: 18 in the 16/16 kernels' SASS, 44 (fp16) and 28 (bf16) in the
//   32/32 ones: nvcc copies the loops fewer times around the inline wmma.load (44 with mma.h's
//   loads); the mma_sync calls executed are the same.
// Numerics: fp32 accumulation on the tensor cores, bias and phi in fp32 per element. Offsets into x,
// Z and out are 64-bit.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "backward_kernels.cuh"
#include "forward_kernel.cuh"

namespace spinal_ops {
namespace cuda_kernels {

constexpr int kWarpNarrowMaxWidth = 32;
constexpr int kWarpNarrowMaxOut = 32;
constexpr int kWarpNarrowMaxWarps = 16;
constexpr int kWarpRows = 16;  // rows per warp tile: WMMA's M

// Warps per CTA whose shared memory fits `optin` bytes next to `fixed` bytes staged once per CTA,
// `per_warp` bytes each: at most kWarpNarrowMaxWarps, 0 when not even one fits.
inline int64_t warp_narrow_warps_in(int64_t optin, int64_t fixed, int64_t per_warp) {
  return std::max<int64_t>(0, std::min<int64_t>(kWarpNarrowMaxWarps, (optin - fixed) / per_warp));
}

// The WMMA fragment element of a storage type.
template <typename T>
struct WmmaElementOf;
template <>
struct WmmaElementOf<at::Half> {
  using type = __half;
};
template <>
struct WmmaElementOf<at::BFloat16> {
  using type = __nv_bfloat16;
};

// cp.async: 16-byte copies global -> shared that bypass the registers; the model of CUDA supplies
// its own (tests/cuda_emulation/cuda_shim.h).
#ifdef SPINAL_CUDA_EMULATION
using emu::cp_async_16;
using emu::cp_async_commit;
using emu::cp_async_wait;
#else
template <typename T>
__device__ __forceinline__ void cp_async_16(T* dst, const T* src) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most kPending of this thread's committed groups are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
#endif

// warp_products' fragment loads from shared memory. mma.h's bf16 loads compile to generic loads
// (LD.E, four per fragment) even from a __shared__ array, where its fp16 loads take the shared
// state space (LDSM), so bf16 fragments load through wmma.load's .shared form: the same fragment,
// one LDSM. fp16 and the CPU model's fragments (whose loads record the shared-memory reads) take
// load_matrix_sync.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define SPINAL_WMMA_LOAD_SHARED_BF16(matrix, layout)                                                \
  asm volatile("wmma.load." matrix ".sync.aligned." layout ".m16n16k16.shared.bf16"                 \
               " {%0, %1, %2, %3}, [%4], %5;\n"                                                     \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                                     \
               : "r"(address), "r"(ldm)                                                             \
               : "memory")
template <class Use, class Layout>
__device__ __forceinline__ void load_matrix_shared(nvcuda::wmma::fragment<Use, 16, 16, 16, __nv_bfloat16, Layout>& f,
                                                   const __nv_bfloat16* p, unsigned ldm) {
  constexpr bool kA = std::is_same_v<Use, nvcuda::wmma::matrix_a>;
  static_assert(kA == std::is_same_v<Layout, nvcuda::wmma::row_major>, "A row-major, B column-major");
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(p));
  unsigned* const r = reinterpret_cast<unsigned*>(&f);  // 4 registers of 2 bf16, as mma.h's loads fill it
  if constexpr (kA) {
    SPINAL_WMMA_LOAD_SHARED_BF16("a", "row");
  } else {
    SPINAL_WMMA_LOAD_SHARED_BF16("b", "col");
  }
}
#undef SPINAL_WMMA_LOAD_SHARED_BF16
#endif
template <class Fragment, typename E>
__device__ __forceinline__ void load_matrix_shared(Fragment& f, SmemPtr<const E> p, unsigned ldm) {
  nvcuda::wmma::load_matrix_sync(f, p, ldm);
}

// Calls f(integral_constant<W>, integral_constant<MP>) for the padded width and outputs (16 or 32
// each) the warp-level narrow kernels are compiled for that hold w and M.
template <typename F>
void with_warp_narrow_sizes(const SpinalShape& shape, F&& f) {
  const auto with_outputs = [&](auto width) {
    if (shape.out_features <= 16) {
      f(width, std::integral_constant<int, 16>{});
    } else {
      f(width, std::integral_constant<int, 32>{});
    }
  };
  if (shape.layer_width <= 16) {
    with_outputs(std::integral_constant<int, 16>{});
  } else {
    with_outputs(std::integral_constant<int, 32>{});
  }
}

// Byte offsets of the dynamic shared memory, from the layer's sizes (host and device alike).
template <int W, int MP>
struct WarpNarrowLayout {
  static constexpr int kWLd = W + 8;                      // h, R and W_out rows (T)
  static constexpr int kAccLd = (W > MP ? W : MP) + 4;    // the fp32 tile
  int s16, s_ld;
  int64_t a, r, out, bias, bias_out, warp_base, x_bytes, h, acc, warp_bytes;

  __host__ __device__ WarpNarrowLayout(int s, int num_layers, bool projection) {
    constexpr int64_t kT = 2;  // bytes per element: fp16 and bf16
    s16 = static_cast<int>(round_up(s, 16));
    s_ld = s16 + 8;
    const int64_t m_rows = projection ? MP : 0;
    a = 0;
    r = a + align128(int64_t{num_layers} * W * s_ld * kT);
    out = r + align128(int64_t{num_layers - 1} * W * kWLd * kT);
    bias = out + align128(int64_t{num_layers} * m_rows * kWLd * kT);
    bias_out = bias + align128(int64_t{num_layers} * W * 4);
    warp_base = bias_out + align128(m_rows * 4);
    x_bytes = align128(int64_t{kWarpRows} * s_ld * kT);  // one window buffer
    h = 2 * x_bytes;
    acc = h + align128(int64_t{kWarpRows} * kWLd * kT);
    warp_bytes = acc + align128(int64_t{kWarpRows} * kAccLd * 4);
  }
  __host__ __device__ int64_t total(int warps) const { return warp_base + warps * warp_bytes; }
};

// Cooperative fill of a rows x cols tile (leading dimension ld) by the whole CTA.
template <typename T, typename F>
__device__ __forceinline__ void fill_by_cta(SmemPtr<T> dst, int ld, int rows, int cols, F value) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int r = idx / cols, c = idx - r * cols;
    dst[r * ld + c] = value(r, c);
  }
}

// Issues the copies of layer `layer`'s window of rows row0.. into dst [kWarpRows][ld] (s16 columns,
// zero past s and past the batch) by the lanes of one warp: 16-byte pieces (8 columns) that are
// contiguous and aligned in x by cp.async, the others element by element.
template <typename T>
__device__ __forceinline__ void stage_window(const ForwardArgs<T>& p, SmemPtr<T> dst, int ld, int s16, int64_t row0,
                                             int layer, int lane) {
  const Window window = window_of(layer, p.n, p.s);
  const int pieces = s16 / 8;
  for (int idx = lane; idx < kWarpRows * pieces; idx += 32) {
    const int r = idx / pieces, j0 = (idx - r * pieces) * 8;
    const int64_t row = row0 + r;
    const bool valid = row < p.batch;
    const SmemPtr<T> d = dst + r * ld + j0;
    if (valid && j0 + 8 <= p.s) {
      const int c0 = window.column(j0);
      const T* src = p.x + row * p.n + c0;
      if (c0 + 8 <= p.n && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
        cp_async_16(d, src);
        continue;
      }
    }
    for (int q = 0; q < 8; ++q) {
      d[q] = valid && j0 + q < p.s ? p.x[row * p.n + window.column(j0 + q)] : T(0);
    }
  }
}

// acc[n] += a[16 x k] * b[16n .. 16n+15][0 .. k)ᵀ for every n < N: one warp's products, both operands
// in shared memory, row-major with leading dimensions lda and ldb (k a multiple of 16).
template <int N, typename E>
__device__ __forceinline__ void warp_products(
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[N], SmemPtr<const E> a, int lda,
    SmemPtr<const E> b, int ldb, int k) {
  namespace wmma = nvcuda::wmma;
  for (int k0 = 0; k0 < k; k0 += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a_frag;
    load_matrix_shared(a_frag, a + k0, lda);
#pragma unroll
    for (int n = 0; n < N; ++n) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> b_frag;
      load_matrix_shared(b_frag, b + 16 * n * ldb + k0, ldb);
      wmma::mma_sync(acc[n], a_frag, b_frag, acc[n]);
    }
  }
}

template <typename T, int W, int MP>
__device__ __forceinline__ void warp_narrow_forward_rows(const ForwardArgs<T>& p) {
  namespace wmma = nvcuda::wmma;
  using E = typename WmmaElementOf<T>::type;
  using Smem = WarpNarrowLayout<W, MP>;
  using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  extern __shared__ __align__(128) unsigned char smem[];

  const bool projection = p.out_features > 0;
  const int w = p.w, num_layers = p.num_layers, m_count = p.out_features;
  const int64_t hidden = static_cast<int64_t>(num_layers) * w;
  const Smem layout(p.s, num_layers, projection);
  const int s16 = layout.s16, s_ld = layout.s_ld;
  const SmemPtr<T> a_w = reinterpret_cast<T*>(smem + layout.a);
  const SmemPtr<T> r_w = reinterpret_cast<T*>(smem + layout.r);
  const SmemPtr<T> out_w = reinterpret_cast<T*>(smem + layout.out);
  const SmemPtr<float> bias = reinterpret_cast<float*>(smem + layout.bias);
  const SmemPtr<float> bias_out = reinterpret_cast<float*>(smem + layout.bias_out);

  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* const own = smem + layout.warp_base + warp * layout.warp_bytes;
  // Window buffer 0 or 1 (by arithmetic: an array of the two would live in local memory).
  const auto x_buf = [&](int which) { return SmemPtr<T>(reinterpret_cast<T*>(own + which * layout.x_bytes)); };
  const SmemPtr<T> h = reinterpret_cast<T*>(own + layout.h);
  const SmemPtr<float> acc = reinterpret_cast<float*>(own + layout.acc);

  const int64_t tiles = ceil_div(p.batch, kWarpRows);
  const int64_t tile_stride = static_cast<int64_t>(gridDim.x) * warps;
  int64_t tile = static_cast<int64_t>(blockIdx.x) * warps + warp;
  // The first window is in flight while the CTA stages the weights.
  if (tile < tiles) {
    stage_window(p, x_buf(0), s_ld, s16, tile * kWarpRows, 0, lane);
    cp_async_commit();
  }
  fill_by_cta(a_w, s_ld, num_layers * W, s16, [&](int row, int k) {
    const int layer = row / W, j = row % W;
    return j < w && k < p.s ? p.weight_in[(static_cast<int64_t>(layer) * w + j) * p.s + k] : T(0);
  });
  fill_by_cta(r_w, Smem::kWLd, (num_layers - 1) * W, W, [&](int row, int k) {
    const int layer = row / W + 1, j = row % W;
    return j < w && k < w ? p.weight_hidden[(static_cast<int64_t>(layer - 1) * w + j) * w + k] : T(0);
  });
  if (projection) {
    fill_by_cta(out_w, Smem::kWLd, num_layers * MP, W, [&](int row, int k) {
      const int layer = row / MP, m = row % MP;
      return m < m_count && k < w ? p.weight_out[m * hidden + layer * w + k] : T(0);
    });
    fill_by_cta(bias_out, MP, 1, MP, [&](int, int m) {
      return p.bias_out != nullptr && m < m_count ? static_cast<float>(p.bias_out[m]) : 0.f;
    });
  }
  fill_by_cta(bias, W, num_layers, W, [&](int layer, int j) {
    return p.bias != nullptr && j < w ? static_cast<float>(p.bias[layer * w + j]) : 0.f;
  });
  __syncthreads();  // the weights are staged; from here on each warp syncs only itself

  int buffer = 0;
  for (; tile < tiles; tile += tile_stride) {
    const int64_t row0 = tile * kWarpRows;
    FragAcc y[MP / 16];
#pragma unroll
    for (int i = 0; i < MP / 16; ++i) wmma::fill_fragment(y[i], 0.f);

    for (int layer = 0; layer < num_layers; ++layer) {
      cp_async_wait<0>();
      // This window's copies (every lane's) have landed; the previous layer's reads of the other
      // buffer, of h and of the fp32 tile are done.
      __syncwarp();
      const int64_t next_tile = layer + 1 < num_layers ? tile : tile + tile_stride;
      if (next_tile < tiles) {
        stage_window(p, x_buf(buffer ^ 1), s_ld, s16, next_tile * kWarpRows, (layer + 1) % num_layers, lane);
        cp_async_commit();
      }

      FragAcc z[W / 16];
#pragma unroll
      for (int i = 0; i < W / 16; ++i) wmma::fill_fragment(z[i], 0.f);
      warp_products<W / 16, E>(z, smem_cast<const E>(x_buf(buffer)), s_ld,
                               smem_cast<const E>(a_w + layer * W * s_ld), s_ld, s16);
      if (layer > 0) {
        warp_products<W / 16, E>(z, smem_cast<const E>(h), Smem::kWLd,
                                 smem_cast<const E>(r_w + (layer - 1) * W * Smem::kWLd), Smem::kWLd, W);
      }
#pragma unroll
      for (int n = 0; n < W / 16; ++n) {
        wmma::store_matrix_sync(acc + 16 * n, z[n], Smem::kAccLd, wmma::mem_row_major);
      }
      __syncwarp();  // the fp32 tile is stored, and every lane's reads of h_{l-1} are done

      for (int idx = lane; idx < kWarpRows * W; idx += 32) {
        const int r = idx / W, c = idx % W;
        T h_value = T(0);
        if (c < w) {
          const float z_value = acc[r * Smem::kAccLd + c] + bias[layer * W + c];
          const T z_stored = static_cast<T>(z_value);
          h_value = static_cast<T>(activate(p.act, static_cast<float>(z_stored), p.slope));
          const int64_t row = row0 + r;
          if (row < p.batch) {
            const int64_t offset = row * hidden + static_cast<int64_t>(layer) * w + c;
            if (p.pre_activation != nullptr) p.pre_activation[offset] = z_stored;  // null: Z not kept
            if (!projection) p.out[offset] = h_value;
          }
        }
        h[r * Smem::kWLd + c] = h_value;
      }
      __syncwarp();  // h_l is stored: the A operand of the projection and of the next layer

      if (projection) {
        warp_products<MP / 16, E>(y, smem_cast<const E>(h), Smem::kWLd,
                                  smem_cast<const E>(out_w + layer * MP * Smem::kWLd), Smem::kWLd, W);
      }
      buffer ^= 1;
    }

    if (projection) {
      // The fp32 tile's last readers (the last epilogue) passed the __syncwarp after it.
#pragma unroll
      for (int n = 0; n < MP / 16; ++n) {
        wmma::store_matrix_sync(acc + 16 * n, y[n], Smem::kAccLd, wmma::mem_row_major);
      }
      __syncwarp();
      for (int idx = lane; idx < kWarpRows * MP; idx += 32) {
        const int r = idx / MP, m = idx % MP;
        const int64_t row = row0 + r;
        if (m < m_count && row < p.batch) {
          p.out[row * m_count + m] = static_cast<T>(acc[r * Smem::kAccLd + m] + bias_out[m]);
        }
      }
    }
  }
}

template <typename T, int W, int MP>
__global__ void __launch_bounds__(kWarpNarrowMaxWarps * 32)
    spinal_warp_narrow_forward_kernel(const ForwardArgs<T> p) {
  if constexpr (kDeviceArch == 0 || kDeviceArch >= kSm80) {
    warp_narrow_forward_rows<T, W, MP>(p);
  } else {
    unsupported_arch();
  }
}

// ---- Backward launch 1 (data gradients) --------------------------------------------------------
// spinal_warp_narrow_data_grad_kernel  in place of spinal_narrow_data_grad_kernel (narrow_kernels.cuh)
//                                      or the tiled launch 1 (backward_kernels.cuh), for the layers
//                                      the warp-level forward runs: w <= 32, M <= 32, fp16 and bf16
//                                      on sm_80+; launch 2 (the weight gradients) follows unchanged.
// Same outputs as those: dZ [B, L*w] (dz rounded to T once, the rounded value feeding dz_{l-1}), dx
// (every element written once, no atomics, no zero fill) and launch 2's split-K tile counters
// zeroed. No dropout stage: calls with a dropout never reach it (backward.cu). Opt-in with the
// forward (SPINAL_OPS_CUDA_WARP_NARROW=1) until a GPU run measures it.
//
// Why: the narrow launch 1 (one thread per row) issues one FMA per shared-memory weight read, as
// the narrow forward does; here the products run on the tensor cores, 16 rows per warp.
//
// Tiling and launch scheme
//   As the forward: block = 32 * warps threads (warps <= kWarpNarrowMaxWarps, the most whose shared
//   memory fits, at most one per 16-row tile), persistent grid of min(co-resident CTAs,
//   ceil(tiles / warps)) CTAs (backward.cu). Each CTA zeroes its share of the counters, stages the
//   weights once (the only __syncthreads), then each warp loops over its 16-row tiles with
//   warp-level sync only. Nothing of x is read, so there is no window to copy ahead.
// Per warp and tile:
//   g [16][MP] (grad_out, zero past M and past the batch) -> smem, the A operand of every layer;
//   for l = L-1 .. 0: acc(16 x W) = g W_out[:, l*w:(l+1)*w] (MP / 16 k-steps)
//                                  + dz_{l+1} R_{l+1} (W / 16 k-steps, l < L-1);
//     acc -> the warp's fp32 tile; per element dh (+ grad_out's column without projection) times
//     phi'(Z_l) -> dZ (rounded to T once) and dz_l's slot of the warp's dz tiles (zero past w and
//     past the batch): the A operand of dz_{l-1}'s product and of dx;
//   dx, per 16-column chunk of x: acc(16 x 16) = sum over the layers whose window reads a column of
//     the chunk of dz_l (16 x W) times that layer's dx tile (W x 16: A_l's columns at the chunk's
//     window positions, zero where the window does not read, wrap-around resolved per column when
//     the tile is staged); the fp32 tile -> dx, each element once.
// Shared memory (WarpNarrowGradLayout, 128-byte aligned regions; T elements are 2 bytes):
//   weights  R^T [L-1][W][W + 8], W_out^T [L][W][MP + 8] (with a projection), the dx tiles
//            [tiles][16][W + 8], one per (16-column chunk, layer whose window meets it), last so
//            that the device addresses them without counting them
//   per warp g [16][MP + 8] (with a projection), dz [L][16][W + 8] (T), acc [16][W + 4] (fp32)
//   mnist (N = 320, s = 160, w = 8, L = 6, M = 10: W = MP = 16): 60 dx tiles (each window meets 10
//   chunks; 45 KB), 53.3 KB of weights in all + 6.5 KB per warp: 16 warps (157.3 KB, one CTA per
//   SM) on sm_90 and on sm_80, 7 on 99 KB parts. Layers whose weights and one warp's tiles do not
//   fit run today's launch 1 (warp_narrow_backward_fits, backward.cu).
// Registers: the dh accumulators (W / 16 fragments of 8 fp32; one for a dx chunk) and one A and B
//   fragment at a time. __launch_bounds__(512, 1): one CTA per SM is the design (its warps share
//   the staged weights); with no minimum, ptxas aimed at 40 registers and spilled 4..16 bytes in
//   some instances. ptxas -v and cuobjdump -sass as for the forward, registers bf16 / fp16 for
//   W/MP 16/16: 40 / 42, 16/32: 40 / 46, 32/16: 59 / 60, 32/32: 58 / 59 on sm_90; sm_80: 38 / 39,
//   37 / 38, 58 / 58, 57 / 58. 0 bytes of stack, no spills, no STL/LDL; fragments load by LDSM, no
//   LD.E/ST.E (mma.h's bf16 loads: 72..96 LD.E, 54..68 registers). HMMA.16816.F32.BF16 (bf16) and
//   HMMA.16816.F32 (fp16): 10 (bf16) and 18 (fp16) in the 16/16 kernels' SASS, 28 and 44 in the
//   32/32 ones, fewer copies of the same loops as in the forward (bf16 16/16: 18 with mma.h's loads).
// Numerics: fp32 accumulation on the tensor cores, phi' in fp32 per element. Offsets into grad_out,
// Z, dZ and dx are 64-bit.

// The window of the layer after `window`'s: start + s mod N without a division (s <= N).
__host__ __device__ __forceinline__ Window next_window(Window window) {
  window.start += window.s;
  if (window.start >= window.n) window.start -= window.n;
  return window;
}

// Whether `window` reads a column of x's 16-column chunk at c0. The dx tiles are the (chunk, layer)
// pairs where it does, chunk by chunk and layer by layer.
__host__ __device__ __forceinline__ bool window_meets_chunk(const Window& window, int c0) {
  return window.intersects(c0, c0 + 16 < window.n ? c0 + 16 : window.n);
}

__host__ __device__ inline int64_t warp_narrow_dx_tiles(int n, int s, int num_layers) {
  int64_t tiles = 0;
  for (int c0 = 0; c0 < n; c0 += 16) {
    Window window{0, n, s};
    for (int layer = 0; layer < num_layers; ++layer, window = next_window(window)) {
      tiles += window_meets_chunk(window, c0);
    }
  }
  return tiles;
}

// Byte offsets of the data-gradient kernel's dynamic shared memory (host and device alike).
template <int W, int MP>
struct WarpNarrowGradLayout {
  static constexpr int kWLd = W + 8;    // R^T, dz and the dx tiles' rows (T)
  static constexpr int kMLd = MP + 8;   // g and W_out^T rows (T)
  static constexpr int kAccLd = W + 4;  // the fp32 tile: dh (W columns) or a dx chunk (16)
  static constexpr int64_t kDzBytes = int64_t{kWarpRows} * kWLd * 2;  // one dz slot, and one dx tile
  int64_t r, out, warp_base, g, dz, acc, warp_bytes;

  __host__ __device__ WarpNarrowGradLayout(int num_layers, bool projection) {
    constexpr int64_t kT = 2;  // bytes per element: fp16 and bf16
    r = 0;
    out = r + align128(int64_t{num_layers - 1} * W * kWLd * kT);
    warp_base = out + align128(projection ? int64_t{num_layers} * W * kMLd * kT : 0);
    g = 0;
    dz = g + align128(projection ? int64_t{kWarpRows} * kMLd * kT : 0);
    acc = dz + align128(num_layers * kDzBytes);
    warp_bytes = acc + align128(int64_t{kWarpRows} * kAccLd * 4);
  }
  __host__ __device__ int64_t dx_tiles(int warps) const { return warp_base + warps * warp_bytes; }
  __host__ __device__ int64_t total(int warps, int64_t tiles) const { return dx_tiles(warps) + tiles * kDzBytes; }
};

template <typename T, int W, int MP>
__device__ __forceinline__ void warp_narrow_data_grad_rows(const DataGradArgs<T>& p) {
  namespace wmma = nvcuda::wmma;
  using E = typename WmmaElementOf<T>::type;
  using Smem = WarpNarrowGradLayout<W, MP>;
  using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  constexpr int kWLd = Smem::kWLd, kMLd = Smem::kMLd, kAccLd = Smem::kAccLd;
  extern __shared__ __align__(128) unsigned char smem[];

  zero_split_k_counters(p);

  const bool projection = p.out_features > 0;
  const int w = p.w, n = p.n, s = p.s, num_layers = p.num_layers, m_count = p.out_features;
  const int64_t hidden = static_cast<int64_t>(num_layers) * w;
  const Smem layout(num_layers, projection);
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SmemPtr<T> r_t = reinterpret_cast<T*>(smem + layout.r);
  const SmemPtr<T> out_t = reinterpret_cast<T*>(smem + layout.out);
  const SmemPtr<T> dx_t = reinterpret_cast<T*>(smem + layout.dx_tiles(warps));
  unsigned char* const own = smem + layout.warp_base + warp * layout.warp_bytes;
  const SmemPtr<T> g = reinterpret_cast<T*>(own + layout.g);
  const SmemPtr<float> acc = reinterpret_cast<float*>(own + layout.acc);
  const auto dz_of = [&](int layer) {
    return SmemPtr<T>(reinterpret_cast<T*>(own + layout.dz + layer * Smem::kDzBytes));
  };

  // R_{l+1}^T and W_out's layer columns transposed: the B operands (row j holds output column j).
  fill_by_cta(r_t, kWLd, (num_layers - 1) * W, W, [&](int row, int i) {
    const int layer = row / W, j = row % W;
    return j < w && i < w ? p.weight_hidden[(static_cast<int64_t>(layer) * w + i) * w + j] : T(0);
  });
  if (projection) {
    fill_by_cta(out_t, kMLd, num_layers * W, MP, [&](int row, int m) {
      const int layer = row / W, j = row % W;
      return j < w && m < m_count ? p.weight_out[m * hidden + layer * w + j] : T(0);
    });
  }
  int dx_tile = 0;
  for (int c0 = 0; c0 < n; c0 += 16) {
    Window window{0, n, s};
    for (int layer = 0; layer < num_layers; ++layer, window = next_window(window)) {
      if (!window_meets_chunk(window, c0)) continue;
      const T* a_l = p.weight_in + static_cast<int64_t>(layer) * w * s;
      fill_by_cta(dx_t + dx_tile * kWarpRows * kWLd, kWLd, kWarpRows, W, [&](int k, int j) {
        const int position = c0 + k < n ? window.position(c0 + k) : -1;
        return j < w && position >= 0 ? a_l[static_cast<int64_t>(j) * s + position] : T(0);
      });
      ++dx_tile;
    }
  }
  __syncthreads();  // the weights are staged; from here on each warp syncs only itself

  const int64_t tiles = ceil_div(p.batch, kWarpRows);
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * warps + warp; tile < tiles;
       tile += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t row0 = tile * kWarpRows;
    if (projection) {
      for (int idx = lane; idx < kWarpRows * MP; idx += 32) {
        const int r = idx / MP, m = idx % MP;
        const int64_t row = row0 + r;
        g[r * kMLd + m] = row < p.batch && m < m_count ? p.grad_out[row * m_count + m] : T(0);
      }
      __syncwarp();  // g is staged
    }

    for (int layer = num_layers - 1; layer >= 0; --layer) {
      FragAcc dh[W / 16];
#pragma unroll
      for (int i = 0; i < W / 16; ++i) wmma::fill_fragment(dh[i], 0.f);
      if (projection) {
        warp_products<W / 16, E>(dh, smem_cast<const E>(g), kMLd, smem_cast<const E>(out_t + layer * W * kMLd),
                                 kMLd, MP);
      }
      if (layer + 1 < num_layers) {
        warp_products<W / 16, E>(dh, smem_cast<const E>(dz_of(layer + 1)), kWLd,
                                 smem_cast<const E>(r_t + layer * W * kWLd), kWLd, W);
      }
#pragma unroll
      for (int i = 0; i < W / 16; ++i) wmma::store_matrix_sync(acc + 16 * i, dh[i], kAccLd, wmma::mem_row_major);
      __syncwarp();  // the fp32 tile is stored

      for (int idx = lane; idx < kWarpRows * W; idx += 32) {
        const int r = idx / W, c = idx % W;
        const int64_t row = row0 + r;
        T dz = T(0);
        if (c < w && row < p.batch) {
          const int64_t offset = row * hidden + static_cast<int64_t>(layer) * w + c;
          const float dh_value = acc[r * kAccLd + c] + (projection ? 0.f : static_cast<float>(p.grad_out[offset]));
          dz = static_cast<T>(dh_value * activate_grad(p.act, static_cast<float>(p.pre_activation[offset]), p.slope));
          p.grad_pre[offset] = dz;
        }
        dz_of(layer)[r * kWLd + c] = dz;
      }
      __syncwarp();  // dz_l is stored (the next products' A operand); the fp32 tile is read
    }

    int dx_tile_next = 0;  // the dx tiles run chunk by chunk, layer by layer, as staged
    for (int c0 = 0; c0 < n; c0 += 16) {
      FragAcc dx[1];
      wmma::fill_fragment(dx[0], 0.f);
      Window window{0, n, s};
      for (int layer = 0; layer < num_layers; ++layer, window = next_window(window)) {
        if (!window_meets_chunk(window, c0)) continue;
        warp_products<1, E>(dx, smem_cast<const E>(dz_of(layer)), kWLd,
                            smem_cast<const E>(dx_t + dx_tile_next * kWarpRows * kWLd), kWLd, W);
        ++dx_tile_next;
      }
      wmma::store_matrix_sync(acc, dx[0], kAccLd, wmma::mem_row_major);
      __syncwarp();  // the chunk's fp32 tile is stored
      for (int idx = lane; idx < kWarpRows * 16; idx += 32) {
        const int r = idx / 16, k = idx % 16;
        const int64_t row = row0 + r;
        if (row < p.batch && c0 + k < n) p.grad_x[row * n + c0 + k] = static_cast<T>(acc[r * kAccLd + k]);
      }
      __syncwarp();  // the chunk's fp32 tile is read before the next one is stored
    }
  }
}

template <typename T, int W, int MP>
__global__ void __launch_bounds__(kWarpNarrowMaxWarps * 32, 1)
    spinal_warp_narrow_data_grad_kernel(const DataGradArgs<T> p) {
  if constexpr (kDeviceArch == 0 || kDeviceArch >= kSm80) {
    warp_narrow_data_grad_rows<T, W, MP>(p);
  } else {
    unsupported_arch();
  }
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

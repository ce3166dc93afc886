// Kernels for narrow layers (w <= kNarrowKernelMaxWidth, M <= kNarrowKernelMaxOut), one thread per row:
//   spinal_narrow_forward_kernel    in place of the tiled forward kernel (forward_kernel.cuh);
//   spinal_narrow_data_grad_kernel  in place of backward launch 1 (backward_kernels.cuh); launch 2
//                                   (the weight gradients) follows it unchanged.
// Each computes the same function and writes the same outputs as the kernel it replaces (out and
// Z; dZ, dx and the zeroed split-K counters), so the two kinds combine freely.
//
// Why: the tiled kernels' tensor-core tiles are 128 columns wide; at w = 8 they multiply 94 %
// zeros, and one 64-row CTA walks the whole chain behind two barriers per 32-column K-chunk. The
// chain's arithmetic per row is tiny (w*(s+w) + M*w multiply-adds per layer), so here one thread
// owns one row and keeps its z_l, h_{l-1} (dz_{l+1}) and g in registers.
//
// Tiling and launch scheme (both kernels)
//   grid  = ceil(B / kNarrowRows) CTAs; block = kNarrowRows = 128 threads, thread t <-> row
//   row0 + t; dynamic smem NarrowSmem (~30 KB: several CTAs per SM). Register arrays are indexed
//   by unrolled loops only (W, kNarrowChunk, kNarrowKernelMaxOut are compile-time), so they stay in
//   registers (the register caps: k*MinBlocksPerSm below).
//   Operands every thread reads alike (weights) are staged in smem and read at one address by the
//   whole CTA (a broadcast); row data goes through a [128][33] fp32 tile, written or read by one
//   warp per row (coalesced global access) and read or written by thread t in its own row (the
//   odd row stride makes that conflict-free).
// Forward, per layer l:
//   for each kNarrowChunk = 32-column chunk of the window (K = s): stage x[rows, chunk] (loaded
//   into registers one chunk ahead, 16 bytes per load where the chunk allows: XChunk) and A_l's
//   chunk transposed [32][W] (also one chunk ahead); acc[j] += A_l[j, k] x[t, k];
//   the layer's first chunk also stages R_l [W][W], b_l and W_out's layer columns [16][W]
//   (zero-padded past w and M);
//   z = acc + R_l h_{l-1} + b_l -> Z (rounded to T once; not written when the op keeps no Z, whose
//   pointer is then null), h_l = T(phi(float(Z))) (as the tiled kernel: the backward's
//   recomputation of h is bit-identical); y[m] += W_out[m, l*w + j] h_l[j] (y in the thread's own
//   row of a shared-memory tile: registers are the scarcer), or, without projection, h_l -> out.
// Data gradients:
//   recurrence, l = L-1 .. 0: stage W_out's layer columns and R_{l+1};
//     dz_l = (g W_out[:, l*w:(l+1)*w] + dz_{l+1} R_{l+1}) * phi'(Z_l) -> dZ (rounded to T; the
//     rounded value feeds dz_{l-1}, as in the tiled kernel);
//   dx, per 32-column chunk of x: for each layer whose window meets the chunk, stage A_l's
//     columns there [W][32] (zero where the window does not read) and add dz_l A_l (dz_l read
//     back from this thread's own dZ row); the chunk leaves through the row tile: every column of
//     dx written once, no zero fill, no atomics.
// Dropout (contract §1; the kernels' Drops instances, as in forward_kernel.cuh): each thread
//   computes its own row's factors (one Philox4x32-10 word per site, none stored). Forward: x's
//   window element as the thread reads it from the row tile, h_l for layer l+1's recurrence and
//   for the projection (each with its own factors), each dropped value scaled in fp32 and rounded
//   to T once, as eager dropout's output. Launch 1: dh_l = (g W_out) * F_H + (dz_{l+1} R_{l+1}) *
//   F_h,l+1, the two products summed apart; dx: per column, the layer's sum over j times the
//   factor of its window site. One word per site and row each way.
// Numerics: fp32 accumulation throughout, no TF32 (float32 calls are exact whatever allow_tf32).
// Offsets into x, Z, dZ, dx and out are 64-bit.
#pragma once

#include <cstdint>
#include <type_traits>

#include "backward_kernels.cuh"
#include "forward_kernel.cuh"

namespace spinal_ops {
namespace cuda_kernels {

constexpr int kNarrowRows = 128;  // rows per CTA = threads per CTA
constexpr int kNarrowChunk = 32;  // window columns staged per step
constexpr int kNarrowKernelMaxWidth = 16;
constexpr int kNarrowKernelMaxOut = 16;  // M: the backward's g values per thread, the forward's y columns
// CTAs per SM each kernel's register budget is capped for (65536 / (128 * CTAs) registers per
// thread): more warps in flight hide the global loads' latency, as long as nothing spills in bulk.
// The forward holds x's next chunk in registers: at 4 CTAs (128 registers) ptxas spilled up to
// 1.5 KB per thread, at 3 (168 registers) at most 92 bytes in half types and 192 in float32
// (sm_90); launch 1 fits 128 without spills. sm_75 (T4) runs both kernels unchanged for fp32 and
// fp16 (bf16 takes the hoisted chain there and its kernels are compiled to a trap, tile_mma.cuh):
// ptxas spills 0..80 bytes in the forward at 168 registers, none in launch 1 (125..128); its
// 64 KB of shared memory per SM holds 2 CTAs of NarrowSmem (27-29 KB), so there the smem, not
// the register cap, bounds the CTAs per SM. The dropout instances (sm_90): the forward spills 32
// (fp32, W = 8) to 268 bytes (half types, W = 16) at 168 registers, launch 1 none (126..128).
constexpr int kNarrowForwardMinBlocksPerSm = 3;
constexpr int kNarrowDataGradMinBlocksPerSm = 4;

// Calls f(std::integral_constant<int, W>{}) for the width W the kernels are compiled for that holds
// w (8 or 16; the weights are zero-padded to W).
template <typename F>
void with_narrow_width(int64_t w, F&& f) {
  if (w <= 8) {
    f(std::integral_constant<int, 8>{});
  } else {
    f(std::integral_constant<int, 16>{});
  }
}

// Shared-memory layout (fp32 elements from the dynamic smem base).
template <int W>
struct NarrowSmem {
  static constexpr int kXLd = kNarrowChunk + 1;
  static constexpr int kX = 0;
  static constexpr int kA = kX + kNarrowRows * kXLd;  // [kNarrowChunk][W] (forward), [W][kNarrowChunk] (dx)
  static constexpr int kR = kA + kNarrowChunk * W;    // [W][W]
  static constexpr int kOut = kR + W * W;             // [kNarrowKernelMaxOut][W]
  static constexpr int kBias = kOut + kNarrowKernelMaxOut * W;
  static constexpr int kYLd = kNarrowKernelMaxOut + 1;  // odd: thread t's row y_tile[t] is conflict-free
  static constexpr int kY = kBias + W;            // [kNarrowRows][kYLd] (forward: y, each thread its row)
  static constexpr int64_t kBytes = static_cast<int64_t>(kY + kNarrowRows * kYLd) * sizeof(float);
};

// The tiles of NarrowSmem<W> in a kernel's dynamic shared memory.
template <int W>
struct NarrowTiles {
  using Smem = NarrowSmem<W>;
  SmemPtr<float> rows;  // [kNarrowRows][kXLd]: x's chunk (forward) or dx's (data gradients)
  SmemPtr<float> a, r, out, bias, y;
  __device__ explicit NarrowTiles(unsigned char* smem)
      : rows(reinterpret_cast<float*>(smem) + Smem::kX),
        a(reinterpret_cast<float*>(smem) + Smem::kA),
        r(reinterpret_cast<float*>(smem) + Smem::kR),
        out(reinterpret_cast<float*>(smem) + Smem::kOut),
        bias(reinterpret_cast<float*>(smem) + Smem::kBias),
        y(reinterpret_cast<float*>(smem) + Smem::kY) {}
};

// One chunk of x (kNarrowRows rows x kNarrowChunk window columns) in flight in registers: thread t
// holds kGroups groups of kGroup consecutive columns (16 bytes), group i = t + i * kNarrowRows
// being row i / kGroups, columns (i % kGroups) * kGroup... of the chunk. A warp's loads cover
// whole 64- or 128-byte row segments; a chunk of 32 whole columns that are contiguous in x and
// 16-byte aligned is read with 16-byte loads, any other (a wrapping window, its partial last
// chunk, an odd N) element by element.
template <typename T>
struct XChunk {
  static constexpr int kGroup = 16 / sizeof(T);
  static constexpr int kGroups = kNarrowChunk / kGroup;  // per row, and per thread
  uint4 raw[kGroups];

  __device__ __forceinline__ void load(const T* x, int64_t batch, int n, int s, const Window& window, int64_t row0,
                                       int k0, bool aligned_rows) {
    const int c0 = window.column(k0);
    const bool whole = aligned_rows && k0 + kNarrowChunk <= s && c0 + kNarrowChunk <= n && c0 % kGroup == 0;
#pragma unroll
    for (int i = 0; i < kGroups; ++i) {
      const int group = threadIdx.x + i * kNarrowRows;
      const int64_t row = row0 + group / kGroups;
      const int k = (group % kGroups) * kGroup;
      if (whole) {
        raw[i] = row < batch ? *reinterpret_cast<const uint4*>(x + row * n + c0 + k) : make_uint4(0, 0, 0, 0);
      } else {
        T* elements = reinterpret_cast<T*>(&raw[i]);
#pragma unroll
        for (int q = 0; q < kGroup; ++q) {
          elements[q] = row < batch && k0 + k + q < s ? x[row * n + window.column(k0 + k + q)] : T(0);
        }
      }
    }
  }

  // Into the fp32 row tile [kNarrowRows][ld]: a warp writes 32 distinct banks per store (ld = 33).
  __device__ __forceinline__ void store(SmemPtr<float> tile, int ld) const {
#pragma unroll
    for (int i = 0; i < kGroups; ++i) {
      const int group = threadIdx.x + i * kNarrowRows;
      const int r = group / kGroups, k = (group % kGroups) * kGroup;
      const T* elements = reinterpret_cast<const T*>(&raw[i]);
#pragma unroll
      for (int q = 0; q < kGroup; ++q) tile[r * ld + k + q] = static_cast<float>(elements[q]);
    }
  }
};

// The dropout sites of h_l's first column as the projection's input and as layer l+1's input
// (has_next: a layer l+1 reads h_l), where the forward draws h_l's masks and launch 1 applies them.
struct OutputSites {
  int64_t projection, next_layer;
  bool has_next;
  __device__ OutputSites(const Dropout& dropout, int layer, int w, int num_layers)
      : projection(dropout.projection_site() + static_cast<int64_t>(layer) * w),
        next_layer(dropout.hidden_site(layer + 1)),
        has_next(layer + 1 < num_layers) {}
};

template <typename T, int W, bool Drops>
__device__ __forceinline__ void narrow_forward_rows(const ForwardArgs<T>& p) {
  using Smem = NarrowSmem<W>;
  extern __shared__ __align__(128) unsigned char smem[];
  const NarrowTiles<W> tiles(smem);
  const SmemPtr<float> x_tile = tiles.rows, a_tile = tiles.a, r_tile = tiles.r, out_tile = tiles.out;
  const SmemPtr<float> bias_tile = tiles.bias, y_row = tiles.y + threadIdx.x * Smem::kYLd;  // y: this row's

  const int t = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kNarrowRows, row = row0 + t;
  const bool valid = row < p.batch;
  const int64_t hidden = static_cast<int64_t>(p.num_layers) * p.w;
  const int w = p.w, m_count = p.out_features;
  constexpr bool drops = Drops;
  const Dropout dropout = kernel_dropout(p, p.dropout_key);  // used where drops

  float h_prev[W];
  for (int m = 0; m < m_count; ++m) y_row[m] = 0.f;
#pragma unroll
  for (int j = 0; j < W; ++j) h_prev[j] = 0.f;

  // The chunks of x and of A_l are loaded one step ahead: the next chunk's loads are in flight
  // while this one is multiplied (software pipelining through registers).
  const bool aligned_rows =
      reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && static_cast<int64_t>(p.n) * sizeof(T) % 16 == 0;
  XChunk<T> chunk;
  constexpr int kAPerThread = (kNarrowChunk * W + kNarrowRows - 1) / kNarrowRows;
  float a_chunk[kAPerThread];  // element i: a_tile entry t + i * kNarrowRows, as (j, k) = divmod(., 32)
  const auto load = [&](int layer, int k0) {
    chunk.load(p.x, p.batch, p.n, p.s, window_of(layer, p.n, p.s), row0, k0, aligned_rows);
    const T* a_l = p.weight_in + static_cast<int64_t>(layer) * w * p.s;
#pragma unroll
    for (int i = 0; i < kAPerThread; ++i) {
      const int idx = t + i * kNarrowRows, j = idx / kNarrowChunk, k = idx % kNarrowChunk;
      const bool in = idx < kNarrowChunk * W && j < w && k0 + k < p.s;
      a_chunk[i] = in ? static_cast<float>(a_l[static_cast<int64_t>(j) * p.s + k0 + k]) : 0.f;
    }
  };
  load(0, 0);

  for (int layer = 0; layer < p.num_layers; ++layer) {
    float acc[W];
#pragma unroll
    for (int j = 0; j < W; ++j) acc[j] = 0.f;

    for (int k0 = 0; k0 < p.s; k0 += kNarrowChunk) {
      __syncthreads();  // the previous chunk's (and layer's) readers of the tiles are done
      chunk.store(x_tile, Smem::kXLd);
#pragma unroll
      for (int i = 0; i < kAPerThread; ++i) {
        const int idx = t + i * kNarrowRows;
        if (idx < kNarrowChunk * W) a_tile[(idx % kNarrowChunk) * W + idx / kNarrowChunk] = a_chunk[i];
      }
      if (k0 == 0) {  // the layer's small operands, read only after the last chunk
        const T* r_l = p.weight_hidden + static_cast<int64_t>(layer - 1) * w * w;  // used when layer >= 1
        for (int idx = t; idx < W * W; idx += kNarrowRows) {
          const int i = idx / W, j = idx % W;
          r_tile[idx] = layer > 0 && i < w && j < w ? static_cast<float>(r_l[i * w + j]) : 0.f;
        }
        for (int idx = t; idx < kNarrowKernelMaxOut * W; idx += kNarrowRows) {
          const int m = idx / W, j = idx % W;
          out_tile[idx] = m < m_count && j < w ? static_cast<float>(p.weight_out[m * hidden + layer * w + j]) : 0.f;
        }
        if (t < W) bias_tile[t] = p.bias && t < w ? static_cast<float>(p.bias[layer * w + t]) : 0.f;
      }
      __syncthreads();
      const bool layer_done = k0 + kNarrowChunk >= p.s;  // next: this layer's next chunk or the next layer's first
      if (!layer_done) {
        load(layer, k0 + kNarrowChunk);
      } else if (layer + 1 < p.num_layers) {
        load(layer + 1, 0);
      }
      const int k_end = min(kNarrowChunk, p.s - k0);
      if constexpr (drops) {  // the thread's window elements times their factors, as it reads them
        const int64_t site = dropout.window_site(layer) + k0;
        for (int k = 0; k < k_end; ++k) {
          const T x = static_cast<T>(x_tile[t * Smem::kXLd + k]);  // exact: the tile holds T values
          const float xv = static_cast<float>(dropped(dropout, x, row, site + k));
#pragma unroll
          for (int j = 0; j < W; ++j) acc[j] = fmaf(a_tile[k * W + j], xv, acc[j]);
        }
      } else {
        for (int k = 0; k < k_end; ++k) {
          const float xv = x_tile[t * Smem::kXLd + k];
#pragma unroll
          for (int j = 0; j < W; ++j) acc[j] = fmaf(a_tile[k * W + j], xv, acc[j]);
        }
      }
    }

    // Epilogue: the tiles it reads stay until the next layer's first barrier.
    float h[W];
#pragma unroll
    for (int i = 0; i < W; ++i) {
      float z = acc[i];
#pragma unroll
      for (int j = 0; j < W; ++j) z = fmaf(r_tile[i * W + j], h_prev[j], z);
      z += bias_tile[i];
      const T z_stored = static_cast<T>(z);
      const T h_stored = static_cast<T>(activate(p.act, static_cast<float>(z_stored), p.slope));
      h[i] = i < w ? static_cast<float>(h_stored) : 0.f;
      if (valid && i < w) {
        const int64_t offset = row * hidden + static_cast<int64_t>(layer) * w + i;
        if (p.pre_activation != nullptr) p.pre_activation[offset] = z_stored;  // null: Z not kept
        if (m_count == 0) p.out[offset] = h_stored;
      }
    }
    float h_in[W];  // h_l as the projection reads it
#pragma unroll
    for (int j = 0; j < W; ++j) h_in[j] = h[j];
    if constexpr (drops) {  // H's factors for the projection, h_l's as layer l+1's input for the recurrence
      const OutputSites sites(dropout, layer, w, p.num_layers);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        if (j >= w) continue;
        const T v = static_cast<T>(h[j]);
        if (m_count > 0) h_in[j] = static_cast<float>(dropped(dropout, v, row, sites.projection + j));
        if (sites.has_next) h[j] = static_cast<float>(dropped(dropout, v, row, sites.next_layer + j));
      }
    }
    for (int m = 0; m < m_count; ++m) {
      float y = y_row[m];
#pragma unroll
      for (int j = 0; j < W; ++j) y = fmaf(out_tile[m * W + j], h_in[j], y);
      y_row[m] = y;
    }
#pragma unroll
    for (int j = 0; j < W; ++j) h_prev[j] = h[j];
  }
  if (m_count == 0 || !valid) return;
  for (int m = 0; m < m_count; ++m) {
    const float bias_out = p.bias_out ? static_cast<float>(p.bias_out[m]) : 0.f;
    p.out[row * m_count + m] = static_cast<T>(y_row[m] + bias_out);
  }
}

// Drops: compiled with the dropout stage or without it, as the tiled kernels.
template <typename T, int W, bool Drops>
__global__ void __launch_bounds__(kNarrowRows, kNarrowForwardMinBlocksPerSm)
    spinal_narrow_forward_kernel(const ForwardArgs<T> p) {
  if constexpr (kRunsOnThisArch<void, T>) {
    narrow_forward_rows<T, W, Drops>(p);
  } else {
    unsupported_arch();
  }
}

template <typename T, int W, bool Drops>
__device__ __forceinline__ void narrow_data_grad_rows(const DataGradArgs<T>& p) {
  using Smem = NarrowSmem<W>;
  extern __shared__ __align__(128) unsigned char smem[];
  const NarrowTiles<W> tiles(smem);
  const SmemPtr<float> dx_tile = tiles.rows, a_tile = tiles.a, r_tile = tiles.r, out_tile = tiles.out;

  zero_split_k_counters(p);

  const int t = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kNarrowRows, row = row0 + t;
  const bool valid = row < p.batch;
  const int64_t hidden = static_cast<int64_t>(p.num_layers) * p.w;
  const int w = p.w, m_count = p.out_features;
  constexpr bool drops = Drops;
  const Dropout dropout = kernel_dropout(p, p.dropout_key);  // used where drops

  float g[kNarrowKernelMaxOut];
#pragma unroll
  for (int m = 0; m < kNarrowKernelMaxOut; ++m) {
    g[m] = valid && m < m_count ? static_cast<float>(p.grad_out[row * m_count + m]) : 0.f;
  }
  float dz_next[W];
#pragma unroll
  for (int j = 0; j < W; ++j) dz_next[j] = 0.f;

  for (int layer = p.num_layers - 1; layer >= 0; --layer) {
    __syncthreads();  // the previous layer's readers of the tiles are done
    const T* r_next = p.weight_hidden + static_cast<int64_t>(layer) * w * w;  // R_{layer+1}
    for (int idx = t; idx < W * W; idx += kNarrowRows) {
      const int i = idx / W, j = idx % W;
      r_tile[idx] = layer + 1 < p.num_layers && i < w && j < w ? static_cast<float>(r_next[i * w + j]) : 0.f;
    }
    for (int idx = t; idx < kNarrowKernelMaxOut * W; idx += kNarrowRows) {
      const int m = idx / W, j = idx % W;
      out_tile[idx] = m < m_count && j < w ? static_cast<float>(p.weight_out[m * hidden + layer * w + j]) : 0.f;
    }
    __syncthreads();
    float dh[W];
#pragma unroll
    for (int j = 0; j < W; ++j) dh[j] = 0.f;
#pragma unroll
    for (int m = 0; m < kNarrowKernelMaxOut; ++m) {
      if (m < m_count) {
#pragma unroll
        for (int j = 0; j < W; ++j) dh[j] = fmaf(g[m], out_tile[m * W + j], dh[j]);
      }
    }
    if constexpr (drops) {
      // dH_l times H's factors plus dz_{l+1} R_{l+1} times those of h_l as layer l+1's input.
      float dh_next[W];
#pragma unroll
      for (int j = 0; j < W; ++j) dh_next[j] = 0.f;
#pragma unroll
      for (int i = 0; i < W; ++i) {
#pragma unroll
        for (int j = 0; j < W; ++j) dh_next[j] = fmaf(dz_next[i], r_tile[i * W + j], dh_next[j]);
      }
      const OutputSites sites(dropout, layer, w, p.num_layers);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        if (j >= w) continue;
        if (m_count > 0) dh[j] *= dropout.factor(row, sites.projection + j);
        if (sites.has_next) dh[j] = fmaf(dh_next[j], dropout.factor(row, sites.next_layer + j), dh[j]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < W; ++i) {
#pragma unroll
        for (int j = 0; j < W; ++j) dh[j] = fmaf(dz_next[i], r_tile[i * W + j], dh[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < W; ++j) {
      dz_next[j] = 0.f;
      if (valid && j < w) {
        const int64_t offset = row * hidden + static_cast<int64_t>(layer) * w + j;
        const float dh_j = m_count == 0 ? dh[j] + static_cast<float>(p.grad_out[offset]) : dh[j];
        const float z = static_cast<float>(p.pre_activation[offset]);
        const T dz = static_cast<T>(dh_j * activate_grad(p.act, z, p.slope));
        p.grad_pre[offset] = dz;
        dz_next[j] = static_cast<float>(dz);
      }
    }
  }

  for (int c0 = 0; c0 < p.n; c0 += kNarrowChunk) {
    const int c_end = min(c0 + kNarrowChunk, p.n);
    float dx[kNarrowChunk];
#pragma unroll
    for (int k = 0; k < kNarrowChunk; ++k) dx[k] = 0.f;
    for (int layer = 0; layer < p.num_layers; ++layer) {
      const Window window = window_of(layer, p.n, p.s);
      if (!window.intersects(c0, c_end)) continue;
      const T* a_l = p.weight_in + static_cast<int64_t>(layer) * w * p.s;
      __syncthreads();  // the previous readers of a_tile are done
      for (int idx = t; idx < W * kNarrowChunk; idx += kNarrowRows) {
        const int j = idx / kNarrowChunk, k = idx % kNarrowChunk;
        const int position = c0 + k < c_end ? window.position(c0 + k) : -1;
        a_tile[idx] = j < w && position >= 0 ? static_cast<float>(a_l[static_cast<int64_t>(j) * p.s + position]) : 0.f;
      }
      __syncthreads();
      float dz[W];  // this thread's own dZ row, written above
#pragma unroll
      for (int j = 0; j < W; ++j) {
        dz[j] = valid && j < w ? static_cast<float>(p.grad_pre[row * hidden + static_cast<int64_t>(layer) * w + j])
                               : 0.f;
      }
      if constexpr (drops) {  // each column's sum over j times the factor of its window site
        const int64_t site = dropout.window_site(layer);
#pragma unroll
        for (int k = 0; k < kNarrowChunk; ++k) {
          const int position = c0 + k < c_end ? window.position(c0 + k) : -1;
          if (position < 0) continue;  // a_tile's column is zero there
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < W; ++j) sum = fmaf(dz[j], a_tile[j * kNarrowChunk + k], sum);
          dx[k] = fmaf(sum, dropout.factor(row, site + position), dx[k]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < W; ++j) {
#pragma unroll
          for (int k = 0; k < kNarrowChunk; ++k) dx[k] = fmaf(dz[j], a_tile[j * kNarrowChunk + k], dx[k]);
        }
      }
    }
    __syncthreads();  // the previous chunk's stores from dx_tile are done
#pragma unroll
    for (int k = 0; k < kNarrowChunk; ++k) dx_tile[t * Smem::kXLd + k] = dx[k];
    __syncthreads();
    for (int idx = t; idx < kNarrowRows * kNarrowChunk; idx += kNarrowRows) {
      const int r = idx / kNarrowChunk, k = idx % kNarrowChunk;
      if (row0 + r < p.batch && c0 + k < c_end) {
        p.grad_x[(row0 + r) * p.n + c0 + k] = static_cast<T>(dx_tile[r * Smem::kXLd + k]);
      }
    }
  }
}

template <typename T, int W, bool Drops>
__global__ void __launch_bounds__(kNarrowRows, kNarrowDataGradMinBlocksPerSm)
    spinal_narrow_data_grad_kernel(const DataGradArgs<T> p) {
  if constexpr (kRunsOnThisArch<void, T>) {
    narrow_data_grad_rows<T, W, Drops>(p);
  } else {
    unsupported_arch();
  }
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

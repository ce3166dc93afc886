// Kernels for narrow layers (w <= kNarrowMaxWidth, M <= kNarrowMaxOut), one thread per row:
//   spinal_narrow_forward_kernel    in place of the tiled forward kernel (forward_kernel.cuh);
//   spinal_narrow_data_grad_kernel  in place of backward launch 1 (backward_kernels.cuh); launch 2
//                                   (the weight gradients) follows it unchanged.
// Each computes the same function and writes the same outputs as the kernel it replaces (out and
// Z; dZ, dx and the zeroed split-K counters), so the two kinds combine freely.
//
// Why: the tiled kernels' tensor-core tiles are 128 columns wide; at w = 8 they multiply 94 %
// zeros, and one 64-row CTA walks the whole chain behind two barriers per 32-column K-chunk. The
// chain's arithmetic per row is tiny (w*(s+w) + M*w multiply-adds per layer), so here one thread
// owns one row and keeps its z_l, h_{l-1} (dz_{l+1}) and y (g) in registers.
//
// Tiling and launch scheme (both kernels)
//   grid  = ceil(B / kNarrowRows) CTAs; block = kNarrowRows = 128 threads, thread t <-> row
//   row0 + t; dynamic smem NarrowSmem (~22 KB: several CTAs per SM). Register arrays are indexed
//   by unrolled loops only (W, kNarrowChunk, kNarrowMaxOut are compile-time), so they stay in
//   registers; the cap of 128 registers (4 CTAs per SM) costs the forward 12-32 bytes of spills
//   (ptxas, sm_90).
//   Operands every thread reads alike (weights) are staged in smem and read at one address by the
//   whole CTA (a broadcast); row data goes through a [128][33] fp32 tile, written or read by one
//   warp per row (coalesced global access) and read or written by thread t in its own row (the
//   odd row stride makes that conflict-free).
// Forward, per layer l:
//   for each kNarrowChunk = 32-column chunk of the window (K = s): stage x[rows, chunk] and A_l's
//   chunk transposed [32][W]; acc[j] += A_l[j, k] x[t, k];
//   the layer's first chunk also stages R_l [W][W], b_l and W_out's layer columns [16][W]
//   (zero-padded past w and M);
//   z = acc + R_l h_{l-1} + b_l -> Z (rounded to T once; not written when the op keeps no Z, whose
//   pointer is then null), h_l = T(phi(float(Z))) (as the tiled
//   kernel: the backward's recomputation of h is bit-identical); y[m] += W_out[m, l*w + j] h_l[j],
//   or, without projection, h_l -> out = H.
// Data gradients:
//   recurrence, l = L-1 .. 0: stage W_out's layer columns and R_{l+1};
//     dz_l = (g W_out[:, l*w:(l+1)*w] + dz_{l+1} R_{l+1}) * phi'(Z_l) -> dZ (rounded to T; the
//     rounded value feeds dz_{l-1}, as in the tiled kernel);
//   dx, per 32-column chunk of x: for each layer whose window meets the chunk, stage A_l's
//     columns there [W][32] (zero where the window does not read) and add dz_l A_l (dz_l read
//     back from this thread's own dZ row); the chunk leaves through the row tile: every column of
//     dx written once, no zero fill, no atomics.
// Numerics: fp32 accumulation throughout, no TF32 (float32 calls are exact whatever allow_tf32).
// Offsets into x, Z, dZ, dx and out are 64-bit.
#pragma once

#include <type_traits>

#include "backward_kernels.cuh"
#include "forward_kernel.cuh"

namespace spinal_ops {
namespace cuda_kernels {

constexpr int kNarrowRows = 128;  // rows per CTA = threads per CTA
constexpr int kNarrowChunk = 32;  // window columns staged per step
constexpr int kNarrowMaxWidth = 16;
constexpr int kNarrowMaxOut = 16;  // y (forward) or g (backward) values per thread
// CTAs per SM the register budget is capped for (65536 / (128 * 4) = 128 registers per thread):
// more warps in flight to hide the staging loads' latency.
constexpr int kNarrowMinBlocksPerSm = 4;

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
  static constexpr int kOut = kR + W * W;             // [kNarrowMaxOut][W]
  static constexpr int kBias = kOut + kNarrowMaxOut * W;
  static constexpr int64_t kBytes = static_cast<int64_t>(kBias + W) * sizeof(float);
};

template <typename T, int W>
__global__ void __launch_bounds__(kNarrowRows, kNarrowMinBlocksPerSm)
    spinal_narrow_forward_kernel(const ForwardArgs<T> p) {
  using Smem = NarrowSmem<W>;
  extern __shared__ __align__(128) unsigned char smem[];
  const SmemPtr<float> base = reinterpret_cast<float*>(smem);
  const SmemPtr<float> x_tile = base + Smem::kX, a_tile = base + Smem::kA, r_tile = base + Smem::kR;
  const SmemPtr<float> out_tile = base + Smem::kOut, bias_tile = base + Smem::kBias;

  const int t = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kNarrowRows, row = row0 + t;
  const bool valid = row < p.batch;
  const int64_t hidden = static_cast<int64_t>(p.num_layers) * p.w;
  const int w = p.w, m_count = p.out_features;

  float y[kNarrowMaxOut];
  float h_prev[W];
#pragma unroll
  for (int m = 0; m < kNarrowMaxOut; ++m) y[m] = 0.f;
#pragma unroll
  for (int j = 0; j < W; ++j) h_prev[j] = 0.f;

  for (int layer = 0; layer < p.num_layers; ++layer) {
    const Window window = window_of(layer, p.n, p.s);
    const T* a_l = p.weight_in + static_cast<int64_t>(layer) * w * p.s;
    float acc[W];
#pragma unroll
    for (int j = 0; j < W; ++j) acc[j] = 0.f;

    for (int k0 = 0; k0 < p.s; k0 += kNarrowChunk) {
      __syncthreads();  // the previous chunk's (and layer's) readers of the tiles are done
      for (int idx = t; idx < kNarrowRows * kNarrowChunk; idx += kNarrowRows) {
        const int r = idx / kNarrowChunk, k = idx % kNarrowChunk;
        const bool in = row0 + r < p.batch && k0 + k < p.s;
        x_tile[r * Smem::kXLd + k] = in ? static_cast<float>(p.x[(row0 + r) * p.n + window.column(k0 + k)]) : 0.f;
      }
      for (int idx = t; idx < kNarrowChunk * W; idx += kNarrowRows) {
        const int j = idx / kNarrowChunk, k = idx % kNarrowChunk;
        const bool in = j < w && k0 + k < p.s;
        a_tile[k * W + j] = in ? static_cast<float>(a_l[static_cast<int64_t>(j) * p.s + k0 + k]) : 0.f;
      }
      if (k0 == 0) {  // the layer's small operands, read only after the last chunk
        const T* r_l = p.weight_hidden + static_cast<int64_t>(layer - 1) * w * w;  // used when layer >= 1
        for (int idx = t; idx < W * W; idx += kNarrowRows) {
          const int i = idx / W, j = idx % W;
          r_tile[idx] = layer > 0 && i < w && j < w ? static_cast<float>(r_l[i * w + j]) : 0.f;
        }
        for (int idx = t; idx < kNarrowMaxOut * W; idx += kNarrowRows) {
          const int m = idx / W, j = idx % W;
          out_tile[idx] = m < m_count && j < w ? static_cast<float>(p.weight_out[m * hidden + layer * w + j]) : 0.f;
        }
        if (t < W) bias_tile[t] = p.bias && t < w ? static_cast<float>(p.bias[layer * w + t]) : 0.f;
      }
      __syncthreads();
      const int k_end = min(kNarrowChunk, p.s - k0);
      for (int k = 0; k < k_end; ++k) {
        const float xv = x_tile[t * Smem::kXLd + k];
#pragma unroll
        for (int j = 0; j < W; ++j) acc[j] = fmaf(a_tile[k * W + j], xv, acc[j]);
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
#pragma unroll
    for (int m = 0; m < kNarrowMaxOut; ++m) {
      if (m < m_count) {
#pragma unroll
        for (int j = 0; j < W; ++j) y[m] = fmaf(out_tile[m * W + j], h[j], y[m]);
      }
    }
#pragma unroll
    for (int j = 0; j < W; ++j) h_prev[j] = h[j];
  }
  if (m_count == 0 || !valid) return;
#pragma unroll
  for (int m = 0; m < kNarrowMaxOut; ++m) {
    if (m < m_count) {
      const float bias_out = p.bias_out ? static_cast<float>(p.bias_out[m]) : 0.f;
      p.out[row * m_count + m] = static_cast<T>(y[m] + bias_out);
    }
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kNarrowRows, kNarrowMinBlocksPerSm)
    spinal_narrow_data_grad_kernel(const DataGradArgs<T> p) {
  using Smem = NarrowSmem<W>;
  extern __shared__ __align__(128) unsigned char smem[];
  const SmemPtr<float> base = reinterpret_cast<float*>(smem);
  const SmemPtr<float> dx_tile = base + Smem::kX, a_tile = base + Smem::kA, r_tile = base + Smem::kR;
  const SmemPtr<float> out_tile = base + Smem::kOut;

  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kNarrowRows + threadIdx.x; i < p.num_counters;
       i += static_cast<int64_t>(gridDim.x) * kNarrowRows) {
    p.tile_counters[i] = 0;
  }

  const int t = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kNarrowRows, row = row0 + t;
  const bool valid = row < p.batch;
  const int64_t hidden = static_cast<int64_t>(p.num_layers) * p.w;
  const int w = p.w, m_count = p.out_features;

  float g[kNarrowMaxOut];
#pragma unroll
  for (int m = 0; m < kNarrowMaxOut; ++m) {
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
    for (int idx = t; idx < kNarrowMaxOut * W; idx += kNarrowRows) {
      const int m = idx / W, j = idx % W;
      out_tile[idx] = m < m_count && j < w ? static_cast<float>(p.weight_out[m * hidden + layer * w + j]) : 0.f;
    }
    __syncthreads();
    float dh[W];
#pragma unroll
    for (int j = 0; j < W; ++j) dh[j] = 0.f;
#pragma unroll
    for (int m = 0; m < kNarrowMaxOut; ++m) {
      if (m < m_count) {
#pragma unroll
        for (int j = 0; j < W; ++j) dh[j] = fmaf(g[m], out_tile[m * W + j], dh[j]);
      }
    }
#pragma unroll
    for (int i = 0; i < W; ++i) {
#pragma unroll
      for (int j = 0; j < W; ++j) dh[j] = fmaf(dz_next[i], r_tile[i * W + j], dh[j]);
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
#pragma unroll
      for (int j = 0; j < W; ++j) {
#pragma unroll
        for (int k = 0; k < kNarrowChunk; ++k) dx[k] = fmaf(dz[j], a_tile[j * kNarrowChunk + k], dx[k]);
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

}  // namespace cuda_kernels
}  // namespace spinal_ops

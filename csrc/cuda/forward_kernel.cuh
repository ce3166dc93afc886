// Tile forward kernel of the spinal layer (launched by forward.cu): ONE launch computes every
// layer and the output projection.
//
// Tiling and launch scheme
//   grid  = ceil(B / kTileM) CTAs, one per tile of kTileM rows (64 for fp16/bf16 on sm_80+, 32 for
//   fp32 and for fp16 on sm_75; launch.cuh's with_kernel_types picks the policy per device);
//   block = 256 threads (8 warps); dynamic smem (SmemLayout in tile_mma.cuh).
//   For each layer l, for each 128-column chunk of z_l (w <= 256: at most 2 chunks):
//     acc  = x[rows, window_l] * A_l^T   K = s in chunks of 32: the window is read straight
//                                        from x with wrap-around into the staged A operand
//          + h_{l-1} * R_l^T             K = w: A operand is the on-chip state buffer itself
//     z    = acc + b_l  -> Z (global, dtype), h_l = phi(z) -> the other state buffer (dtype)
//   The two state buffers swap roles from layer to layer, so h never leaves the chip.
//   Weights stream through the staged B operand (column-major: rows of W are contiguous).
//   Output projection (when M is given): y = phi(Z) * W_out^T + b_out in 128-column chunks,
//   K = L*w in chunks of 32; phi(Z) is re-read from the Z rows this CTA wrote (visible after
//   __syncthreads()), so no [kTileM x L*w] buffer is needed on chip.
//   Without M, the epilogue writes h_l directly into out = H.
// Dropout (contract §1 "Masks"; the kernel's Drops instance, launched when the call's dropout is active:
//   each kernel is compiled with and without this stage, so a call without dropout runs the same
//   code, registers and bits as before it existed): each dropped operand is multiplied by its factor (0 or 1/(1-p), one
//   Philox4x32-10 word, common/philox.h) where it is staged, scaled in fp32 and rounded once to the
//   dtype, as eager dropout's output: x's window as it fills the staged A operand (one Philox per
//   staged element: per row and layer s words for each 128-column chunk of z, so twice for
//   w > 128); h_l as the epilogue writes it to the state buffer that layer l+1 reads (w words per
//   row and layer, none after the last); phi(Z) as the projection stages it (L*w words per row for
//   each 128-column chunk of y). Z, out and the projection's own inputs are never stored dropped.
// Smem budget (w = 256): bf16/fp16 2*64*264*2 + 64*40*2 + 128*40*2 + 64*132*4 = 117 KB;
//   fp32 2*32*257*4 (SIMT) or 2*32*264*4 (TF32) + 5 KB + 20 KB + 17 KB <= 110 KB. Fits sm80 (163 KB)
//   and sm90 (227 KB); on 99 KB parts (sm86/89/120) use_native_kernels() sends w > 192 (fp16/bf16/TF32)
//   and w > 224 (fp32) to the hoisted chain (csrc/chain/hoisted_chain.h). The launch is launch_kernel() (launch.cuh).
// sm_75 (T4: 64 KB opt-in smem, fp16 tensor cores only): fp16 runs 32-row tiles,
//   2*32*264*2 + 32*40*2 + 128*40*2 + 32*132*4 = 62 KB at w = 256, so every w <= 256 fits; fp32 runs
//   SimtMma (no TF32 before sm_80, whatever allow_tf32 says), w <= 96 (2*32*97*4 + 37 KB = 61 KB);
//   bf16 never launches there (use_native_kernels: the hoisted chain), and the bf16/TF32 kernels
//   and the 64-row fp16 ones are compiled to a trap for sm_75 (kRunsOnThisArch, tile_mma.cuh).
//   ptxas -v, sm_75: SimtMma<32> fp32 128 registers, WmmaMma<32, half> 80 (12 bytes spilled).
//   ptxas -v, sm_90 (CUDA 13.0), without / with dropout: SimtMma<32> 128 / 80 registers, TF32
//   128 / 128, WmmaMma<64, half> 128 / 120, bf16 124 / 128; no spills.
// Numerics: fp32 accumulation; z is rounded to the storage dtype once (that is Z) and
//   h = dtype(phi(float(Z))), so backward's recomputation of h from Z is bit-identical.
// Offsets into x, Z and out are 64-bit (B * N may pass 2^31).
#pragma once

#include "kernels.h"
#include "tile_mma.cuh"

namespace spinal_ops {
namespace cuda_kernels {

template <typename T>
struct ForwardArgs : ChainDims {
  const T* x;
  const T* weight_in;
  const T* weight_hidden;
  const T* bias;  // nullable
  const T* weight_out;
  const T* bias_out;  // nullable
  T* out;
  T* pre_activation;
  DropoutKey dropout_key;  // last (tile_mma.cuh)
};

// Kernel arguments from the op's (contiguous, checked) tensors.
template <typename T>
ForwardArgs<T> make_forward_args(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
                                 const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& weight_out,
                                 const std::optional<at::Tensor>& bias_out, Activation act, float slope,
                                 const at::Tensor& out, const at::Tensor& pre_activation, const Dropout& dropout) {
  ForwardArgs<T> p{};
  static_cast<ChainDims&>(p) = chain_dims(shape, act, slope);
  p.x = x.data_ptr<T>();
  p.weight_in = weight_in.data_ptr<T>();
  p.weight_hidden = weight_hidden.data_ptr<T>();
  p.bias = optional_data<T>(bias);
  p.weight_out = optional_data<T>(weight_out);
  p.bias_out = optional_data<T>(bias_out);
  p.out = out.data_ptr<T>();
  p.pre_activation = pre_activation.numel() > 0 ? pre_activation.data_ptr<T>() : nullptr;
  p.dropout_key = dropout_key(dropout);

  return p;
}

template <class Mma, typename T, bool Drops>
__device__ __forceinline__ void forward_tile(const ForwardArgs<T>& p) {
  constexpr int kM = Mma::kTileM;
  extern __shared__ __align__(128) unsigned char smem[];
  const SmemViews<Mma, T> sm(smem, p.state_width);
  const int ld_state = sm.layout.state_ld;
  const int ld_stage = SmemLayout<Mma, T>::staged_ld(kTileK);  // [rows][kTileK] staged tiles

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kM;
  const int64_t hidden = static_cast<int64_t>(p.num_layers) * p.w;
  const auto row_valid = [&](int m) { return row0 + m < p.batch; };
  constexpr bool drops = Drops;
  const Dropout dropout = kernel_dropout(p, p.dropout_key);  // used where drops

  Mma acc;
  for (int layer = 0; layer < p.num_layers; ++layer) {
    const SmemPtr<const T> h_prev = sm.state((layer + 1) & 1);
    const SmemPtr<T> h_next = sm.state(layer & 1);
    const Window window = window_of(layer, p.n, p.s);
    const T* a_l = p.weight_in + static_cast<int64_t>(layer) * p.w * p.s;
    const T* r_l = p.weight_hidden + static_cast<int64_t>(layer - 1) * p.w * p.w;  // used when layer >= 1
    const int64_t window_site = dropout.window_site(layer);
    // h_l as layer l+1's input: dropped as the epilogue stages it (a dropout site only below the last layer).
    const bool drops_h = drops && layer + 1 < p.num_layers;
    const int64_t next_hidden_site = dropout.hidden_site(layer + 1);

    for (int n0 = 0; n0 < p.w; n0 += kTileN) {
      acc.zero();
      for (int k0 = 0; k0 < p.s; k0 += kTileK) {
        __syncthreads();  // previous users of the staged tiles are done
        fill_tile(sm.a_stage, ld_stage, kM, kTileK, [&](int m, int k) {
          const int j = k0 + k;
          if (!row_valid(m) || j >= p.s) return T(0);
          const T v = p.x[(row0 + m) * p.n + window.column(j)];
          return drops ? dropped(dropout, v, row0 + m, window_site + j) : v;
        });
        fill_tile(sm.b_stage, ld_stage, kTileN, kTileK, [&](int n, int k) {
          return n0 + n < p.w && k0 + k < p.s ? a_l[static_cast<int64_t>(n0 + n) * p.s + k0 + k] : T(0);
        });
        __syncthreads();
        acc.template mma<Layout::Row, Layout::Col>(sm.a_stage, ld_stage, sm.b_stage, ld_stage, kTileK);
      }
      if (layer > 0) {
        for (int k0 = 0; k0 < p.state_width; k0 += kTileK) {
          __syncthreads();
          fill_tile(sm.b_stage, ld_stage, kTileN, kTileK, [&](int n, int k) {
            return n0 + n < p.w && k0 + k < p.w ? r_l[static_cast<int64_t>(n0 + n) * p.w + k0 + k] : T(0);
          });
          __syncthreads();
          acc.template mma<Layout::Row, Layout::Col>(h_prev + k0, ld_state, sm.b_stage, ld_stage, kTileK);
        }
      }
      // No barrier before the store: the K-loop above (s >= 1) starts with one, after which the
      // previous chunk's epilogue is done reading sm.acc_tile.
      acc.store(sm.acc_tile, kAccLd);
      __syncthreads();
      // Epilogue: columns up to state_width are written so that the padding of h stays zero.
      const int cols = min(kTileN, p.state_width - n0);
      for (int idx = threadIdx.x; idx < kM * cols; idx += kThreads) {
        const int m = idx / cols, n = idx - m * cols, c = n0 + n;
        T h = T(0);
        if (c < p.w) {
          const float z = sm.acc_tile[m * kAccLd + n] + (p.bias ? static_cast<float>(p.bias[layer * p.w + c]) : 0.f);
          const T z_stored = static_cast<T>(z);
          h = static_cast<T>(activate(p.act, static_cast<float>(z_stored), p.slope));
          if (row_valid(m)) {
            const int64_t offset = (row0 + m) * hidden + static_cast<int64_t>(layer) * p.w + c;
            p.pre_activation[offset] = z_stored;
            if (p.out_features == 0) p.out[offset] = h;
          }
        }
        h_next[m * ld_state + c] = drops_h && c < p.w ? dropped(dropout, h, row0 + m, next_hidden_site + c) : h;
      }
    }
  }
  if (p.out_features == 0) return;

  // Output projection y = phi(Z) W_out^T + b_out.
  const int hidden_int = static_cast<int>(hidden);
  const int64_t projection_site = dropout.projection_site();
  for (int n0 = 0; n0 < p.out_features; n0 += kTileN) {
    acc.zero();
    for (int k0 = 0; k0 < hidden_int; k0 += kTileK) {
      __syncthreads();  // also orders this CTA's Z stores before the loads below
      fill_tile(sm.a_stage, ld_stage, kM, kTileK, [&](int m, int k) {
        if (!row_valid(m) || k0 + k >= hidden_int) return T(0);
        const float z = static_cast<float>(p.pre_activation[(row0 + m) * hidden + k0 + k]);
        const T h = static_cast<T>(activate(p.act, z, p.slope));
        return drops ? dropped(dropout, h, row0 + m, projection_site + k0 + k) : h;
      });
      fill_tile(sm.b_stage, ld_stage, kTileN, kTileK, [&](int n, int k) {
        return n0 + n < p.out_features && k0 + k < hidden_int
                   ? p.weight_out[static_cast<int64_t>(n0 + n) * hidden + k0 + k]
                   : T(0);
      });
      __syncthreads();
      acc.template mma<Layout::Row, Layout::Col>(sm.a_stage, ld_stage, sm.b_stage, ld_stage, kTileK);
    }
    acc.store(sm.acc_tile, kAccLd);  // as in the layer loop, the K-loop's barriers order it
    __syncthreads();
    for (int idx = threadIdx.x; idx < kM * kTileN; idx += kThreads) {
      const int m = idx / kTileN, n = idx - m * kTileN;
      if (!row_valid(m) || n0 + n >= p.out_features) continue;
      const float y = sm.acc_tile[m * kAccLd + n] + (p.bias_out ? static_cast<float>(p.bias_out[n0 + n]) : 0.f);
      p.out[(row0 + m) * p.out_features + n0 + n] = static_cast<T>(y);
    }
  }
}

// Drops: compiled with the dropout stage (an active dropout) or without it (launch.cuh: with_dropout).
template <class Mma, typename T, bool Drops>
__global__ void __launch_bounds__(kThreads) spinal_forward_kernel(const ForwardArgs<T> p) {
  if constexpr (kRunsOnThisArch<Mma, T>) {
    forward_tile<Mma, T, Drops>(p);
  } else {
    unsupported_arch();
  }
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

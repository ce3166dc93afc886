// The bfloat16 chain's GEMMs on AVX512_BF16 dot products (vdpbf16ps), in place of oneDNN's for
// the products of a spinal layer's size, and its element-wise passes as plain loops.
//
// Why: at batch 64 a bfloat16 training step of the hoisted chain makes ~25 ATen GEMM calls on
// views, and each costs a view, a dispatch and oneDNN's primitive lookup besides its math; these
// kernels read the blocks' pointers as the float32 engine's tile GEMM does (tile_gemm.h).
//
// Tiling: c's columns in panels of up to 4 vectors of 16 floats (64 columns; fewer where c is
// narrower). b's [k, panel] is packed into pairs of rows, [k/2][panel][2] bfloat16 (the operand
// layout of vdpbf16ps: each float lane sums a[i, 2p] b[2p, j] + a[i, 2p+1] b[2p+1, j]), zero past k
// and past c's last column: once per call where several row blocks share it, else (m <= 64: the
// weight gradients, whose k is the batch) by the panel's task one depth chunk at a time, into L1. a is read in place where its rows are contiguous and k is
// even (each pair one 32-bit broadcast), else a block of its rows is packed the same way. A
// register tile is 4 rows by the panel's vectors (at most 16 fp32 accumulators), 8 rows where the
// panel is one or two vectors, and a last vector of at most 8 columns runs as a ymm. A task (up to 64
// rows by one panel, on at::parallel_for) walks the depth in chunks of 128 (64 pairs: 16 KB of
// the panel, read from L1 by each of its tiles); a tile starts from c itself (accumulating), the
// bias row or zero, each widened, carries its sum between chunks in an fp32 partial tile, and
// rounds to bfloat16 once as it stores: one rounding per output, as oneDNN's GEMM rounds.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "../common/activation.h"

namespace spinal_ops::cpu {

// A read-only bfloat16 operand: element (i, k) at data[i * row_stride + k * col_stride].
struct Bf16Operand {
  const c10::BFloat16* data;
  int64_t row_stride;
  int64_t col_stride;
};

// Whether these kernels run here: the CPU has AVX512_BF16 (with AVX-512 BW and VL) and PyTorch's
// own kernels use AVX-512 (ATEN_CPU_CAPABILITY=avx2 or default turns both off).
bool bf16_tile_kernels_run();

// Whether bf16_tile_gemm runs a product of these sizes faster than oneDNN (the rule in
// bf16_tile_gemm.cpp).
bool bf16_tile_gemm_fits(int64_t m, int64_t n, int64_t k);

// What the product does with each output once it is rounded, in the same pass (a recurrence step
// of the chain and its activation in one call). ReLU and leaky ReLU only, with the bit-level
// rules of the chain's bfloat16 activation loops (chain_engine.cpp): NaN passes ReLU, and a NaN z
// scales leaky ReLU's gradient.
struct Bf16Epilogue {
  enum class Kind { kNone, kActivation, kActivationGrad };
  Kind kind = Kind::kNone;
  Activation act = Activation::ReLU;
  float negative_slope = 0.f;
  c10::BFloat16* h = nullptr;         // kActivation: c is stored, and h[i, j] (rows ldh apart) = phi(c[i, j])
  int64_t ldh = 0;                    // (h may be c itself)
  const c10::BFloat16* z = nullptr;   // kActivationGrad: c[i, j] *= phi'(z[i, j]) before it is stored
  int64_t ldz = 0;
};

// c[m, n] = round(start + a[m, k] @ b[k, n]), c's rows ldc apart and its columns contiguous;
// start is c itself (accumulate), else the row `bias` [n] broadcast over the rows, or zero where
// bias is null; then the epilogue. Returns false, having done nothing, where
// bf16_tile_kernels_run() is false.
bool bf16_tile_gemm(int64_t m, int64_t n, int64_t k, Bf16Operand a, Bf16Operand b, c10::BFloat16* c, int64_t ldc,
                    bool accumulate, const c10::BFloat16* bias, const Bf16Epilogue& epilogue = {});

}  // namespace spinal_ops::cpu

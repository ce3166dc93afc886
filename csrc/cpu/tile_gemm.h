// The hoisted chain's float32 GEMMs of moderate size on AVX2 register tiles, in place of BLAS.
//
// Why: at the sizes of a spinal layer's products (vgg5 at batch 64: [64, 128] @ [128, 128], 21 of
// them per training step) MKL spends ~20 % of its time outside its inner kernel, copying both
// operands into packed panels and scaling c by beta first. These products fit the caches as they
// are, so this kernel reads a and b in place: 4 x 24 register tiles (avx2_tiles.h, panel_product)
// run at ~93 % of this core's FMA peak where MKL's whole call runs at ~86 %.
//
// Tiling and launch: c is cut into blocks of kRowBlock rows by 24 columns (one task each, task
// index row-block-major so that a thread's consecutive tasks reuse the block's rows of a from
// L2; at::parallel_for, torch's thread count). A task walks the depth in chunks of kDepthChunk:
// the chunk's [depth, 24] panel of b (read in place when b's rows are contiguous and the panel
// is whole; else packed, transposed from b's columns) stays in L1 while every tile of 4 rows of
// the block reads it; a's elements are broadcast from wherever its strides put them, so a
// transposed a (the weight gradients' dz^T) costs nothing extra. Tiles past c's last row or
// column run on a scratch tile. The first chunk starts from the bias row, zero or c itself.
#pragma once

#include <cstdint>

namespace spinal_ops::cpu {

// A read-only matrix operand: element (i, k) at data[i * row_stride + k * col_stride].
struct MatrixOperand {
  const float* data;
  int64_t row_stride;
  int64_t col_stride;
};

// The instruction set tile_gemm's tiles use here ("AVX-512" or "AVX2"), or null where it does
// not run (no AVX2+FMA, or PyTorch's own kernels use neither: ATEN_CPU_CAPABILITY).
const char* tile_gemm_instructions();

// Whether tile_gemm runs a product of these sizes faster than PyTorch's BLAS (measured; see the
// rule in tile_gemm.cpp).
bool tile_gemm_fits(int64_t m, int64_t n, int64_t k);

// c[m, n] = start + a[m, k] @ b[k, n], c's rows ldc apart and its columns contiguous; start is c
// itself (accumulate), else the row `bias` [n] broadcast over the rows, or zero where bias is
// null. Returns false, having done nothing, where tile_gemm_instructions() is null or neither b's
// rows nor its columns are contiguous.
bool tile_gemm(int64_t m, int64_t n, int64_t k, MatrixOperand a, MatrixOperand b, float* c, int64_t ldc,
               bool accumulate, const float* bias);

}  // namespace spinal_ops::cpu

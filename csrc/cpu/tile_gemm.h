// The hoisted chain's float32 GEMMs of moderate size on register tiles, in place of BLAS.
//
// Why: at the sizes of a spinal layer's products (vgg5 at batch 64: [64, 128] @ [128, 128], 21 of
// them per training step) MKL spends ~20 % of its time outside its inner kernel, copying both
// operands into packed panels and scaling c by beta first. These products fit the caches as they
// are, so this kernel reads a and b in place: on an AMD Zen 4 core (1 thread) the chain's products
// run at ~104 GFLOP/s, ~91 % of its FMA peak, where MKL's whole calls run at ~91 (`python
// benchmarks/tile_gemm_vs_blas.py --preset vgg5 --batch 64`).
//
// Tiling: register tiles of 4 rows of c by 2 or 3 vectors (AVX-512 where PyTorch's own kernels
// use it: 32 or 48 columns; AVX2: 16 or 24, avx2_tiles.h's panel_product), with c's columns cut
// into panels of 3 vectors, the last ones of 2. A tile sums a chunk of kDepthChunk (128) of the
// depth from zero in registers, one broadcast of a per row and one load of b per vector for every
// k, and adds c once at the end (the first chunk starts from the bias row or zero instead): a long
// product rounds like BLAS's blocked sums. a's elements are broadcast from wherever its strides
// put them, so a transposed a (the weight gradients' dz^T) costs nothing extra. b's [depth, panel]
// chunk is read in place when its rows are contiguous, whole and at most 1 KB apart; else it is
// packed (transposed from b's columns for the forward's W^T). Tiles past c's last row or column
// run on a scratch tile. A product of at most 4 rows against W^T skips the tiles: each element of
// c is a dot product of a's row and W's row, both read in place (a GEMV's access pattern).
//
// Launch: one task per block of rows (128, halved down to 16 while there are fewer than two tasks
// per thread) by one panel, task index row-block-major so that a thread's consecutive tasks reuse
// the block's rows of a from L2; at::parallel_for on torch's thread count. A task walks the depth
// chunks outermost: each chunk's panel of b stays in L1 while every tile of the block reads it.
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

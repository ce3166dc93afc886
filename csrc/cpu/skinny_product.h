// The hoisted chain's output projection y = b_out + H @ W_out^T on AVX2, for the few output
// columns a classifier head has (M <= kSkinnyMaxColumns).
//
// Why: BLAS runs a product with 10 output columns far below its speed (MKL, 1 thread, [64, 512] @
// [512, 10]: 29 GFLOP/s where [64, 128] @ [128, 128] runs at 91): ~11 % of vgg5's inference
// forward at batch 64 (`spinal-bench --preset vgg5 --batch 64 --mode infer --backends cpu
// --threads 1` against a build with kSkinnyMaxColumns = 0).
//
// Scheme: W_out^T is packed once per call as [k, 16] (columns past M zero), then every tile of
// kTileRows rows is one register-tiled panel product (avx2_tiles.h: 4 rows x 1 or 2 vectors of
// accumulators for the whole reduction) into a [4, 16] scratch, whose first M columns are added to
// the bias and stored. A tile's rows past the end read the last row and are not
// written. Launch: at::parallel_for over tiles, 16 tiles per task at least.
#pragma once

#include <cstdint>

namespace spinal_ops::cpu {

constexpr int64_t kSkinnyMaxColumns = 16;

// c[i, j] = bias[j] + sum_k a[i * lda + k] * b[j * ldb + k] for i < rows, j < n (no bias term where
// bias is null). Returns false, having done nothing, where the CPU lacks AVX2+FMA or n is not in
// [1, kSkinnyMaxColumns].
bool skinny_product(const float* a, int64_t lda, int64_t rows, int64_t depth, const float* b, int64_t ldb, int64_t n,
                    const float* bias, float* c, int64_t ldc);

}  // namespace spinal_ops::cpu

// The CPU's engine for the hoisted chain (csrc/chain/gemm_engine.h): the one entry point through
// which the chain reaches the CPU GEMM kernels.
//
//   * GEMMs on float32/float64 blocks call PyTorch's BLAS on the blocks' pointers (blas.h), no
//     view made; float32 products of few output columns by a transposed weight (the output
//     projection) run on the few-column kernel (skinny_product.h), and float32 products small
//     enough that BLAS's packing costs more than it saves on the register-tiled kernel
//     (tile_gemm.h). Where none applies (a PyTorch without the BLAS symbols,
//     SPINAL_OPS_DIRECT_BLAS=0, strides BLAS cannot take) the chain runs ATen's GEMM on views.
//   * ReLU, leaky ReLU and identity (and their gradients) run as plain loops over the blocks.
//   * Layers of w <= kNarrowRecurrenceMaxWidth run their recurrence as one loop over the rows
//     (narrow_recurrence.h).
//   * Row blocks and layer grouping sized for caches and BLAS (chain_engine.cpp).
#pragma once

#include <ATen/ATen.h>

#include "../chain/gemm_engine.h"

namespace spinal_ops::cpu {

// The engine the CPU op passes to the hoisted chain for tensors of this compute dtype (float32
// or float64: the CPU engine; anything else: ATen's).
const chain::GemmEngine& chain_engine(at::ScalarType dtype);

// Whether bfloat16 calls of the hoisted chain run on their bfloat16 tensors (csrc/cpu/dtypes.h,
// runs_bfloat16_chain): the CPU multiplies bfloat16 natively (AVX512_BF16; AMX-BF16 CPUs have it
// too), PyTorch has oneDNN, and SPINAL_OPS_CPU_BF16_GEMM is not 0. Elsewhere bfloat16 is widened
// to float32 and runs this engine.
bool native_bf16_gemm();

// The engine for the hoisted chain on bfloat16 tensors (runs_bfloat16_chain): products of up to
// 2^24 multiply-adds on the AVX512_BF16 register tiles (bf16_tile_gemm.h) where PyTorch's kernels
// use AVX-512, larger ones (and all elsewhere) ATen's GEMM on views (oneDNN's bfloat16 kernels);
// ReLU, leaky ReLU and identity as the CPU engine's loops, other activations ATen's; layers
// grouped by window up to w = 255.
const chain::GemmEngine& bf16_chain_engine();

}  // namespace spinal_ops::cpu

// Direct calls of the BLAS that PyTorch itself runs on a CPU (MKL in the x86-64 wheels), for the
// hoisted chain's GEMMs on CPU tensors (csrc/chain/hoisted_chain.cpp), through chain_engine.h.
//
// Why: an ATen GEMM on a block of a tensor needs a view of each operand, and at small batch the
// views cost as much as the math (vgg5, w = 128, batch 64: ~50 views per forward, ~15 % of its
// time). Called on pointers, the same BLAS routine does the same arithmetic without them.
//
// The routines are looked up in libtorch_cpu (its Fortran sgemm_/dgemm_) at first use, so they
// are PyTorch's BLAS with PyTorch's thread count, never another library's of the same name.
// Where a build of PyTorch does not export them, or a dimension does not fit the BLAS's 32-bit
// integers, direct_gemm returns false and the caller runs the ATen GEMM instead; likewise
// everywhere when the environment sets SPINAL_OPS_DIRECT_BLAS=0 before the first call.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace spinal_ops::cpu {

// Whether direct_gemm can run GEMMs of this dtype here.
bool has_direct_gemm(c10::ScalarType dtype);

// Row-major c[m, n] = alpha * op(a)[m, k] @ op(b)[k, n] + beta * c, where op(a) is a (rows lda
// apart) or, with a_transposed, a^T of a row-major [k, m] a; likewise b. c's rows are ldc apart.
// Returns false, having done nothing, where has_direct_gemm is false or a size exceeds 2^31 - 1.
template <typename T>
bool direct_gemm(bool a_transposed, bool b_transposed, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

}  // namespace spinal_ops::cpu

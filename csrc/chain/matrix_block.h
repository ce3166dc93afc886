// A 2-D block of a tensor's memory, described by offset, sizes and strides without making a view,
// and the chain's GEMMs and activations on such blocks (hoisted_chain.cpp).
//
// Why: every ATen call on a slice of a tensor needs a view of it, and each view is a TensorImpl
// made through the dispatcher; at small batch the chain's views cost as much as its math (vgg5,
// w = 128, batch 64: ~50 views per forward, ~15 % of its time). A device's engine (gemm_engine.h) can run a block's
// product or activation on its pointers without a view; where it does not take the call, the
// block becomes a view for ATen's call. The figure: `spinal-bench --preset vgg5 --batch 64
// --backends cpu --threads 1` with SPINAL_OPS_DIRECT_BLAS=0 (every block a view) against without.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../common/activation.h"

namespace spinal_ops::chain {

struct GemmEngine;  // gemm_engine.h

struct Block {
  const at::Tensor* base = nullptr;  // whose memory this is; outlives the block
  int64_t offset = 0;                // elements past base's first element
  int64_t rows = 0, cols = 0;
  int64_t row_stride = 0, col_stride = 0;

  // A 2-D tensor as a whole.
  static Block of(const at::Tensor& t) { return {&t, 0, t.size(0), t.size(1), t.stride(0), t.stride(1)}; }
  // Matrix `index` of a 3-D tensor.
  static Block matrix(const at::Tensor& t, int64_t index) {
    return {&t, index * t.stride(0), t.size(1), t.size(2), t.stride(1), t.stride(2)};
  }
  // A 1-D tensor as one row.
  static Block row(const at::Tensor& t) { return {&t, 0, 1, t.size(0), t.size(0) * t.stride(0), t.stride(0)}; }

  Block columns(int64_t first, int64_t count) const {
    return {base, offset + first * col_stride, rows, count, row_stride, col_stride};
  }
  Block row_range(int64_t first, int64_t count) const {
    return {base, offset + first * row_stride, count, cols, row_stride, col_stride};
  }
  Block t() const { return {base, offset, cols, rows, col_stride, row_stride}; }
  // Pointer to the block's first element (base must hold T).
  template <typename T>
  T* data() const {
    return base->data_ptr<T>() + offset;
  }
  // The ATen view of the block.
  at::Tensor view() const {
    return base->as_strided({rows, cols}, {row_stride, col_stride}, base->storage_offset() + offset);
  }
};

// c = start + a @ b, where start is c itself (accumulate) or, for the first product of a sum, the
// bias row broadcast over c's rows (zero without a bias): a sum is built in place without a
// zero-fill pass. On the engine's kernel where it takes the call, else at::mm_out / addmm_out.
void block_gemm(const GemmEngine& engine, const Block& c, bool accumulate, const std::optional<Block>& bias,
                const Block& a, const Block& b);

// h = phi(z) (h may be z itself), as chain::apply_activation computes it.
void block_activation(const GemmEngine& engine, const Block& h, const Block& z, Activation act,
                      double negative_slope);

// out = a * b, or out += a * b (accumulate), element-wise (out may be a itself; b may be of
// another floating dtype, e.g. float32 dropout factors of a bfloat16 a: computed in float32 and
// rounded once as stored). On the engine's loop where it takes the call, else at::mul_out / addcmul_.
void block_multiply(const GemmEngine& engine, const Block& out, bool accumulate, const Block& a, const Block& b);

// dz *= phi'(z) in place, as chain::multiply_by_activation_grad computes it (h = phi(z)).
void block_activation_grad(const GemmEngine& engine, const Block& dz, const Block& z, const Block& h, Activation act,
                           double negative_slope);

// z += a @ b, then h = phi(z) (h may be z itself; keep_z: z must hold the pre-activation on return):
// the engine's one call where it takes it (GemmEngine::gemm_activation), else block_gemm and
// block_activation.
void block_gemm_activation(const GemmEngine& engine, const Block& h, const Block& z, bool keep_z, const Block& a,
                           const Block& b, Activation act, double negative_slope);

// dz = (dz + a @ b) * phi'(z) in place (h = phi(z)): the engine's one call where it takes it
// (GemmEngine::gemm_activation_grad), else block_gemm and block_activation_grad.
void block_gemm_activation_grad(const GemmEngine& engine, const Block& dz, const Block& z, const Block& h,
                                const Block& a, const Block& b, Activation act, double negative_slope);

}  // namespace spinal_ops::chain

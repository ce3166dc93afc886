// GEMMs and activations on blocks (see matrix_block.h): the engine's kernel where it takes the
// call, else ATen's on views of the blocks.
#include "matrix_block.h"

#include "gemm_engine.h"
#include "hoisted_chain.h"

namespace spinal_ops::chain {
namespace {

// The ATen GEMM on views: what every device and dtype can run.
void aten_gemm(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a, const Block& b) {
  at::Tensor out = c.view();
  const at::Tensor left = a.view(), right = b.view();
  if (accumulate) {
    out.addmm_(left, right);
  } else if (bias) {
    at::addmm_out(out, bias->view(), left, right);  // [1, n]: broadcast over the rows
  } else {
    at::mm_out(out, left, right);
  }
}

}  // namespace

void block_gemm(const GemmEngine& engine, const Block& c, bool accumulate, const std::optional<Block>& bias,
                const Block& a, const Block& b) {
  if (engine.gemm != nullptr && engine.gemm(c, accumulate, bias, a, b)) return;
  aten_gemm(c, accumulate, bias, a, b);
}

void block_activation(const GemmEngine& engine, const Block& h, const Block& z, Activation act,
                      double negative_slope) {
  if (engine.activation != nullptr && engine.activation(h, z, act, negative_slope)) return;
  apply_activation(h.view(), z.view(), act, negative_slope);
}

void block_multiply(const GemmEngine& engine, const Block& out, bool accumulate, const Block& a, const Block& b) {
  if (engine.multiply != nullptr && engine.multiply(out, accumulate, a, b)) return;
  at::Tensor target = out.view();
  if (accumulate) {
    target.addcmul_(a.view(), b.view());
  } else {
    at::mul_out(target, a.view(), b.view());
  }
}

void block_activation_grad(const GemmEngine& engine, const Block& dz, const Block& z, const Block& h, Activation act,
                           double negative_slope) {
  if (act == Activation::Identity) return;
  if (engine.activation_grad != nullptr && engine.activation_grad(dz, z, act, negative_slope)) return;
  multiply_by_activation_grad(dz.view(), z.view(), h.base ? h.view() : at::Tensor(), act, negative_slope);
}

void block_gemm_activation(const GemmEngine& engine, const Block& h, const Block& z, bool keep_z, const Block& a,
                           const Block& b, Activation act, double negative_slope) {
  if (engine.gemm_activation != nullptr && engine.gemm_activation(h, z, keep_z, a, b, act, negative_slope)) return;
  block_gemm(engine, z, true, std::nullopt, a, b);
  block_activation(engine, h, z, act, negative_slope);
}

void block_gemm_activation_grad(const GemmEngine& engine, const Block& dz, const Block& z, const Block& h,
                                const Block& a, const Block& b, Activation act, double negative_slope) {
  if (act != Activation::Identity && engine.gemm_activation_grad != nullptr &&
      engine.gemm_activation_grad(dz, z, a, b, act, negative_slope)) {
    return;
  }
  block_gemm(engine, dz, true, std::nullopt, a, b);
  block_activation_grad(engine, dz, z, h, act, negative_slope);
}

}  // namespace spinal_ops::chain

// CPU kernel of spinal_ops::native_backward: narrow float32 layers on an AVX2 CPU run the narrow
// row-tile pass (narrow_chain.h), everything else the hoisted chain's backward
// (csrc/chain/hoisted_chain.h) on the CPU's GEMM engine (chain_engine.h); both compute only the
// gradients output_mask asks for. bfloat16 takes the path its forward took (dtypes.h:
// runs_bfloat16_chain): the hoisted chain on the bfloat16 tensors, or float32 after an upcast. Both
// paths recompute the forward's dropout masks from its seed and p (forward.cpp).
#include <torch/library.h>

#include "../chain/dropout_factors.h"
#include "chain_engine.h"
#include "dtypes.h"
#include "narrow_chain.h"

namespace spinal_ops::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> native_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre_activation, const at::Tensor& weight_in,
    const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out, std::array<bool, 6> output_mask,
    c10::string_view activation, double negative_slope, bool /*allow_tf32: no TF32 on CPU*/,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p) {
  const SpinalShape shape = check_backward_inputs(grad_out, x, pre_activation, weight_in, weight_hidden, weight_out);
  check_cpu_dtype(x);
  const Activation act = parse_activation(activation);
  const Dropout dropout = chain::make_dropout(dropout_seed, dropout_p, shape);
  if (runs_bfloat16_chain(shape, x)) {
    const std::array<at::Tensor, 6> grads = chain::hoisted_backward(
        bf16_chain_engine(), shape, grad_out.contiguous(), x.contiguous(), pre_activation.contiguous(),
        weight_in.contiguous(), weight_hidden.contiguous(), contiguous(weight_out), act, negative_slope, output_mask,
        dropout);
    return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
  }
  const at::Tensor x_compute = to_compute(x);
  const at::Tensor grad_out_c = to_compute(grad_out), pre_activation_c = to_compute(pre_activation);
  const at::Tensor weight_in_c = to_compute(weight_in), weight_hidden_c = to_compute(weight_hidden);
  const auto weight_out_c = to_compute(weight_out);
  const std::array<at::Tensor, 6> grads =
      uses_narrow_chain(shape, x_compute)
          ? narrow_chain_backward(shape, grad_out_c, x_compute, pre_activation_c, weight_in_c, weight_hidden_c,
                                  weight_out_c, act, negative_slope, output_mask, dropout)
          : chain::hoisted_backward(chain_engine(x_compute.scalar_type()), shape, grad_out_c, x_compute,
                                    pre_activation_c, weight_in_c, weight_hidden_c, weight_out_c, act,
                                    negative_slope, output_mask, dropout);
  const auto dtype = x.scalar_type();
  return {to_dtype(grads[0], dtype), to_dtype(grads[1], dtype), to_dtype(grads[2], dtype),
          to_dtype(grads[3], dtype), to_dtype(grads[4], dtype), to_dtype(grads[5], dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(spinal_ops, CPU, m) { m.impl("native_backward", &native_backward_cpu); }

}  // namespace spinal_ops::cpu

// CPU kernel of spinal_ops::native_forward: narrow float32 layers on an AVX2 CPU run the narrow
// row-tile pass (narrow_chain.h); everything else the hoisted chain (csrc/chain/hoisted_chain.h)
// on the CPU's GEMM engine (chain_engine.h).
//
// bfloat16 runs the hoisted chain on the bfloat16 tensors themselves on a CPU that multiplies
// bfloat16 natively (dtypes.h: runs_bfloat16_chain); elsewhere, and on the narrow chain, it is
// upcast to float32 on entry and rounded once on exit. Every ATen call inside is a parallel
// region over torch.get_num_threads() threads.
//
// Dropout (an active dropout_seed and dropout_p, contract §1) runs on the same paths: the CPU
// narrow chain applies the masks in its row tiles (narrow_chain.h), the hoisted chain where it
// reads each dropped input (csrc/chain/hoisted_chain.h; the narrow recurrence in its row loop).
#include <torch/library.h>

#include "../chain/dropout_factors.h"
#include "chain_engine.h"
#include "dtypes.h"
#include "narrow_chain.h"

namespace spinal_ops::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> native_forward_cpu(const at::Tensor& x, const at::Tensor& weight_in,
                                                     const at::Tensor& weight_hidden,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& weight_out,
                                                     const std::optional<at::Tensor>& bias_out,
                                                     c10::string_view activation, double negative_slope,
                                                     bool /*allow_tf32: no TF32 on CPU*/, bool keep_pre_activation,
                                                     const std::optional<at::Tensor>& dropout_seed, double dropout_p) {
  const SpinalShape shape = check_spinal_shape(x, weight_in, weight_hidden, bias, weight_out, bias_out);
  check_cpu_dtype(x);
  const Activation act = parse_activation(activation);
  const Dropout dropout = chain::make_dropout(dropout_seed, dropout_p, shape);
  if (runs_bfloat16_chain(shape, x)) {
    return chain::hoisted_forward(bf16_chain_engine(), shape, x.contiguous(), weight_in.contiguous(),
                                  weight_hidden.contiguous(), contiguous(bias), contiguous(weight_out),
                                  contiguous(bias_out), act, negative_slope, keep_pre_activation, dropout);
  }
  const at::Tensor x_compute = to_compute(x);
  const at::Tensor weight_in_c = to_compute(weight_in), weight_hidden_c = to_compute(weight_hidden);
  const auto bias_c = to_compute(bias), weight_out_c = to_compute(weight_out), bias_out_c = to_compute(bias_out);
  auto [out, pre_activation] =
      uses_narrow_chain(shape, x_compute)
          ? narrow_chain_forward(shape, x_compute, weight_in_c, weight_hidden_c, bias_c, weight_out_c, bias_out_c,
                                 act, negative_slope, keep_pre_activation, dropout)
          : chain::hoisted_forward(chain_engine(x_compute.scalar_type()), shape, x_compute, weight_in_c,
                                   weight_hidden_c, bias_c, weight_out_c, bias_out_c, act, negative_slope,
                                   keep_pre_activation, dropout);
  const auto dtype = x.scalar_type();
  return {to_dtype(out, dtype), to_dtype(pre_activation, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(spinal_ops, CPU, m) { m.impl("native_forward", &native_forward_cpu); }

}  // namespace spinal_ops::cpu

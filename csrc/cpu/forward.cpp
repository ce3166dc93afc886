// CPU kernel of spinal_ops::native_forward: narrow float32 layers on an AVX2 CPU run the narrow
// row-tile pass (narrow_chain.h); everything else the hoisted chain (csrc/aten_chain.h) on BLAS.
//
// bfloat16 is upcast to float32 on entry and rounded once on exit. Every ATen call inside is a
// parallel region over torch.get_num_threads() threads.
#include <torch/library.h>

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
                                                     bool /*allow_tf32: no TF32 on CPU*/, bool keep_pre_activation) {
  const SpinalShape shape = check_spinal_shape(x, weight_in, weight_hidden, bias, weight_out, bias_out);
  check_cpu_dtype(x);
  const Activation act = parse_activation(activation);
  const at::Tensor x_compute = to_compute(x);
  const auto forward = uses_narrow_chain(shape, x_compute) ? &narrow_chain_forward : &chain::hoisted_forward;
  auto [out, pre_activation] =
      forward(shape, x_compute, to_compute(weight_in), to_compute(weight_hidden), to_compute(bias),
              to_compute(weight_out), to_compute(bias_out), act, negative_slope, keep_pre_activation);
  const auto dtype = x.scalar_type();
  return {to_dtype(out, dtype), to_dtype(pre_activation, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(spinal_ops, CPU, m) { m.impl("native_forward", &native_forward_cpu); }

}  // namespace spinal_ops::cpu

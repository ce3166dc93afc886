// CUDA implementations of spinal_ops::native_forward / native_backward (schemas in csrc/ops.cpp).
//
// Checks every argument before anything runs, guards x's device, makes inputs contiguous,
// allocates the outputs and routes the call (use_native_kernels, forward.cu): the tile or narrow
// kernels (forward.cu, backward.cu) when w <= kTileKernelMaxWidth, their shared memory fits the
// device and the device has the dtype's tensor cores (bf16: compute capability 8.0), the hoisted
// ATen chain (csrc/chain/hoisted_chain.h, cuBLAS) otherwise; under SPINAL_OPS_CUDA_PERSISTENT=1
// (use_persistent_kernels) a call without dropout runs the persistent forward and backward launch 1
// at any width instead. An empty batch launches no kernel. The
// hoisted_* ops run that chain directly (the cuda backend's cost model picks them per call). Also
// defines spinal_ops::cuda_tile_kernel_max_width(), cuda_tile_kernel_width_limit(device, dtype,
// allow_tf32) and cuda_native_kernels_refusal(device, dtype) (bf16 before compute capability 8.0),
// the thresholds and reasons Python's CudaBackend.supports() reports, so they live in one place.
// Under SPINAL_OPS_CUDA_LT=1 (read per call) every hoisted chain call runs on the cuBLASLt engine
// (lt_engine.cu) instead of ATen's.
//
// Dropout (an active dropout_seed and dropout_p, contract §1): the tile and narrow kernels apply the
// masks themselves, each factor computed where its operand is staged (forward_kernel.cuh,
// backward_kernels.cuh, narrow_kernels.cuh); calls use_native_kernels refuses take the hoisted
// chain, which applies them too (its factors from csrc/cuda/dropout_factors.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "../chain/cublas_tf32_scope.h"
#include "../chain/dropout_factors.h"
#include "../chain/hoisted_chain.h"
#include "backward_outputs.h"
#include "kernels.h"
#include "lt_engine.h"
#include "narrow_kernels.cuh"
#include "tile_mma.cuh"

namespace spinal_ops {
namespace cuda_kernels {
namespace {

void check_cuda_inputs(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "spinal_ops: the CUDA op needs CUDA tensors, got x on ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "spinal_ops: the CUDA kernels take float32, float16 or bfloat16, got ", dtype);
}

// The hoisted chain's engine for this call: cuBLASLt's with the activations in its epilogues under
// SPINAL_OPS_CUDA_LT=1 (lt_engine.h; the same buffers, so the switch may change between a forward
// and its backward), else ATen's.
const chain::GemmEngine& hoisted_engine() { return lt_engine_requested() ? lt_engine() : chain::aten_engine(); }

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> native_forward_cuda(const at::Tensor& x_in, const at::Tensor& weight_in_in,
                                                      const at::Tensor& weight_hidden_in,
                                                      const std::optional<at::Tensor>& bias_in,
                                                      const std::optional<at::Tensor>& weight_out_in,
                                                      const std::optional<at::Tensor>& bias_out_in,
                                                      c10::string_view activation, double negative_slope,
                                                      bool allow_tf32, bool keep_pre_activation,
                                                      const std::optional<at::Tensor>& dropout_seed, double dropout_p) {
  const SpinalShape shape =
      check_spinal_shape(x_in, weight_in_in, weight_hidden_in, bias_in, weight_out_in, bias_out_in);
  check_cuda_inputs(x_in);
  const Activation act = parse_activation(activation);
  const Dropout dropout = chain::make_dropout(dropout_seed, dropout_p, shape);
  const c10::cuda::CUDAGuard guard(x_in.device());

  const at::Tensor x = x_in.contiguous(), weight_in = weight_in_in.contiguous();
  const at::Tensor weight_hidden = weight_hidden_in.contiguous();
  const auto bias = contiguous(bias_in), weight_out = contiguous(weight_out_in), bias_out = contiguous(bias_out_in);
  // Opt-in: the persistent forward (no dropout stage: those calls take the paths below) at every
  // width, for inference and training; its Z (layer order, the tile forward's) is what the
  // persistent backward launch 1 reads (use_persistent_kernels decides both alike).
  if (shape.batch > 0 && use_persistent_kernels(dropout, x.scalar_type(), allow_tf32, x.get_device())) {
    at::Tensor out = at::empty({shape.batch, shape.output_width()}, x.options());
    at::Tensor pre_activation = at::empty({keep_pre_activation ? shape.batch : 0, shape.hidden()}, x.options());
    launch_persistent_forward(shape, x, weight_in, weight_hidden, bias, weight_out, bias_out, act,
                              static_cast<float>(negative_slope), allow_tf32, out, pre_activation);
    return {out, keep_pre_activation ? pre_activation : at::empty({0}, x.options())};
  }
  // Too wide for this device's tiles, or a dtype its native kernels do not run.
  if (!use_native_kernels(shape, x.scalar_type(), allow_tf32, x.get_device())) {
    const chain::CublasTf32Scope tf32(allow_tf32);
    return chain::hoisted_forward(hoisted_engine(), shape, x, weight_in, weight_hidden, bias, weight_out, bias_out,
                                  act, negative_slope, keep_pre_activation, dropout);
  }
  at::Tensor out = at::empty({shape.batch, shape.output_width()}, x.options());
  // The tiled kernel always writes Z (its projection reads it back): without keep_pre_activation it
  // is scratch, freed on return. The narrow kernel writes Z only when it is kept.
  const bool z_written = keep_pre_activation || !narrow_kernels_fit(shape);
  at::Tensor pre_activation = at::empty({z_written ? shape.batch : 0, shape.hidden()}, x.options());
  if (shape.batch > 0) {
    launch_native_forward(shape, x, weight_in, weight_hidden, bias, weight_out, bias_out, act,
                         static_cast<float>(negative_slope), allow_tf32, out, pre_activation, dropout);
  }
  return {out, keep_pre_activation ? pre_activation : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> native_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& pre_activation_in,
    const at::Tensor& weight_in_in, const at::Tensor& weight_hidden_in, const std::optional<at::Tensor>& weight_out_in,
    std::array<bool, 6> output_mask, c10::string_view activation, double negative_slope, bool allow_tf32,
    const std::optional<at::Tensor>& dropout_seed, double dropout_p) {
  SpinalShape shape =
      check_backward_inputs(grad_out_in, x_in, pre_activation_in, weight_in_in, weight_hidden_in, weight_out_in);
  shape.has_bias = output_mask[chain::kGradBias];
  shape.has_bias_out = weight_out_in.has_value() && output_mask[chain::kGradBiasOut];
  check_cuda_inputs(x_in);
  const Activation act = parse_activation(activation);
  const Dropout dropout = chain::make_dropout(dropout_seed, dropout_p, shape);
  const c10::cuda::CUDAGuard guard(x_in.device());

  const at::Tensor grad_out = grad_out_in.contiguous(), x = x_in.contiguous();
  const at::Tensor pre_activation = pre_activation_in.contiguous(), weight_in = weight_in_in.contiguous();
  const at::Tensor weight_hidden = weight_hidden_in.contiguous();
  const auto weight_out = contiguous(weight_out_in);
  // The persistent launch 1 (launch_native_backward) takes any width; without it, layers wider than
  // the tile kernels take the hoisted chain.
  if (!use_persistent_kernels(dropout, x.scalar_type(), allow_tf32, x.get_device()) &&
      !use_native_kernels(shape, x.scalar_type(), allow_tf32, x.get_device())) {
    const chain::CublasTf32Scope tf32(allow_tf32);
    const auto grads = chain::hoisted_backward(hoisted_engine(), shape, grad_out, x, pre_activation, weight_in,
                                               weight_hidden, weight_out, act, negative_slope, output_mask, dropout);
    return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
  }
  // The tile and narrow kernels compute every gradient in their two launches; the mask only decides which
  // bias gradients exist.
  const BackwardOutputs grads = allocate_backward_outputs(shape, x, weight_in, weight_hidden, weight_out);
  if (shape.batch > 0) {
    launch_native_backward(shape, grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, act,
                          static_cast<float>(negative_slope), allow_tf32, grads, dropout);
  }
  return {grads.grad_x, grads.grad_weight_in, grads.grad_weight_hidden, grads.grad_bias, grads.grad_weight_out,
          grads.grad_bias_out};
}

// The hoisted chain on cuBLAS, chosen per call by the cuda backend's cost model.
std::tuple<at::Tensor, at::Tensor> hoisted_forward_cuda(const at::Tensor& x, const at::Tensor& weight_in,
                                                        const at::Tensor& weight_hidden,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::optional<at::Tensor>& weight_out,
                                                        const std::optional<at::Tensor>& bias_out,
                                                        c10::string_view activation, double negative_slope,
                                                        bool allow_tf32, bool keep_pre_activation,
                                                        const std::optional<at::Tensor>& dropout_seed,
                                                        double dropout_p) {
  const SpinalShape shape = check_spinal_shape(x, weight_in, weight_hidden, bias, weight_out, bias_out);
  check_cuda_inputs(x);
  const Activation act = parse_activation(activation);
  const Dropout dropout = chain::make_dropout(dropout_seed, dropout_p, shape);
  const c10::cuda::CUDAGuard guard(x.device());
  const chain::CublasTf32Scope tf32(allow_tf32);
  return chain::hoisted_forward(hoisted_engine(), shape, x.contiguous(), weight_in.contiguous(),
                                weight_hidden.contiguous(), contiguous(bias), contiguous(weight_out),
                                contiguous(bias_out), act, negative_slope, keep_pre_activation, dropout);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hoisted_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre_activation, const at::Tensor& weight_in,
    const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out, std::array<bool, 6> output_mask,
    c10::string_view activation, double negative_slope, bool allow_tf32, const std::optional<at::Tensor>& dropout_seed,
    double dropout_p) {
  const SpinalShape shape = check_backward_inputs(grad_out, x, pre_activation, weight_in, weight_hidden, weight_out);
  check_cuda_inputs(x);
  const Activation act = parse_activation(activation);
  const Dropout dropout = chain::make_dropout(dropout_seed, dropout_p, shape);
  const c10::cuda::CUDAGuard guard(x.device());
  const chain::CublasTf32Scope tf32(allow_tf32);
  const auto grads = chain::hoisted_backward(hoisted_engine(), shape, grad_out.contiguous(), x.contiguous(),
                                             pre_activation.contiguous(), weight_in.contiguous(),
                                             weight_hidden.contiguous(), contiguous(weight_out), act, negative_slope,
                                             output_mask, dropout);
  return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
}

int64_t tile_kernel_max_width() { return kTileKernelMaxWidth; }

// [widest w, most outputs M] of the narrow kernels (narrow_kernels.cuh).
std::vector<int64_t> narrow_limits() { return {kNarrowKernelMaxWidth, kNarrowKernelMaxOut}; }

int64_t tile_kernel_width_limit_op(int64_t device, at::ScalarType dtype, bool allow_tf32) {
  return tile_kernel_width_limit(dtype, allow_tf32, static_cast<int>(device));
}

std::string native_kernels_refusal_op(int64_t device, at::ScalarType dtype) {
  return native_kernels_refusal(dtype, static_cast<int>(device));
}

std::vector<int64_t> lt_engine_calls_op() {
  const auto calls = lt_engine_calls();
  return {calls.begin(), calls.end()};
}

}  // namespace
}  // namespace cuda_kernels
}  // namespace spinal_ops

TORCH_LIBRARY_FRAGMENT(spinal_ops, m) {
  m.def("cuda_tile_kernel_max_width() -> int", &spinal_ops::cuda_kernels::tile_kernel_max_width);
  m.def("cuda_tile_kernel_width_limit(int device, ScalarType dtype, bool allow_tf32) -> int",
        &spinal_ops::cuda_kernels::tile_kernel_width_limit_op);
  m.def("cuda_native_kernels_refusal(int device, ScalarType dtype) -> str",
        &spinal_ops::cuda_kernels::native_kernels_refusal_op);
  m.def("cuda_narrow_limits() -> int[]", &spinal_ops::cuda_kernels::narrow_limits);
  // [products, recurrence steps, backward steps] the cuBLASLt engine has taken (lt_engine.h).
  m.def("cuda_lt_engine_calls() -> int[]", &spinal_ops::cuda_kernels::lt_engine_calls_op);
}

TORCH_LIBRARY_IMPL(spinal_ops, CUDA, m) {
  m.impl("native_forward", &spinal_ops::cuda_kernels::native_forward_cuda);
  m.impl("native_backward", &spinal_ops::cuda_kernels::native_backward_cuda);
  m.impl("hoisted_forward", &spinal_ops::cuda_kernels::hoisted_forward_cuda);
  m.impl("hoisted_backward", &spinal_ops::cuda_kernels::hoisted_backward_cuda);
}

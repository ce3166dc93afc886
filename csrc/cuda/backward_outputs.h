// The gradient tensors the tile and narrow kernels' backward writes (launch_native_backward),
// allocated in one place for the CUDA op (register.cu) and the CPU model of CUDA
// (tests/cuda_emulation/emulated_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../common/spinal_shape.h"
#include "kernels.h"

namespace spinal_ops {
namespace cuda_kernels {

// dx, dW_in and dW_hidden always (the kernels compute every gradient in their two launches); db
// where shape.has_bias, dW_out where there is a projection, db_out where shape.has_bias_out; an
// empty [0] tensor for the rest. With an empty batch every weight gradient is a sum over no rows:
// zero (the kernels are not launched then).
inline BackwardOutputs allocate_backward_outputs(const SpinalShape& shape, const at::Tensor& x,
                                                 const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                                                 const std::optional<at::Tensor>& weight_out) {
  const auto options = x.options();
  const auto alloc = [&](at::IntArrayRef sizes) {
    return shape.batch == 0 ? at::zeros(sizes, options) : at::empty(sizes, options);
  };
  BackwardOutputs grads;
  grads.grad_x = at::empty_like(x);
  grads.grad_weight_in = alloc(weight_in.sizes());
  grads.grad_weight_hidden = alloc(weight_hidden.sizes());
  grads.grad_bias = shape.has_bias ? alloc({shape.num_layers, shape.layer_width}) : at::empty({0}, options);
  grads.grad_weight_out = weight_out ? alloc(weight_out->sizes()) : at::empty({0}, options);
  grads.grad_bias_out = shape.has_bias_out ? alloc({shape.out_features}) : at::empty({0}, options);
  return grads;
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

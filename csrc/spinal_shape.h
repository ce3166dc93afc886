// SpinalShape: the C++ mirror of spinal_ops.SpinalConfig for the compiled kernels.
//
// The Python side (SpinalConfig) validates user input before any op runs; these checks
// guard direct calls of the ops (torch.ops.spinal_ops.*, opcheck, the C++ test) so that
// no shape can make a kernel read or write out of bounds.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <utility>

namespace spinal_ops {

struct SpinalShape {
  int64_t batch;          // B: rows of x
  int64_t in_features;    // N
  int64_t num_layers;     // L
  int64_t layer_width;    // w
  int64_t split_size;     // s
  int64_t out_features;   // M, or 0 when there is no output projection
  bool has_bias;       // b_l present (its gradient wanted, in the backward)
  bool has_bias_out;   // b_out present (likewise)

  int64_t hidden() const { return num_layers * layer_width; }
  int64_t output_width() const { return out_features > 0 ? out_features : hidden(); }
  // First input column read by `layer`: (layer * s) mod N. The window of s columns
  // starting there wraps past N at most once because s <= N.
  int64_t window_start(int64_t layer) const { return (layer * split_size) % in_features; }
  // Columns of the window before the wrap (the rest, split_size - this, start at column 0).
  int64_t window_head(int64_t layer) const {
    return std::min(split_size, in_features - window_start(layer));
  }
};

// Checks the tensors of fused_forward / fused_backward against each other and returns the shape.
inline SpinalShape check_spinal_shape(const at::Tensor& x, const at::Tensor& weight_in,
                                      const at::Tensor& weight_hidden,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& weight_out,
                                      const std::optional<at::Tensor>& bias_out) {
  TORCH_CHECK(x.dim() == 2, "spinal_ops: x must be 2-D [B, N], got ", x.sizes());
  TORCH_CHECK(weight_in.dim() == 3, "spinal_ops: weight_in must be [L, w, s], got ", weight_in.sizes());
  SpinalShape shape{};
  shape.batch = x.size(0);
  shape.in_features = x.size(1);
  shape.num_layers = weight_in.size(0);
  shape.layer_width = weight_in.size(1);
  shape.split_size = weight_in.size(2);
  TORCH_CHECK(shape.in_features >= 1 && shape.num_layers >= 1 && shape.layer_width >= 1,
              "spinal_ops: N, L and w must be >= 1");
  TORCH_CHECK(shape.split_size >= 1 && shape.split_size <= shape.in_features,
              "spinal_ops: split_size must be in [1, N=", shape.in_features, "], got ", shape.split_size);
  const auto w = shape.layer_width;
  TORCH_CHECK(weight_hidden.sizes() == at::IntArrayRef({shape.num_layers - 1, w, w}),
              "spinal_ops: weight_hidden must be [L-1, w, w] = [", shape.num_layers - 1, ", ", w, ", ", w,
              "], got ", weight_hidden.sizes());
  shape.has_bias = bias.has_value();
  if (bias) {
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({shape.num_layers, w}),
                "spinal_ops: bias must be [L, w], got ", bias->sizes());
  }
  shape.out_features = 0;
  if (weight_out) {
    TORCH_CHECK(weight_out->dim() == 2 && weight_out->size(1) == shape.hidden() && weight_out->size(0) >= 1,
                "spinal_ops: weight_out must be [M, L*w] with L*w=", shape.hidden(), ", got ", weight_out->sizes());
    shape.out_features = weight_out->size(0);
  }
  shape.has_bias_out = bias_out.has_value();
  if (bias_out) {
    TORCH_CHECK(weight_out.has_value() && bias_out->sizes() == at::IntArrayRef({shape.out_features}),
                "spinal_ops: bias_out must be [M] and needs weight_out, got ", bias_out->sizes());
  }
  for (const at::Tensor* t : {&weight_in, &weight_hidden}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "spinal_ops: dtype mismatch between x (", x.scalar_type(),
                ") and weights (", t->scalar_type(), ")");
    TORCH_CHECK(t->device() == x.device(), "spinal_ops: device mismatch between x and weights");
  }
  for (const auto* t : {&bias, &weight_out, &bias_out}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->scalar_type() == x.scalar_type(), "spinal_ops: dtype mismatch between x (",
                  x.scalar_type(), ") and parameters (", (*t)->scalar_type(), ")");
      TORCH_CHECK((*t)->device() == x.device(), "spinal_ops: device mismatch between x and parameters");
    }
  }
  return shape;
}

// Checks the tensors of fused_backward (grad_out [B, M or L*w] and pre_activation [B, L*w] beside
// the forward's x and weights) and returns the shape. has_bias and has_bias_out are left false:
// the backward's output mask says which bias gradients are wanted.
inline SpinalShape check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                                         const at::Tensor& pre_activation, const at::Tensor& weight_in,
                                         const at::Tensor& weight_hidden,
                                         const std::optional<at::Tensor>& weight_out) {
  const SpinalShape shape = check_spinal_shape(x, weight_in, weight_hidden, std::nullopt, weight_out, std::nullopt);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == shape.batch && grad_out.size(1) == shape.output_width(),
              "spinal_ops: grad_out must be [B, ", shape.output_width(), "] with B=", shape.batch, ", got ",
              grad_out.sizes());
  TORCH_CHECK(pre_activation.dim() == 2 && pre_activation.size(0) == shape.batch &&
                  pre_activation.size(1) == shape.hidden(),
              "spinal_ops: pre_activation must be [B, L*w] = [", shape.batch, ", ", shape.hidden(),
              "] (the forward was run without keeping it?), got ", pre_activation.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&grad_out, "grad_out"},
                                {&pre_activation, "pre_activation"}}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "spinal_ops: ", name, " has dtype ", t->scalar_type(),
                " but x has ", x.scalar_type());
    TORCH_CHECK(t->device() == x.device(), "spinal_ops: ", name, " is on ", t->device(), " but x is on ",
                x.device());
  }
  return shape;
}

}  // namespace spinal_ops

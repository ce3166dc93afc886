// The shape checks of every compiled op (declared in spinal_shape.h), built once by the host C++
// compiler: the CPU op and the CUDA sources call this one copy.
#include "spinal_shape.h"

#include <utility>

#include "message_text.h"

namespace spinal_ops {

SpinalShape check_spinal_shape(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight_out,
                               const std::optional<at::Tensor>& bias_out) {
  TORCH_CHECK(x.dim() == 2, "spinal_ops: x must be 2-D [B, N], got ", text(x.sizes()));
  TORCH_CHECK(weight_in.dim() == 3, "spinal_ops: weight_in must be [L, w, s], got ",
              text(weight_in.sizes()));
  SpinalShape shape{};
  shape.batch = x.size(0);
  shape.in_features = x.size(1);
  shape.num_layers = weight_in.size(0);
  shape.layer_width = weight_in.size(1);
  shape.split_size = weight_in.size(2);
  TORCH_CHECK(shape.in_features >= 1 && shape.num_layers >= 1 && shape.layer_width >= 1,
              "spinal_ops: N, L and w must be >= 1");
  TORCH_CHECK(shape.split_size >= 1 && shape.split_size <= shape.in_features,
              "spinal_ops: split_size must be in [1, N=", text(shape.in_features), "], got ",
              text(shape.split_size));
  const auto w = shape.layer_width;
  TORCH_CHECK(weight_hidden.sizes() == at::IntArrayRef({shape.num_layers - 1, w, w}),
              "spinal_ops: weight_hidden must be [L-1, w, w] = ", text({shape.num_layers - 1, w, w}),
              ", got ", text(weight_hidden.sizes()));
  shape.has_bias = bias.has_value();
  if (bias) {
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({shape.num_layers, w}),
                "spinal_ops: bias must be [L, w], got ", text(bias->sizes()));
  }
  shape.out_features = 0;
  if (weight_out) {
    TORCH_CHECK(weight_out->dim() == 2 && weight_out->size(1) == shape.hidden() && weight_out->size(0) >= 1,
                "spinal_ops: weight_out must be [M, L*w] with L*w=", text(shape.hidden()), ", got ",
                text(weight_out->sizes()));
    shape.out_features = weight_out->size(0);
  }
  shape.has_bias_out = bias_out.has_value();
  if (bias_out) {
    TORCH_CHECK(weight_out.has_value() && bias_out->sizes() == at::IntArrayRef({shape.out_features}),
                "spinal_ops: bias_out must be [M] and needs weight_out, got ", text(bias_out->sizes()));
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

SpinalShape check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre_activation,
                                  const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                                  const std::optional<at::Tensor>& weight_out) {
  const SpinalShape shape = check_spinal_shape(x, weight_in, weight_hidden, std::nullopt, weight_out, std::nullopt);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == shape.batch && grad_out.size(1) == shape.output_width(),
              "spinal_ops: grad_out must be [B, ", text(shape.output_width()), "] with B=", text(shape.batch),
              ", got ", text(grad_out.sizes()));
  TORCH_CHECK(pre_activation.dim() == 2 && pre_activation.size(0) == shape.batch &&
                  pre_activation.size(1) == shape.hidden(),
              "spinal_ops: pre_activation must be [B, L*w] = ", text({shape.batch, shape.hidden()}),
              " (the forward was run without keeping it?), got ", text(pre_activation.sizes()));
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

// CPU kernel of spinal_ops::fused_backward: dx and every parameter gradient in one call.
//
// Scheme (G = grad_out, Z = saved pre-activations, H = phi(Z) recomputed in one pass):
//   dZ = G @ W_out (or G when there is no output projection)         [B, L*w] buffer
//   for l = L-1 .. 0:  dZ_l = (dZ_l + dZ_{l+1} @ R_{l+1}) * phi'(Z_l)  (in place, column slices)
//                      dW_in[l][:, piece] = dZ_l^T @ x[:, piece]       (GEMMs straight into slices
//                      dx[:, piece] += dZ_l @ A_l[:, piece]             of the outputs)
//                      dR_l = dZ_l^T @ H_{l-1}
//   dbias = column sums of dZ;  dW_out = G^T @ H;  dbias_out = column sums of G
// (one GEMM per window piece: two when the window wraps). Whole-[B, L*w] calls (H, G @ W_out,
// dbias, dW_out) keep the number of ATen calls, each a parallel region, low.
#include <torch/library.h>

#include "spinal_cpu.h"

namespace spinal_ops::cpu {
namespace {

void check_backward_inputs(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& pre_activation) {
  TORCH_CHECK(pre_activation.sizes() == at::IntArrayRef({shape.batch, shape.hidden()}),
              "spinal_ops: pre_activation must be [B, L*w] = [", shape.batch, ", ", shape.hidden(), "], got ",
              pre_activation.sizes());
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({shape.batch, shape.output_width()}),
              "spinal_ops: grad_out must be [B, ", shape.output_width(), "], got ", grad_out.sizes());
  for (const at::Tensor* t : {&grad_out, &pre_activation}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "spinal_ops: dtype mismatch between x (", x.scalar_type(),
                ") and grad_out / pre_activation (", t->scalar_type(), ")");
    TORCH_CHECK(t->device() == x.device(), "spinal_ops: device mismatch between x and grad_out / pre_activation");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& pre_activation_in,
    const at::Tensor& weight_in_in, const at::Tensor& weight_hidden_in, const std::optional<at::Tensor>& weight_out_in,
    bool has_bias, c10::string_view activation, double negative_slope) {
  const SpinalShape shape =
      check_spinal_shape(x_in, weight_in_in, weight_hidden_in, std::nullopt, weight_out_in, std::nullopt);
  check_cpu_dtype(x_in);
  check_backward_inputs(shape, grad_out_in, x_in, pre_activation_in);
  const Activation act = parse_activation(activation);
  const bool has_projection = weight_out_in.has_value();

  const at::Tensor grad_out = to_compute(grad_out_in);
  const at::Tensor x = to_compute(x_in);
  const at::Tensor pre_activation = to_compute(pre_activation_in);
  const at::Tensor weight_in = to_compute(weight_in_in);
  const at::Tensor weight_hidden = to_compute(weight_hidden_in);

  // H: for dW_out, dR and the tanh/sigmoid derivatives.
  const at::Tensor hidden = at::empty_like(pre_activation);
  apply_activation(hidden, pre_activation, act, negative_slope);

  const at::Tensor grad_x = at::zeros_like(x);
  const at::Tensor grad_weight_in = at::empty_like(weight_in);
  const at::Tensor grad_weight_hidden = at::empty_like(weight_hidden);
  at::Tensor grad_pre = has_projection ? at::mm(grad_out, to_compute(*weight_out_in)) : grad_out.clone();
  for (int64_t layer = shape.num_layers - 1; layer >= 0; --layer) {
    at::Tensor dz = layer_columns(grad_pre, shape, layer);
    if (layer + 1 < shape.num_layers) dz.addmm_(layer_columns(grad_pre, shape, layer + 1), weight_hidden[layer]);
    multiply_by_activation_grad(dz, layer_columns(pre_activation, shape, layer), layer_columns(hidden, shape, layer),
                                act, negative_slope);

    // dZ_l is final: its gradient products now, while it is still in cache.
    const at::Tensor grad_a = grad_weight_in[layer];
    for (const WindowPiece& piece : layer_window(shape, layer)) {
      const at::Tensor x_piece = x.narrow(1, piece.input_start, piece.length);
      at::Tensor grad_a_piece = grad_a.narrow(1, piece.weight_start, piece.length);
      at::mm_out(grad_a_piece, dz.t(), x_piece);
      grad_x.narrow(1, piece.input_start, piece.length)
          .addmm_(dz, weight_in[layer].narrow(1, piece.weight_start, piece.length));
    }
    if (layer > 0) {
      at::Tensor grad_r = grad_weight_hidden[layer - 1];
      at::mm_out(grad_r, dz.t(), layer_columns(hidden, shape, layer - 1));
    }
  }

  const auto options = x_in.options();
  const at::Tensor grad_bias =
      has_bias ? grad_pre.sum(0).view({shape.num_layers, shape.layer_width}) : at::empty({0}, options);
  const at::Tensor grad_weight_out = has_projection ? at::mm(grad_out.t(), hidden) : at::empty({0}, options);
  const at::Tensor grad_bias_out = (has_projection && has_bias) ? grad_out.sum(0) : at::empty({0}, options);

  const auto dtype = x_in.scalar_type();
  return {grad_x.to(dtype),          grad_weight_in.to(dtype),  grad_weight_hidden.to(dtype),
          grad_bias.to(dtype),       grad_weight_out.to(dtype), grad_bias_out.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(spinal_ops, CPU, m) { m.impl("fused_backward", &fused_backward_cpu); }

}  // namespace spinal_ops::cpu

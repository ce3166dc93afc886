// CPU kernel of spinal_ops::fused_backward: dx and every parameter gradient in one call.
//
// Scheme (G = grad_out, Z = saved pre-activations, h_l = phi(Z_l) recomputed layer by layer):
//   for l = L-1 .. 0:  dZ_l = (G @ W_out[:, l] + dZ_{l+1} @ R_{l+1}) * phi'(Z_l)
//                      dW_out[:, l] = G^T @ h_l;  dbias_l = column sums of dZ_l
//                      dW_in[l][:, piece] = dZ_l^T @ x[:, piece]       (GEMMs straight into slices
//                      dx[:, piece] += dZ_l @ A_l[:, piece]             of the outputs)
//                      dR_l = dZ_l^T @ h_{l-1}
//   dbias_out = column sums of G
// (W_out[:, l] = columns l*w..(l+1)*w; G's own slice replaces G @ W_out[:, l] without projection;
// one GEMM per window piece: two when the window wraps).
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

  // The layers stream through four reused [B, w] buffers (h_l, h_{l-1}, dZ_l, dZ_{l+1}) rather
  // than whole [B, L*w] H and dZ buffers: at large B those are fresh allocations big enough
  // for the system allocator to map new pages on every call, and the page faults cost more
  // than the extra small ATen calls.
  const int64_t w = shape.layer_width;
  const auto options = x.options();
  const at::Tensor weight_out = has_projection ? to_compute(*weight_out_in) : at::Tensor();
  const at::Tensor grad_x = at::zeros_like(x);
  const at::Tensor grad_weight_in = at::empty_like(weight_in);
  const at::Tensor grad_weight_hidden = at::empty_like(weight_hidden);
  const at::Tensor grad_bias = has_bias ? at::empty({shape.num_layers, w}, options) : at::empty({0}, options);
  const at::Tensor grad_weight_out = has_projection ? at::empty_like(weight_out) : at::empty({0}, options);
  at::Tensor h = at::empty({shape.batch, w}, options);       // phi(Z_l)
  at::Tensor h_prev = at::empty({shape.batch, w}, options);  // phi(Z_{l-1})
  at::Tensor dz = at::empty({shape.batch, w}, options);      // dZ_l
  at::Tensor dz_next = at::empty({shape.batch, w}, options); // dZ_{l+1}

  const int64_t last = shape.num_layers - 1;
  apply_activation(h, layer_columns(pre_activation, shape, last), act, negative_slope);
  for (int64_t layer = last; layer >= 0; --layer) {
    // dZ_l = (dH_l + dZ_{l+1} @ R_{l+1}) * phi'(Z_l), dH_l = G @ W_out[:, l*w:(l+1)*w] (or G's slice).
    if (has_projection) {
      at::mm_out(dz, grad_out, layer_columns(weight_out, shape, layer));
    } else {
      dz.copy_(layer_columns(grad_out, shape, layer));
    }
    if (layer < last) dz.addmm_(dz_next, weight_hidden[layer]);
    multiply_by_activation_grad(dz, layer_columns(pre_activation, shape, layer), h, act, negative_slope);

    if (has_projection) {
      at::Tensor grad_w_out_l = layer_columns(grad_weight_out, shape, layer);
      at::mm_out(grad_w_out_l, grad_out.t(), h);
    }
    if (has_bias) {
      at::Tensor grad_b_l = grad_bias[layer];
      at::sum_out(grad_b_l, dz, {0});
    }
    const at::Tensor grad_a = grad_weight_in[layer];
    for (const WindowPiece& piece : layer_window(shape, layer)) {
      const at::Tensor x_piece = x.narrow(1, piece.input_start, piece.length);
      at::Tensor grad_a_piece = grad_a.narrow(1, piece.weight_start, piece.length);
      at::mm_out(grad_a_piece, dz.t(), x_piece);
      grad_x.narrow(1, piece.input_start, piece.length)
          .addmm_(dz, weight_in[layer].narrow(1, piece.weight_start, piece.length));
    }
    if (layer > 0) {
      apply_activation(h_prev, layer_columns(pre_activation, shape, layer - 1), act, negative_slope);
      at::Tensor grad_r = grad_weight_hidden[layer - 1];
      at::mm_out(grad_r, dz.t(), h_prev);
      std::swap(h, h_prev);
    }
    std::swap(dz, dz_next);
  }
  const at::Tensor grad_bias_out = (has_projection && has_bias) ? grad_out.sum(0) : at::empty({0}, options);

  const auto dtype = x_in.scalar_type();
  return {grad_x.to(dtype),          grad_weight_in.to(dtype),  grad_weight_hidden.to(dtype),
          grad_bias.to(dtype),       grad_weight_out.to(dtype), grad_bias_out.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(spinal_ops, CPU, m) { m.impl("fused_backward", &fused_backward_cpu); }

}  // namespace spinal_ops::cpu

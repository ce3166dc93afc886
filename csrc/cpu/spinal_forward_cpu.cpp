// CPU kernel of spinal_ops::fused_forward: the whole chain and the output projection in one call.
//
// Scheme: the only [B, L*w] buffer is the output Z (and H itself when there is no projection);
// large fresh buffers are expensive on CPU (every page is faulted in on first touch), so the
// layers stream through one [B, w] buffer for h. For each layer l the products go straight into
// the column slice Z[:, l*w:(l+1)*w] (leading dimension L*w) with ATen's BLAS-backed addmm:
//   Z_l  = b_l + x[:, window piece] @ A_l[:, piece]^T    (one GEMM per piece: two when the window wraps)
//   Z_l += h_{l-1} @ R_l^T                                (l >= 1)
//   h_l  = phi(Z_l)                                       (elementwise, parallel over rows)
//   y   += h_l @ W_out[:, l*w:(l+1)*w]^T                  (y starts as b_out; or y[:, l-th slice] = h_l)
#include <torch/library.h>

#include "spinal_cpu.h"

namespace spinal_ops::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> fused_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in_in,
                                                     const at::Tensor& weight_hidden_in,
                                                     const std::optional<at::Tensor>& bias_in,
                                                     const std::optional<at::Tensor>& weight_out_in,
                                                     const std::optional<at::Tensor>& bias_out_in,
                                                     c10::string_view activation, double negative_slope) {
  const SpinalShape shape = check_spinal_shape(x_in, weight_in_in, weight_hidden_in, bias_in, weight_out_in, bias_out_in);
  check_cpu_dtype(x_in);
  const Activation act = parse_activation(activation);
  const bool has_projection = weight_out_in.has_value();

  const at::Tensor x = to_compute(x_in);
  const at::Tensor weight_in = to_compute(weight_in_in);
  const at::Tensor weight_hidden = to_compute(weight_hidden_in);
  const auto bias = bias_in ? std::optional<at::Tensor>(to_compute(*bias_in)) : std::nullopt;
  const at::Tensor weight_out = has_projection ? to_compute(*weight_out_in) : at::Tensor();

  const at::Tensor pre_activation = at::empty({shape.batch, shape.hidden()}, x.options());
  at::Tensor out = at::empty({shape.batch, shape.output_width()}, x.options());
  // h_l lives in its slice of the output when y = H, else in one buffer reused by every layer.
  const at::Tensor h_buffer = has_projection ? at::empty({shape.batch, shape.layer_width}, x.options()) : at::Tensor();
  at::Tensor h_prev;
  for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
    at::Tensor z = layer_columns(pre_activation, shape, layer);
    const at::Tensor a = weight_in[layer];
    bool z_written = false;
    for (const WindowPiece& piece : layer_window(shape, layer)) {
      const at::Tensor x_piece = x.narrow(1, piece.input_start, piece.length);
      const at::Tensor a_piece = a.narrow(1, piece.weight_start, piece.length).t();
      if (z_written) {
        z.addmm_(x_piece, a_piece);
      } else if (bias) {
        at::addmm_out(z, (*bias)[layer], x_piece, a_piece);
      } else {
        at::mm_out(z, x_piece, a_piece);
      }
      z_written = true;
    }
    if (layer > 0) z.addmm_(h_prev, weight_hidden[layer - 1].t());

    const at::Tensor h = has_projection ? h_buffer : layer_columns(out, shape, layer);
    apply_activation(h, z, act, negative_slope);
    if (has_projection) {
      const at::Tensor w_out_t = layer_columns(weight_out, shape, layer).t();
      if (layer > 0) {
        out.addmm_(h, w_out_t);
      } else if (bias_out_in) {
        at::addmm_out(out, to_compute(*bias_out_in), h, w_out_t);
      } else {
        at::mm_out(out, h, w_out_t);
      }
    }
    h_prev = h;
  }
  const auto dtype = x_in.scalar_type();
  return {out.to(dtype), pre_activation.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(spinal_ops, CPU, m) { m.impl("fused_forward", &fused_forward_cpu); }

}  // namespace spinal_ops::cpu

// CPU kernel of spinal_ops::fused_forward: the whole chain and the output projection in one call.
//
// Scheme: Z [B, L*w] and H [B, L*w] are row-major buffers allocated once. For each layer l the
// products go straight into the column slice Z[:, l*w:(l+1)*w] (leading dimension L*w) with
// ATen's BLAS-backed addmm (no gathers, no cat):
//   Z_l  = b_l + x[:, window piece] @ A_l[:, piece]^T   (one GEMM per piece: two when the window wraps)
//   Z_l += H_{l-1} @ R_l^T                               (l >= 1)
//   H_l  = phi(Z_l)                                      (elementwise, parallel over rows)
// then y = b_out + H @ W_out^T (one GEMM), or y = H when there is no output projection.
// Every ATen call is a parallel region; with few threads on a busy machine each one can cost a
// scheduling delay, so the scheme keeps the call count at about 4 per layer (streaming the layers
// through [B, w] buffers instead was measured slower for that reason).
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

  const at::Tensor x = to_compute(x_in);
  const at::Tensor weight_in = to_compute(weight_in_in);
  const at::Tensor weight_hidden = to_compute(weight_hidden_in);
  const auto bias = bias_in ? std::optional<at::Tensor>(to_compute(*bias_in)) : std::nullopt;

  const at::Tensor pre_activation = at::empty({shape.batch, shape.hidden()}, x.options());
  const at::Tensor hidden = at::empty({shape.batch, shape.hidden()}, x.options());
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
    if (layer > 0) z.addmm_(layer_columns(hidden, shape, layer - 1), weight_hidden[layer - 1].t());
    apply_activation(layer_columns(hidden, shape, layer), z, act, negative_slope);
  }

  at::Tensor out = hidden;
  if (weight_out_in) {
    const at::Tensor weight_out_t = to_compute(*weight_out_in).t();
    out = bias_out_in ? at::addmm(to_compute(*bias_out_in), hidden, weight_out_t) : at::mm(hidden, weight_out_t);
  }
  const auto dtype = x_in.scalar_type();
  return {out.to(dtype), pre_activation.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(spinal_ops, CPU, m) { m.impl("fused_forward", &fused_forward_cpu); }

}  // namespace spinal_ops::cpu

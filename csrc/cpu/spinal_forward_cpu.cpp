// CPU kernel of spinal_ops::fused_forward: the whole chain and the output projection in one call.
//
// Scheme: Z [B, L*w] is a row-major buffer allocated once (it is returned: autograd saves it).
// For each layer l the products go straight into the column slice Z[:, l*w:(l+1)*w] (leading
// dimension L*w) with ATen's BLAS-backed addmm (no gathers, no cat):
//   Z_l  = b_l + x[:, window piece] @ A_l[:, piece]^T   (one GEMM per piece: two when the window wraps)
//   Z_l += H_{l-1} @ R_l^T                               (l >= 1)
//   H_l  = phi(Z_l)                                      (ATen's vectorized elementwise kernels)
//   y   += H_l @ W_out[:, l*w:(l+1)*w]^T                 (y starts at b_out)
// With a projection H_l streams through two reused [B, w] buffers: a whole [B, L*w] H buffer
// would be a second fresh allocation that, at large B, the system allocator maps anew on every
// call, and its page faults cost more than the L small output GEMMs (measured at cifar_vgg,
// batch 4096). Without a projection y is H, written in place slice by slice.
// Every ATen call is a parallel region; the scheme keeps the count at about 4 per layer.
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
  // H_l's storage: the column slice of the output when H is the output (no projection), else
  // one of two [B, w] buffers used in turn (H_l only feeds layer l+1 and y).
  const bool has_projection = weight_out_in.has_value();
  at::Tensor out = has_projection ? at::empty({shape.batch, shape.output_width()}, x.options())
                                  : at::empty({shape.batch, shape.hidden()}, x.options());
  const std::array<at::Tensor, 2> stream_buffers =
      has_projection ? std::array<at::Tensor, 2>{at::empty({shape.batch, shape.layer_width}, x.options()),
                                                 at::empty({shape.batch, shape.layer_width}, x.options())}
                     : std::array<at::Tensor, 2>{};
  const auto hidden_of = [&](int64_t layer) {
    return has_projection ? stream_buffers[layer % 2] : layer_columns(out, shape, layer);
  };
  const at::Tensor weight_out = has_projection ? to_compute(*weight_out_in) : at::Tensor();
  const auto bias_out = bias_out_in ? std::optional<at::Tensor>(to_compute(*bias_out_in)) : std::nullopt;

  for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
    at::Tensor z = layer_columns(pre_activation, shape, layer);
    const at::Tensor a = weight_in[layer];
    const auto bias_l = bias ? std::optional<at::Tensor>((*bias)[layer]) : std::nullopt;
    bool first_piece = true;
    for (const WindowPiece& piece : layer_window(shape, layer)) {
      add_product(z, first_piece, bias_l, x.narrow(1, piece.input_start, piece.length),
                  a.narrow(1, piece.weight_start, piece.length).t());
      first_piece = false;
    }
    if (layer > 0) z.addmm_(hidden_of(layer - 1), weight_hidden[layer - 1].t());
    at::Tensor h = hidden_of(layer);
    apply_activation(h, z, act, negative_slope);

    if (!has_projection) continue;
    add_product(out, layer == 0, bias_out, h, layer_columns(weight_out, shape, layer).t());
  }

  const auto dtype = x_in.scalar_type();
  return {out.to(dtype), pre_activation.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(spinal_ops, CPU, m) { m.impl("fused_forward", &fused_forward_cpu); }

}  // namespace spinal_ops::cpu

// The normed chain (scheme in normed_chain.h) and its registration for CPU and CUDA tensors.
#include "normed_chain.h"

#include <torch/library.h>

#include <vector>

#include "../common/activation.h"
#include "../common/message_text.h"
#include "../common/spinal_shape.h"
#include "cublas_tf32_scope.h"
#include "dropout_factors.h"
#include "hoisted_chain.h"

namespace spinal_ops::chain {
namespace {

bool is_half(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

// The dtype of the batch statistics and of the normalisation's arithmetic.
at::ScalarType stat_dtype(at::ScalarType dtype) { return is_half(dtype) ? at::kFloat : dtype; }

// Layer l's input window times its dropout factors `window` ([B, s], overwritten), returned.
const at::Tensor& multiply_window(const at::Tensor& window, const at::Tensor& x, const SpinalShape& shape,
                                  int64_t layer) {
  for (const WindowPiece& piece : window_pieces(shape, layer)) {
    window.narrow(1, piece.weight_start, piece.length).mul_(x.narrow(1, piece.input_start, piece.length));
  }
  return window;
}

void check_norm_parameter(const std::optional<at::Tensor>& t, const char* name, const SpinalShape& shape,
                          const at::Tensor& x) {
  if (!t) return;
  TORCH_CHECK(t->sizes() == at::IntArrayRef({shape.num_layers, shape.layer_width}), "spinal_ops: ", name,
              " must be [L, w] = ", text({shape.num_layers, shape.layer_width}), ", got ", text(t->sizes()));
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), "spinal_ops: ", name, " has dtype ", t->scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(t->device() == x.device(), "spinal_ops: ", name, " is on ", t->device(), " but x is on ", x.device());
}

void check_statistic(const at::Tensor& t, const char* name, const SpinalShape& shape, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef({shape.num_layers, shape.layer_width}), "spinal_ops: ", name,
              " must be [L, w] = ", text({shape.num_layers, shape.layer_width}), ", got ", text(t.sizes()));
  TORCH_CHECK(t.scalar_type() == stat_dtype(x.scalar_type()), "spinal_ops: ", name, " must have dtype ",
              stat_dtype(x.scalar_type()), " for x of ", x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "spinal_ops: ", name, " is on ", t.device(), " but x is on ", x.device());
}

void check_common(const SpinalShape& shape, const at::Tensor& x, double norm_eps) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "spinal_ops: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(shape.batch > 1, "spinal_ops: batch norm in training needs more than one row per batch, got B=",
              text(shape.batch));
  TORCH_CHECK(norm_eps > 0.0, "spinal_ops: norm_eps must be > 0, got ", std::to_string(norm_eps));
}

// (scale, shift) in the statistics' dtype, of all layers ([L, w]) or of one ([w]): u = z * scale + shift.
std::pair<at::Tensor, at::Tensor> affine_of(const at::Tensor& mean, const at::Tensor& invstd,
                                            const std::optional<at::Tensor>& gamma,
                                            const std::optional<at::Tensor>& beta) {
  at::Tensor scale = gamma ? invstd * gamma->to(invstd.scalar_type()) : invstd;
  at::Tensor shift = beta ? at::sub(beta->to(invstd.scalar_type()), mean * scale) : -(mean * scale);
  return {scale, shift};
}

std::optional<at::Tensor> row(const std::optional<at::Tensor>& t, int64_t layer) {
  return t ? std::optional<at::Tensor>((*t)[layer]) : std::nullopt;
}

at::Tensor empty_gradient(const at::Tensor& x) { return at::empty({0}, x.options()); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> normed_forward(
    const at::Tensor& x_arg, const at::Tensor& weight_in_arg, const at::Tensor& weight_hidden_arg,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight_out,
    const std::optional<at::Tensor>& bias_out, const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias, c10::string_view activation, double negative_slope,
    double norm_eps, bool allow_tf32, const std::optional<at::Tensor>& dropout_seed, double dropout_p) {
  const SpinalShape shape = check_spinal_shape(x_arg, weight_in_arg, weight_hidden_arg, bias, weight_out, bias_out);
  check_common(shape, x_arg, norm_eps);
  check_norm_parameter(norm_weight, "norm_weight", shape, x_arg);
  check_norm_parameter(norm_bias, "norm_bias", shape, x_arg);
  const Activation act = parse_activation(activation);
  const Dropout dropout = make_dropout(dropout_seed, dropout_p, shape);
  const CublasTf32Scope tf32(allow_tf32, x_arg.is_cuda());

  const at::Tensor x = x_arg.contiguous(), weight_in = weight_in_arg.contiguous();
  const at::Tensor weight_hidden = weight_hidden_arg.contiguous();
  const int64_t batch = shape.batch, width = shape.layer_width, hidden = shape.hidden();
  const auto options = x.options();
  const auto stat_options = options.dtype(stat_dtype(x.scalar_type()));
  const bool half = is_half(x.scalar_type());

  at::Tensor pre_norm = at::empty({batch, hidden}, options);
  at::Tensor hidden_states = at::empty({batch, hidden}, options);
  at::Tensor mean = at::empty({shape.num_layers, width}, stat_options);
  at::Tensor var = at::empty({shape.num_layers, width}, stat_options);
  for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
    // z_l in a contiguous buffer, copied into pre_norm's block: ATen's batch-norm kernels take their
    // fast path on contiguous [B, w] only (the strided block ran the statistics several times slower).
    at::Tensor z = at::empty({batch, width}, options);
    const at::Tensor a = weight_in[layer];
    if (dropout.active) {
      const at::Tensor window_factors =
          dropout_factors(dropout, 0, batch, dropout.window_site(layer), shape.split_size, options);
      const at::Tensor window = multiply_window(window_factors, x, shape, layer);
      bias ? at::addmm_out(z, (*bias)[layer], window, a.t()) : at::mm_out(z, window, a.t());
    } else {
      bool first = true;
      for (const WindowPiece& piece : window_pieces(shape, layer)) {
        const at::Tensor columns = x.narrow(1, piece.input_start, piece.length);
        const at::Tensor weight = a.narrow(1, piece.weight_start, piece.length).t();
        if (!first) at::addmm_out(z, z, columns, weight);
        else if (bias) at::addmm_out(z, (*bias)[layer], columns, weight);
        else at::mm_out(z, columns, weight);
        first = false;
      }
    }
    if (layer > 0) {
      at::Tensor previous = hidden_states.narrow(1, (layer - 1) * width, width);
      if (dropout.active) {
        previous = previous * dropout_factors(dropout, 0, batch, dropout.hidden_site(layer), width, options);
      }
      at::addmm_out(z, z, previous, weight_hidden[layer - 1].t());
    }
    pre_norm.narrow(1, layer * width, width).copy_(z);
    const at::Tensor z_stat = half ? z.to(at::kFloat) : z;
    // (mean, biased variance) by the kernel F.batch_norm computes them with; no running statistics.
    const auto [layer_mean, layer_var] = at::batch_norm_update_stats(z_stat, std::nullopt, std::nullopt, 0.0);
    mean[layer].copy_(layer_mean);
    var[layer].copy_(layer_var);
    const at::Tensor invstd = at::rsqrt(layer_var + norm_eps);
    const auto [scale, shift] = affine_of(layer_mean, invstd, row(norm_weight, layer), row(norm_bias, layer));
    // phi in place on the contiguous u, then into H's block: ATen's gelu_out writes nothing into a
    // strided out= view, and the out= activations take one dtype (u is float32 for half inputs).
    at::Tensor u = at::addcmul(shift, z_stat, scale);
    apply_activation(u, u, act, negative_slope);
    hidden_states.narrow(1, layer * width, width).copy_(u);
  }
  if (!weight_out) return {hidden_states, pre_norm, mean, var};
  const at::Tensor projection_input =
      dropout.active
          ? hidden_states * dropout_factors(dropout, 0, batch, dropout.projection_site(), hidden, options)
          : hidden_states;
  const at::Tensor w_out = weight_out->contiguous().t();
  at::Tensor out = bias_out ? at::addmm(*bias_out, projection_input, w_out) : at::mm(projection_input, w_out);
  return {out, pre_norm, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
normed_backward(const at::Tensor& grad_out_arg, const at::Tensor& x_arg, const at::Tensor& pre_norm_arg,
                const at::Tensor& batch_mean, const at::Tensor& batch_var, const at::Tensor& weight_in_arg,
                const at::Tensor& weight_hidden_arg, const std::optional<at::Tensor>& weight_out_arg,
                const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
                std::array<bool, 8> output_mask, c10::string_view activation, double negative_slope,
                double norm_eps, bool allow_tf32, const std::optional<at::Tensor>& dropout_seed, double dropout_p) {
  const SpinalShape shape =
      check_backward_inputs(grad_out_arg, x_arg, pre_norm_arg, weight_in_arg, weight_hidden_arg, weight_out_arg);
  check_common(shape, x_arg, norm_eps);
  check_statistic(batch_mean, "batch_mean", shape, x_arg);
  check_statistic(batch_var, "batch_var", shape, x_arg);
  check_norm_parameter(norm_weight, "norm_weight", shape, x_arg);
  check_norm_parameter(norm_bias, "norm_bias", shape, x_arg);
  TORCH_CHECK(!(output_mask[6] && !norm_weight) && !(output_mask[7] && !norm_bias),
              "spinal_ops: output_mask asks for a norm_weight or norm_bias gradient but the layer has none");
  const Activation act = parse_activation(activation);
  const Dropout dropout = make_dropout(dropout_seed, dropout_p, shape);
  const CublasTf32Scope tf32(allow_tf32, x_arg.is_cuda());

  const at::Tensor grad_out = grad_out_arg.contiguous(), x = x_arg.contiguous(), pre_norm = pre_norm_arg.contiguous();
  const at::Tensor weight_in = weight_in_arg.contiguous(), weight_hidden = weight_hidden_arg.contiguous();
  const int64_t batch = shape.batch, width = shape.layer_width, hidden = shape.hidden();
  const auto options = x.options();
  const auto dtype = x.scalar_type();
  const bool half = is_half(dtype);

  at::Tensor grads[8];
  for (at::Tensor& grad : grads) grad = empty_gradient(x);
  // Whether the chain through the layers runs at all (every gradient but the projection's needs it).
  const bool chain = output_mask[0] || output_mask[1] || output_mask[2] || output_mask[3] || output_mask[6] ||
                     output_mask[7];

  // u and h of every layer at once, from Z and the statistics (in the statistics' dtype).
  const at::Tensor invstd = at::rsqrt(batch_var + norm_eps);
  const auto [scale, shift] = affine_of(batch_mean, invstd, norm_weight, norm_bias);
  const at::Tensor z_stat = half ? pre_norm.to(at::kFloat) : pre_norm;
  const at::Tensor u = at::addcmul(shift.reshape({hidden}), z_stat, scale.reshape({hidden}));
  const at::Tensor h_stat = at::empty_like(u);
  apply_activation(h_stat, u, act, negative_slope);
  const at::Tensor hidden_states = half ? h_stat.to(dtype) : h_stat;

  at::Tensor grad_hidden;  // dL/dH [B, L*w], its layer-l block complete once layer l+1 is done
  if (weight_out_arg) {
    const at::Tensor weight_out = weight_out_arg->contiguous();
    const at::Tensor factors = dropout.active
                                   ? dropout_factors(dropout, 0, batch, dropout.projection_site(), hidden, options)
                                   : at::Tensor();
    if (output_mask[4]) grads[4] = at::mm(grad_out.t(), dropout.active ? hidden_states * factors : hidden_states);
    if (output_mask[5]) grads[5] = grad_out.sum(0);
    if (chain) {
      grad_hidden = at::mm(grad_out, weight_out);
      if (dropout.active) grad_hidden.mul_(factors);
    }
  } else if (chain) {
    grad_hidden = grad_out.clone();
  }
  if (!chain) return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[6], grads[7]};

  if (output_mask[0]) grads[0] = at::zeros_like(x);
  if (output_mask[1]) grads[1] = at::empty_like(weight_in);
  if (output_mask[2]) grads[2] = at::empty_like(weight_hidden);
  if (output_mask[3]) grads[3] = at::empty({shape.num_layers, width}, options);
  if (output_mask[6]) grads[6] = at::empty({shape.num_layers, width}, options);
  if (output_mask[7]) grads[7] = at::empty({shape.num_layers, width}, options);
  const std::optional<at::Tensor> gamma_stat =
      norm_weight ? std::optional<at::Tensor>(norm_weight->to(stat_dtype(dtype))) : std::nullopt;
  for (int64_t layer = shape.num_layers - 1; layer >= 0; --layer) {
    const int64_t column = layer * width;
    // du = dh * phi'(u), then ATen's batch-norm backward with the batch statistics.
    // Contiguous (a copy of the block unless L = 1), as the out= activation gradients need and the
    // batch-norm backward's fast path takes (with z_l's block copied likewise).
    at::Tensor grad_u = grad_hidden.narrow(1, column, width).to(stat_dtype(dtype)).contiguous();
    multiply_by_activation_grad(grad_u, u.narrow(1, column, width), h_stat.narrow(1, column, width), act,
                                negative_slope);
    const auto [grad_z_stat, grad_gamma, grad_beta] = at::native_batch_norm_backward(
        grad_u, z_stat.narrow(1, column, width).contiguous(), row(gamma_stat, layer),
        std::nullopt, std::nullopt, batch_mean[layer], invstd[layer], /*train=*/true, norm_eps,
        {true, output_mask[6], output_mask[7]});
    if (output_mask[6]) grads[6][layer].copy_(grad_gamma);
    if (output_mask[7]) grads[7][layer].copy_(grad_beta);
    const at::Tensor grad_z = half ? grad_z_stat.to(dtype) : grad_z_stat;
    // db from dz before any rounding to a half type: its exact value is 0 (the batch mean removes b).
    if (output_mask[3]) grads[3][layer].copy_(grad_z_stat.sum(0));

    const at::Tensor a = weight_in[layer];
    if (dropout.active) {
      // The window's factors once for both: dx first, then dW_in on the factors times x.
      const at::Tensor window_factors =
          dropout_factors(dropout, 0, batch, dropout.window_site(layer), shape.split_size, options);
      if (output_mask[0]) {
        const at::Tensor grad_window = at::mm(grad_z, a).mul_(window_factors);
        for (const WindowPiece& piece : window_pieces(shape, layer)) {
          grads[0].narrow(1, piece.input_start, piece.length)
              .add_(grad_window.narrow(1, piece.weight_start, piece.length));
        }
      }
      if (output_mask[1]) {
        at::Tensor slot = grads[1][layer];
        at::mm_out(slot, grad_z.t(), multiply_window(window_factors, x, shape, layer));
      }
    } else {
      for (const WindowPiece& piece : window_pieces(shape, layer)) {
        if (output_mask[1]) {
          at::Tensor slot = grads[1][layer].narrow(1, piece.weight_start, piece.length);
          at::mm_out(slot, grad_z.t(), x.narrow(1, piece.input_start, piece.length));
        }
        if (output_mask[0]) {
          at::Tensor slot = grads[0].narrow(1, piece.input_start, piece.length);
          at::addmm_out(slot, slot, grad_z, a.narrow(1, piece.weight_start, piece.length));
        }
      }
    }
    if (layer == 0) break;
    const at::Tensor previous = hidden_states.narrow(1, column - width, width);
    const at::Tensor factors = dropout.active
                                   ? dropout_factors(dropout, 0, batch, dropout.hidden_site(layer), width, options)
                                   : at::Tensor();
    if (output_mask[2]) {
      at::Tensor slot = grads[2][layer - 1];
      at::mm_out(slot, grad_z.t(), dropout.active ? previous * factors : previous);
    }
    at::Tensor grad_previous = grad_hidden.narrow(1, column - width, width);
    if (dropout.active) {
      grad_previous.addcmul_(at::mm(grad_z, weight_hidden[layer - 1]), factors);
    } else {
      at::addmm_out(grad_previous, grad_previous, grad_z, weight_hidden[layer - 1]);
    }
  }
  return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[6], grads[7]};
}

TORCH_LIBRARY_IMPL(spinal_ops, CPU, m) {
  m.impl("normed_forward", &normed_forward);
  m.impl("normed_backward", &normed_backward);
}

// ATen's calls on CUDA tensors run cuBLAS and ATen's CUDA kernels; the dropout factors' CUDA kernel
// is registered by csrc/cuda/dropout_factors.cu when the extension is built with nvcc.
TORCH_LIBRARY_IMPL(spinal_ops, CUDA, m) {
  m.impl("normed_forward", &normed_forward);
  m.impl("normed_backward", &normed_backward);
}

}  // namespace spinal_ops::chain

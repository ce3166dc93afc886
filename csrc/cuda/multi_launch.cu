// Multi-launch path of the CUDA op for layers too wide for the fused kernels (w > kFusedMaxWidth):
// one cuBLAS GEMM per term and per layer through ATen, computed in fp32 (opmath) for fp16/bf16.
// It rounds Z, h and dz to the storage dtype at the same points as the fused kernels, so both
// paths give the same numbers up to summation order. Host code only: no kernel of its own.
#include <ATen/ATen.h>

#include "kernels.h"

namespace spinal_ops {
namespace cuda_kernels {
namespace {

at::Tensor activation_forward(Activation act, const at::Tensor& z, double slope) {
  switch (act) {
    case Activation::ReLU:
      return at::relu(z);
    case Activation::LeakyReLU:
      return at::leaky_relu(z, slope);
    case Activation::GELU:
      return at::gelu(z, "none");
    case Activation::GELUTanh:
      return at::gelu(z, "tanh");
    case Activation::SiLU:
      return at::silu(z);
    case Activation::Tanh:
      return at::tanh(z);
    case Activation::Sigmoid:
      return at::sigmoid(z);
    case Activation::Identity:
    default:
      return z;
  }
}

// grad * phi'(z)
at::Tensor activation_backward(Activation act, const at::Tensor& grad, const at::Tensor& z, double slope) {
  switch (act) {
    case Activation::ReLU:
      return at::threshold_backward(grad, z, 0);
    case Activation::LeakyReLU:
      return at::leaky_relu_backward(grad, z, slope, false);
    case Activation::GELU:
      return at::gelu_backward(grad, z, "none");
    case Activation::GELUTanh:
      return at::gelu_backward(grad, z, "tanh");
    case Activation::SiLU:
      return at::silu_backward(grad, z);
    case Activation::Tanh:
      return at::tanh_backward(grad, at::tanh(z));
    case Activation::Sigmoid:
      return at::sigmoid_backward(grad, at::sigmoid(z));
    case Activation::Identity:
    default:
      return grad;
  }
}

// Rounds an fp32 tensor through the storage dtype (no-op for float32).
at::Tensor round_to(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).to(at::kFloat); }

// The [B, s] window of layer `layer` (two slices joined when it wraps past N) and its ranges.
struct WindowRange {
  int64_t column, position, length;  // x[:, column:column+length] is window[:, position:position+length]
};

std::vector<WindowRange> window_ranges(const SpinalShape& shape, int64_t layer) {
  const int64_t start = shape.window_start(layer), head = shape.window_head(layer);
  std::vector<WindowRange> ranges{{start, 0, head}};
  if (head < shape.split_size) ranges.push_back({0, head, shape.split_size - head});
  return ranges;
}

at::Tensor input_window(const at::Tensor& x, const SpinalShape& shape, int64_t layer) {
  std::vector<at::Tensor> pieces;
  for (const auto& r : window_ranges(shape, layer)) pieces.push_back(x.narrow(1, r.column, r.length));
  return pieces.size() == 1 ? pieces[0] : at::cat(pieces, 1);
}

at::Tensor to_float(const at::Tensor& t) { return t.to(at::kFloat); }

// phi(Z) as the fused kernels see it: Z and h rounded to the storage dtype.
at::Tensor hidden_from_pre_activation(const at::Tensor& pre_activation, Activation act, double slope) {
  return round_to(activation_forward(act, to_float(pre_activation), slope), pre_activation.scalar_type());
}

}  // namespace

void multi_launch_forward(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
                          const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                          Activation act, double negative_slope, const at::Tensor& out,
                          const at::Tensor& pre_activation) {
  const int64_t w = shape.layer_width;
  const at::Tensor xf = to_float(x), w_in = to_float(weight_in), w_hidden = to_float(weight_hidden);
  at::Tensor h_prev;
  for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
    at::Tensor z = at::mm(input_window(xf, shape, layer), w_in[layer].t());
    if (bias) z.add_(to_float((*bias)[layer]));
    if (layer > 0) z.addmm_(h_prev, w_hidden[layer - 1].t());
    at::Tensor z_stored = pre_activation.narrow(1, layer * w, w);
    z_stored.copy_(z);
    h_prev = hidden_from_pre_activation(z_stored, act, negative_slope);
  }
  const at::Tensor hidden = hidden_from_pre_activation(pre_activation, act, negative_slope);
  if (!weight_out) {
    out.copy_(hidden);
    return;
  }
  at::Tensor y = at::mm(hidden, to_float(*weight_out).t());
  if (bias_out) y.add_(to_float(*bias_out));
  out.copy_(y);
}

void multi_launch_backward(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& pre_activation, const at::Tensor& weight_in,
                           const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
                           Activation act, double negative_slope, const BackwardOutputs& grads) {
  const auto dtype = x.scalar_type();
  const int64_t w = shape.layer_width;
  const at::Tensor g = to_float(grad_out), xf = to_float(x), z_all = to_float(pre_activation);
  const at::Tensor w_in = to_float(weight_in), w_hidden = to_float(weight_hidden);
  const at::Tensor hidden = hidden_from_pre_activation(pre_activation, act, negative_slope);
  const at::Tensor grad_hidden = weight_out ? at::mm(g, to_float(*weight_out)) : g;
  at::Tensor grad_x = at::zeros_like(xf);
  at::Tensor dz_next;
  for (int64_t layer = shape.num_layers - 1; layer >= 0; --layer) {
    at::Tensor dh = grad_hidden.narrow(1, layer * w, w);
    if (layer + 1 < shape.num_layers) dh = dh + at::mm(dz_next, w_hidden[layer]);
    const at::Tensor dz =
        round_to(activation_backward(act, dh, z_all.narrow(1, layer * w, w), negative_slope), dtype);
    grads.grad_weight_in[layer].copy_(at::mm(dz.t(), input_window(xf, shape, layer)));
    const at::Tensor dx_window = at::mm(dz, w_in[layer]);
    for (const auto& r : window_ranges(shape, layer)) {
      grad_x.narrow(1, r.column, r.length).add_(dx_window.narrow(1, r.position, r.length));
    }
    if (layer > 0) grads.grad_weight_hidden[layer - 1].copy_(at::mm(dz.t(), hidden.narrow(1, (layer - 1) * w, w)));
    if (shape.has_bias) grads.grad_bias[layer].copy_(dz.sum(0));
    dz_next = dz;
  }
  grads.grad_x.copy_(grad_x);
  if (weight_out) {
    grads.grad_weight_out.copy_(at::mm(g.t(), hidden));
    if (shape.has_bias) grads.grad_bias_out.copy_(g.sum(0));
  }
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

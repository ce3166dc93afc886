// Helpers shared by the CPU forward and backward kernels (csrc/cpu/*.cpp).
//
// The kernels do their matrix products with ATen's BLAS-backed mm/addmm and their elementwise
// work (phi, phi') with ATen's out= kernels, all writing straight into column slices of row-major
// [B, L*w] buffers (leading dimension L*w, no copies).
#pragma once

#include <ATen/ATen.h>
#include <torch/types.h>

#include <array>

#include "../activation.h"
#include "../spinal_shape.h"

namespace spinal_ops::cpu {

// One contiguous run of a layer's input window: input columns [input_start, input_start + length)
// are multiplied by weight_in columns [weight_start, weight_start + length).
struct WindowPiece {
  int64_t input_start;
  int64_t weight_start;
  int64_t length;
};

// The window of `layer` as one piece, or two when it wraps past column N-1.
struct Window {
  std::array<WindowPiece, 2> pieces;
  int count;
  const WindowPiece* begin() const { return pieces.data(); }
  const WindowPiece* end() const { return pieces.data() + count; }
};

inline Window layer_window(const SpinalShape& shape, int64_t layer) {
  const int64_t start = shape.window_start(layer);
  const int64_t head = shape.window_head(layer);
  Window window{{WindowPiece{start, 0, head}, WindowPiece{0, head, shape.split_size - head}}, 1};
  if (head < shape.split_size) window.count = 2;
  return window;
}

// Columns [layer*w, (layer+1)*w) of a [B, L*w] buffer: the slice that belongs to `layer`.
inline at::Tensor layer_columns(const at::Tensor& buffer, const SpinalShape& shape, int64_t layer) {
  return buffer.narrow(1, layer * shape.layer_width, shape.layer_width);
}

// out = start + a @ b, where start is out itself, or, for the first product of a sum, the
// broadcast bias (zero without one): the sum is built in place without a zero-fill pass.
inline void add_product(at::Tensor& out, bool first, const std::optional<at::Tensor>& bias, const at::Tensor& a,
                        const at::Tensor& b) {
  if (!first) {
    out.addmm_(a, b);
  } else if (bias) {
    at::addmm_out(out, *bias, a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// Kernels compute in float32 or float64; bfloat16 tensors are upcast to float32 on entry and
// the results rounded once on exit (fp32 accumulation, no bf16 GEMM on CPUs without AVX512-BF16).
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? at::kFloat : dtype;
}

inline at::Tensor to_compute(const at::Tensor& t) {
  return t.to(compute_dtype(t.scalar_type())).contiguous();
}

inline void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "spinal_ops: the CPU kernels need CPU tensors, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "spinal_ops: the CPU kernels support float32, float64 and bfloat16, got ", dtype);
}

// h = phi(z) for [B, cols] column slices (h may be z itself). ATen's vectorized out= kernels
// write straight into the strided slice; they are also the definition of phi the reference
// backend uses, so both backends agree on NaN/Inf handling.
inline void apply_activation(at::Tensor h, const at::Tensor& z, Activation act, double negative_slope) {
  switch (act) {
    case Activation::ReLU: at::clamp_min_out(h, z, 0); return;  // torch.relu: NaN stays NaN
    case Activation::LeakyReLU: at::leaky_relu_out(h, z, negative_slope); return;
    case Activation::GELU: at::gelu_out(h, z, "none"); return;
    case Activation::GELUTanh: at::gelu_out(h, z, "tanh"); return;
    case Activation::SiLU: at::silu_out(h, z); return;
    case Activation::Tanh: at::tanh_out(h, z); return;
    case Activation::Sigmoid: at::sigmoid_out(h, z); return;
    case Activation::Identity: h.copy_(z); return;
  }
}

// dz *= phi'(z) in place, for [B, cols] column slices; h = phi(z) (tanh and sigmoid use it).
// These are the backward kernels autograd runs for the reference backend.
inline void multiply_by_activation_grad(at::Tensor dz, const at::Tensor& z, const at::Tensor& h,
                                        Activation act, double negative_slope) {
  switch (act) {
    case Activation::ReLU: at::threshold_backward_out(dz, dz, z, 0); return;
    case Activation::LeakyReLU: at::leaky_relu_backward_out(dz, dz, z, negative_slope, false); return;
    case Activation::GELU: at::gelu_backward_out(dz, dz, z, "none"); return;
    case Activation::GELUTanh: at::gelu_backward_out(dz, dz, z, "tanh"); return;
    case Activation::SiLU: at::silu_backward_out(dz, dz, z); return;
    case Activation::Tanh: at::tanh_backward_out(dz, dz, h); return;
    case Activation::Sigmoid: at::sigmoid_backward_out(dz, dz, h); return;
    case Activation::Identity: return;
  }
}

}  // namespace spinal_ops::cpu

// Helpers shared by the CPU forward and backward kernels (csrc/cpu/*.cpp).
//
// The kernels do their matrix products with ATen's BLAS-backed mm/addmm writing straight into
// column slices of row-major [B, L*w] buffers (leading dimension L*w, no copies), and their
// elementwise work (phi, phi') with the loops below, parallel over rows.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <array>
#include <type_traits>

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

// Calls f(std::integral_constant<Activation, act>{}) so that phi and phi' are compile-time
// selected inside the elementwise loops instead of switching per element.
template <typename F>
void with_activation(Activation act, F&& f) {
  using A = Activation;
  switch (act) {
    case A::ReLU: return f(std::integral_constant<A, A::ReLU>{});
    case A::LeakyReLU: return f(std::integral_constant<A, A::LeakyReLU>{});
    case A::GELU: return f(std::integral_constant<A, A::GELU>{});
    case A::GELUTanh: return f(std::integral_constant<A, A::GELUTanh>{});
    case A::SiLU: return f(std::integral_constant<A, A::SiLU>{});
    case A::Tanh: return f(std::integral_constant<A, A::Tanh>{});
    case A::Sigmoid: return f(std::integral_constant<A, A::Sigmoid>{});
    case A::Identity: return f(std::integral_constant<A, A::Identity>{});
  }
}

// Runs op(out_row, in_row, cols) over the rows of two [rows, cols] views with unit column stride
// (row strides may differ: slices of wider buffers), in parallel over row blocks of at least
// ATen's GRAIN_SIZE elements (smaller work is not worth waking a second thread).
template <typename scalar_t, typename RowOp>
void for_each_row(const at::Tensor& out, const at::Tensor& in, RowOp op) {
  TORCH_INTERNAL_ASSERT(out.sizes() == in.sizes() && out.stride(1) == 1 && in.stride(1) == 1);
  const int64_t rows = out.size(0), cols = out.size(1);
  const int64_t out_ld = out.stride(0), in_ld = in.stride(0);
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const scalar_t* in_data = in.const_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op(out_data + r * out_ld, in_data + r * in_ld, cols);
  });
}

// h = phi(z) for [B, cols] views (h may be z itself).
inline void apply_activation(const at::Tensor& h, const at::Tensor& z, Activation act, double negative_slope) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "spinal_ops_apply_activation", [&] {
    const auto slope = static_cast<scalar_t>(negative_slope);
    with_activation(act, [&](auto act_c) {
      for_each_row<scalar_t>(h, z, [slope](scalar_t* h_row, const scalar_t* z_row, int64_t cols) {
        for (int64_t j = 0; j < cols; ++j) h_row[j] = activate<scalar_t>(decltype(act_c)::value, z_row[j], slope);
      });
    });
  });
}

// dz *= phi'(z) for [B, cols] views.
inline void multiply_by_activation_grad(const at::Tensor& dz, const at::Tensor& z, Activation act,
                                        double negative_slope) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "spinal_ops_activation_grad", [&] {
    const auto slope = static_cast<scalar_t>(negative_slope);
    with_activation(act, [&](auto act_c) {
      for_each_row<scalar_t>(dz, z, [slope](scalar_t* dz_row, const scalar_t* z_row, int64_t cols) {
        for (int64_t j = 0; j < cols; ++j)
          dz_row[j] *= activate_grad<scalar_t>(decltype(act_c)::value, z_row[j], slope);
      });
    });
  });
}

}  // namespace spinal_ops::cpu

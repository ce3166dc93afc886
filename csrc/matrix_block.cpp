// GEMMs and activations on blocks (see matrix_block.h).
#include "matrix_block.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "aten_chain.h"
#include "cpu/blas.h"
#include "cpu/skinny_product.h"
#include "cpu/tile_gemm.h"

namespace spinal_ops::chain {
namespace {

// Whether a block's rows are contiguous (row-major) or its columns are (a transposed row-major
// matrix); BLAS reads either.
bool unit_column_stride(const Block& b) { return b.col_stride == 1 || b.cols <= 1; }
bool unit_row_stride(const Block& b) { return b.row_stride == 1 || b.rows <= 1; }

template <typename T>
T* data(const Block& b) {
  return b.base->data_ptr<T>() + b.offset;
}

// The ATen GEMM on views: what every device and dtype can run.
void aten_gemm(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a, const Block& b) {
  at::Tensor out = c.view();
  const at::Tensor left = a.view(), right = b.view();
  if (accumulate) {
    out.addmm_(left, right);
  } else if (bias) {
    at::addmm_out(out, bias->view(), left, right);  // [1, n]: broadcast over the rows
  } else {
    at::mm_out(out, left, right);
  }
}

// c = bias + a @ b with few columns (b the transpose of a row-major [n, k] matrix: the output
// projection's W_out^T) on the AVX2 kernel of cpu/skinny_product.h, where BLAS is slow (MKL: 29
// GFLOP/s at [64, 512] @ [512, 10]). vgg5 inference at batch 64 took 0.95 of its time with it, a
// training step 0.97 (1 thread, alternating processes). False where it does not apply. Called by
// direct_block_gemm, which has checked c's and the bias's strides.
bool skinny_block_gemm(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a,
                       const Block& b) {
  if (accumulate || c.cols > cpu::kSkinnyMaxColumns || !unit_column_stride(a) || b.row_stride != 1) return false;
  return cpu::skinny_product(data<float>(a), a.row_stride, c.rows, a.cols, data<float>(b), b.col_stride, c.cols,
                             bias ? data<float>(*bias) : nullptr, data<float>(c), c.row_stride);
}

// c = start + a @ b on the register-tiled kernel of cpu/tile_gemm.h, for the products small
// enough that BLAS's packing of both operands costs more than it saves (tile_gemm_fits). False
// where it does not apply. Called by direct_block_gemm, which has checked c's and the bias's strides.
bool tile_block_gemm(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a,
                     const Block& b) {
  if (!cpu::tile_gemm_fits(c.rows, c.cols, a.cols)) return false;
  return cpu::tile_gemm(c.rows, c.cols, a.cols, {data<float>(a), a.row_stride, a.col_stride},
                        {data<float>(b), b.row_stride, b.col_stride}, data<float>(c), c.row_stride, accumulate,
                        bias ? data<float>(*bias) : nullptr);
}

template <typename T>
bool direct_block_gemm(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a,
                       const Block& b) {
  if (!unit_column_stride(c) || (bias && !unit_column_stride(*bias))) return false;
  if (!(unit_column_stride(a) || unit_row_stride(a)) || !(unit_column_stride(b) || unit_row_stride(b))) return false;
  if (!cpu::has_direct_gemm(c.base->scalar_type())) return false;
  if constexpr (std::is_same_v<T, float>) {
    if (skinny_block_gemm(c, accumulate, bias, a, b)) return true;
    if (tile_block_gemm(c, accumulate, bias, a, b)) return true;
  }
  const bool a_transposed = !unit_column_stride(a), b_transposed = !unit_column_stride(b);
  const int64_t lda = a_transposed ? std::max(a.col_stride, a.rows) : std::max(a.row_stride, a.cols);
  const int64_t ldb = b_transposed ? std::max(b.col_stride, b.rows) : std::max(b.row_stride, b.cols);
  T* out = data<T>(c);
  T beta = accumulate ? T(1) : T(0);
  if (!accumulate && bias) {
    const T* row = data<T>(*bias);
    for (int64_t i = 0; i < c.rows; ++i) std::memcpy(out + i * c.row_stride, row, c.cols * sizeof(T));
    beta = T(1);
  }
  return cpu::direct_gemm<T>(a_transposed, b_transposed, c.rows, c.cols, a.cols, T(1), data<T>(a), lda, data<T>(b),
                             ldb, beta, out, std::max(c.row_stride, c.cols));
}

// (The data pointers are read once: data_ptr checks the dtype on every call, ~1 % of a vgg5
// training step at batch 64 when read per row.)
template <typename T>
void activation_rows(const Block& h, const Block& z, Activation act, T slope) {
  const T* z_data = data<T>(z);
  T* h_data = data<T>(h);
  for (int64_t i = 0; i < z.rows; ++i) {
    const T* in = z_data + i * z.row_stride;
    T* out = h_data + i * h.row_stride;
    switch (act) {
      // NaN passes through both, as through ATen's clamp_min and leaky_relu.
      case Activation::ReLU:
        for (int64_t j = 0; j < z.cols; ++j) out[j] = in[j] < T(0) ? T(0) : in[j];
        break;
      case Activation::LeakyReLU:
        for (int64_t j = 0; j < z.cols; ++j) out[j] = in[j] > T(0) ? in[j] : in[j] * slope;
        break;
      default:  // identity
        if (out != in) std::memcpy(out, in, z.cols * sizeof(T));
    }
  }
}

template <typename T>
void activation_grad_rows(const Block& dz, const Block& z, Activation act, T slope) {
  const T* z_data = data<T>(z);
  T* dz_data = data<T>(dz);
  for (int64_t i = 0; i < z.rows; ++i) {
    const T* in = z_data + i * z.row_stride;
    T* grad = dz_data + i * dz.row_stride;
    // As ATen's threshold_backward (zero where z <= 0: a NaN z passes the gradient) and
    // leaky_relu_backward (the slope where z > 0 is false: NaN too).
    if (act == Activation::ReLU) {
      for (int64_t j = 0; j < z.cols; ++j) grad[j] = in[j] <= T(0) ? T(0) : grad[j];
    } else {
      for (int64_t j = 0; j < z.cols; ++j) grad[j] = in[j] > T(0) ? grad[j] : grad[j] * slope;
    }
  }
}

bool on_cpu_in(const Block& b, std::initializer_list<at::ScalarType> dtypes) {
  return b.base->is_cpu() && std::find(dtypes.begin(), dtypes.end(), b.base->scalar_type()) != dtypes.end();
}

}  // namespace

void block_gemm(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a, const Block& b) {
  bool done = false;
  if (on_cpu_in(c, {at::kFloat})) done = direct_block_gemm<float>(c, accumulate, bias, a, b);
  if (on_cpu_in(c, {at::kDouble})) done = direct_block_gemm<double>(c, accumulate, bias, a, b);
  if (!done) aten_gemm(c, accumulate, bias, a, b);
}

void block_activation(const Block& h, const Block& z, Activation act, double negative_slope) {
  const bool simple = act == Activation::ReLU || act == Activation::LeakyReLU || act == Activation::Identity;
  if (simple && unit_column_stride(h) && unit_column_stride(z)) {
    if (on_cpu_in(z, {at::kFloat})) return activation_rows<float>(h, z, act, static_cast<float>(negative_slope));
    if (on_cpu_in(z, {at::kDouble})) return activation_rows<double>(h, z, act, negative_slope);
  }
  apply_activation(h.view(), z.view(), act, negative_slope);
}

void block_activation_grad(const Block& dz, const Block& z, const Block& h, Activation act, double negative_slope) {
  if (act == Activation::Identity) return;
  if ((act == Activation::ReLU || act == Activation::LeakyReLU) && unit_column_stride(dz) && unit_column_stride(z)) {
    if (on_cpu_in(z, {at::kFloat})) return activation_grad_rows<float>(dz, z, act, static_cast<float>(negative_slope));
    if (on_cpu_in(z, {at::kDouble})) return activation_grad_rows<double>(dz, z, act, negative_slope);
  }
  multiply_by_activation_grad(dz.view(), z.view(), h.base ? h.view() : at::Tensor(), act, negative_slope);
}

}  // namespace spinal_ops::chain

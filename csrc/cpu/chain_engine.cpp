// The CPU's engine for the hoisted chain (see chain_engine.h).
#include "chain_engine.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>

#include "bf16_tile_gemm.h"
#include "blas.h"
#include "narrow_recurrence.h"
#include "skinny_product.h"
#include "tile_gemm.h"

namespace spinal_ops::cpu {
namespace {

using chain::Block;

// Inference runs row blocks of a [rows, L*w] buffer of at most this many elements: 1M elements
// (4 MB of float32) stay in cache between the GEMMs that write and read a block.
constexpr int64_t kInferenceBlockElements = int64_t{1} << 20;
// Training runs the forward and the backward's recurrence in row blocks of at most this many
// elements (512 KB of float32), so that each activation pass reads its slot while it is still
// cached from the GEMM that wrote it: vgg5 trains ~10 % faster than over the whole batch, the
// wider presets are even (`spinal-bench --preset vgg5 cnn_cifar resnet_head cifar_vgg --batch 4096
// --mode train --backends cpu --threads 1`, against a build with this set to 0).
constexpr int64_t kTrainingBlockElements = int64_t{1} << 17;
// Dropout factors in row blocks of at most this many elements (256 KB of float32, in L2): written
// and read back from cache by the products that share them instead of from memory (mnist, batch
// 4096, p = 0.5, train step at 1 thread: factors of the whole batch per use cost ~10 ms of memory
// traffic, ~30 % of the step; `python benchmarks/dropout_cost.py --preset mnist vgg5 --batch 64
// 4096 --threads 1` against a build with this set to 0).
constexpr int64_t kDropoutBlockElements = int64_t{1} << 16;

// Layers of w above kWidestGroupedLayer are never grouped by window: a GEMM that wide runs near
// BLAS peak alone, and the weights' regrouping copies cost more than grouping gains (resnet_head,
// batch 64: ~25 % of the forward). Layers of w up to kWidestAlwaysGroupedLayer are always grouped
// (mnist, w = 8: 3x faster input products); in between only from batch kGroupingMinBatch on, where
// the wider GEMMs save more than the copies cost (vgg5, w = 128, batch 64: ~3 % faster
// ungrouped). Reproduce: `spinal-bench --preset resnet_head vgg5 mnist --batch 64 512 --backends
// cpu --threads 1` against a build whose groups_layers returns true (or false); the GEMMs alone
// in both arrangements: `python benchmarks/gemms_alone.py --preset resnet_head vgg5 --batch 64 512`.
constexpr int64_t kWidestGroupedLayer = 255;
constexpr int64_t kWidestAlwaysGroupedLayer = 127;
constexpr int64_t kGroupingMinBatch = 512;

bool groups_layers(const SpinalShape& shape) {
  const int64_t w = shape.layer_width;
  return w <= kWidestAlwaysGroupedLayer || (w <= kWidestGroupedLayer && shape.batch >= kGroupingMinBatch);
}

// The bfloat16 chain (bf16_chain_engine) groups layers up to kWidestGroupedLayer at every batch:
// against ATen's engine, which always groups, ungrouped w = 256 layers ran resnet_head at batch 64
// 1.34x/1.35x/1.09x faster than the eager reference (train/frozen/infer) instead of
// 1.16x/1.14x/0.94x, and cnn_cifar's inference 1.07x instead of 0.99x, while vgg5 (w = 128) at
// batch 64 ran 1.64x/1.33x (train/infer) ungrouped against 1.88x/1.47x grouped; at batch 4096 the
// arrangements were even within noise (`spinal-bench --preset vgg5 cifar_vgg cnn_cifar
// resnet_head --batch 64 4096 --backends cpu reference dense --dtype bfloat16 --threads 1
// --min-run-time 0.3`, against a build whose bf16_chain_engine is ATen's engine as it is, and
// one with the CPU engine's groups_layers).
bool bf16_groups_layers(const SpinalShape& shape) { return shape.layer_width <= kWidestGroupedLayer; }

// Whether a block's rows are contiguous (row-major) or its columns are (a transposed row-major
// matrix); BLAS reads either.
bool unit_column_stride(const Block& b) { return b.col_stride == 1 || b.cols <= 1; }
bool unit_row_stride(const Block& b) { return b.row_stride == 1 || b.rows <= 1; }

// c = bias + a @ b with few columns (b the transpose of a row-major [n, k] matrix: the output
// projection's W_out^T) on skinny_product.h's kernel, where BLAS is slow. False where it does not
// apply. Called by direct_gemm_block, which has checked c's and the bias's strides.
bool skinny_gemm(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a, const Block& b) {
  if (accumulate || c.cols > kSkinnyMaxColumns || !unit_column_stride(a) || b.row_stride != 1) return false;
  return skinny_product(a.data<float>(), a.row_stride, c.rows, a.cols, b.data<float>(), b.col_stride, c.cols,
                        bias ? bias->data<float>() : nullptr, c.data<float>(), c.row_stride);
}

// c = start + a @ b on tile_gemm.h's kernel for the products it runs faster than BLAS
// (tile_gemm_fits). False where it does not apply. Called by direct_gemm_block, which has checked
// c's and the bias's strides.
bool tile_gemm_block(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a,
                     const Block& b) {
  if (!tile_gemm_fits(c.rows, c.cols, a.cols)) return false;
  return tile_gemm(c.rows, c.cols, a.cols, {a.data<float>(), a.row_stride, a.col_stride},
                   {b.data<float>(), b.row_stride, b.col_stride}, c.data<float>(), c.row_stride, accumulate,
                   bias ? bias->data<float>() : nullptr);
}

template <typename T>
bool direct_gemm_block(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a,
                       const Block& b) {
  if (!unit_column_stride(c) || (bias && !unit_column_stride(*bias))) return false;
  if (!(unit_column_stride(a) || unit_row_stride(a)) || !(unit_column_stride(b) || unit_row_stride(b))) return false;
  if (!has_direct_gemm(c.base->scalar_type())) return false;
  if constexpr (std::is_same_v<T, float>) {
    if (skinny_gemm(c, accumulate, bias, a, b)) return true;
    if (tile_gemm_block(c, accumulate, bias, a, b)) return true;
  }
  const bool a_transposed = !unit_column_stride(a), b_transposed = !unit_column_stride(b);
  const int64_t lda = a_transposed ? std::max(a.col_stride, a.rows) : std::max(a.row_stride, a.cols);
  const int64_t ldb = b_transposed ? std::max(b.col_stride, b.rows) : std::max(b.row_stride, b.cols);
  T* out = c.data<T>();
  T beta = accumulate ? T(1) : T(0);
  if (!accumulate && bias) {
    const T* row = bias->data<T>();
    for (int64_t i = 0; i < c.rows; ++i) std::memcpy(out + i * c.row_stride, row, c.cols * sizeof(T));
    beta = T(1);
  }
  return direct_gemm<T>(a_transposed, b_transposed, c.rows, c.cols, a.cols, T(1), a.data<T>(), lda, b.data<T>(), ldb,
                        beta, out, std::max(c.row_stride, c.cols));
}

// The bfloat16 chain's products on bf16_tile_gemm.h's kernel where it runs faster than oneDNN's
// GEMM on views (bf16_tile_gemm_fits); false elsewhere (ATen's call then runs).
bool bf16_gemm_with(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a, const Block& b,
                    const Bf16Epilogue& epilogue) {
  if (!c.base->is_cpu() || c.base->scalar_type() != at::kBFloat16) return false;
  if (!unit_column_stride(c) || (bias && !unit_column_stride(*bias))) return false;
  if (!bf16_tile_gemm_fits(c.rows, c.cols, a.cols)) return false;
  using Bf16 = c10::BFloat16;
  return bf16_tile_gemm(c.rows, c.cols, a.cols, {a.data<Bf16>(), a.row_stride, a.col_stride},
                        {b.data<Bf16>(), b.row_stride, b.col_stride}, c.data<Bf16>(), c.row_stride, accumulate,
                        bias ? bias->data<Bf16>() : nullptr, epilogue);
}

bool bf16_gemm(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a, const Block& b) {
  return bf16_gemm_with(c, accumulate, bias, a, b, {});
}

// A bfloat16 recurrence step and its ReLU-like activation in one pass of the tile GEMM: the
// separate activation loops re-read a layer's [rows, w] slot, which for narrow layers (mnist,
// w = 8) costs as much as the step's product.
bool relu_like(Activation act) { return act == Activation::ReLU || act == Activation::LeakyReLU; }

bool bf16_gemm_activation(const Block& h, const Block& z, bool /*keep_z: z is stored either way*/, const Block& a,
                          const Block& b, Activation act, double negative_slope) {
  if (!relu_like(act) || !unit_column_stride(h) || h.base->scalar_type() != at::kBFloat16) return false;
  Bf16Epilogue epilogue{Bf16Epilogue::Kind::kActivation, act, static_cast<float>(negative_slope)};
  epilogue.h = h.data<c10::BFloat16>();
  epilogue.ldh = h.row_stride;
  return bf16_gemm_with(z, true, std::nullopt, a, b, epilogue);
}

bool bf16_gemm_activation_grad(const Block& dz, const Block& z, const Block& a, const Block& b, Activation act,
                               double negative_slope) {
  if (!relu_like(act) || !unit_column_stride(z) || z.base->scalar_type() != at::kBFloat16) return false;
  Bf16Epilogue epilogue{Bf16Epilogue::Kind::kActivationGrad, act, static_cast<float>(negative_slope)};
  epilogue.z = z.data<c10::BFloat16>();
  epilogue.ldz = z.row_stride;
  return bf16_gemm_with(dz, true, std::nullopt, a, b, epilogue);
}

bool gemm(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a, const Block& b) {
  if (!c.base->is_cpu()) return false;
  switch (c.base->scalar_type()) {
    case at::kFloat: return direct_gemm_block<float>(c, accumulate, bias, a, b);
    case at::kDouble: return direct_gemm_block<double>(c, accumulate, bias, a, b);
    default: return false;
  }
}

// (The data pointers are read once: data_ptr checks the dtype on every call, ~1 % of a vgg5
// training step at batch 64 when read per row.)
template <typename T, typename S>
void activation_rows(const Block& h, const Block& z, Activation act, S slope) {
  const T* z_data = z.data<T>();
  T* h_data = h.data<T>();
  for (int64_t i = 0; i < z.rows; ++i) {
    const T* in = z_data + i * z.row_stride;
    T* out = h_data + i * h.row_stride;
    switch (act) {
      // NaN passes through both, as through ATen's clamp_min and leaky_relu.
      case Activation::ReLU:
        for (int64_t j = 0; j < z.cols; ++j) out[j] = static_cast<S>(in[j]) < S(0) ? T(0) : in[j];
        break;
      case Activation::LeakyReLU:
        for (int64_t j = 0; j < z.cols; ++j) {
          const S v = static_cast<S>(in[j]);
          out[j] = v > S(0) ? in[j] : static_cast<T>(v * slope);
        }
        break;
      default:  // identity
        if (out != in) std::memcpy(out, in, z.cols * sizeof(T));
    }
  }
}

template <typename T, typename S>
void activation_grad_rows(const Block& dz, const Block& z, Activation act, S slope) {
  const T* z_data = z.data<T>();
  T* dz_data = dz.data<T>();
  for (int64_t i = 0; i < z.rows; ++i) {
    const T* in = z_data + i * z.row_stride;
    T* grad = dz_data + i * dz.row_stride;
    // As ATen's threshold_backward (zero where z <= 0: a NaN z passes the gradient) and
    // leaky_relu_backward (the slope where z > 0 is false: NaN too).
    if (act == Activation::ReLU) {
      for (int64_t j = 0; j < z.cols; ++j) grad[j] = static_cast<S>(in[j]) <= S(0) ? T(0) : grad[j];
    } else {
      for (int64_t j = 0; j < z.cols; ++j) {
        grad[j] = static_cast<S>(in[j]) > S(0) ? grad[j] : static_cast<T>(static_cast<S>(grad[j]) * slope);
      }
    }
  }
}

// bfloat16 ReLU and leaky ReLU (and their gradients) on the values' bits, in loops the compiler
// vectorises (element-wise conversions to float ran vgg5's bfloat16 inference at batch 4096 at a
// third of ATen's speed). A value is below zero when its sign is set and it is neither zero nor
// NaN; leaky ReLU's product is computed in float and rounded to nearest even, NaN kept, as ATen's
// bfloat16 kernels round.
constexpr uint16_t kMagnitude = 0x7FFF, kSign = 0x8000, kInfinity = 0x7F80;

inline bool bf16_below_zero(uint16_t v) {
  const uint16_t magnitude = v & kMagnitude;
  return (v & kSign) != 0 && magnitude != 0 && magnitude <= kInfinity;
}
inline bool bf16_at_most_zero(uint16_t v) {
  const uint16_t magnitude = v & kMagnitude;
  return magnitude == 0 || ((v & kSign) != 0 && magnitude <= kInfinity);
}
inline uint16_t bf16_scaled(uint16_t v, float slope) {
  float f;
  const uint32_t widened = uint32_t{v} << 16;
  std::memcpy(&f, &widened, sizeof(f));
  f *= slope;
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

void bf16_activation_rows(const Block& h, const Block& z, Activation act, float slope) {
  const auto* z_data = reinterpret_cast<const uint16_t*>(z.data<c10::BFloat16>());
  auto* h_data = reinterpret_cast<uint16_t*>(h.data<c10::BFloat16>());
  for (int64_t i = 0; i < z.rows; ++i) {
    const uint16_t* in = z_data + i * z.row_stride;
    uint16_t* out = h_data + i * h.row_stride;
    if (act == Activation::ReLU) {
      for (int64_t j = 0; j < z.cols; ++j) out[j] = bf16_below_zero(in[j]) ? uint16_t{0} : in[j];
    } else if (act == Activation::LeakyReLU) {
      for (int64_t j = 0; j < z.cols; ++j) out[j] = bf16_at_most_zero(in[j]) ? bf16_scaled(in[j], slope) : in[j];
    } else if (out != in) {
      std::memcpy(out, in, z.cols * sizeof(uint16_t));
    }
  }
}

void bf16_activation_grad_rows(const Block& dz, const Block& z, Activation act, float slope) {
  const auto* z_data = reinterpret_cast<const uint16_t*>(z.data<c10::BFloat16>());
  auto* dz_data = reinterpret_cast<uint16_t*>(dz.data<c10::BFloat16>());
  for (int64_t i = 0; i < z.rows; ++i) {
    const uint16_t* in = z_data + i * z.row_stride;
    uint16_t* grad = dz_data + i * dz.row_stride;
    // As the float loops: a NaN z passes ReLU's gradient and scales leaky ReLU's.
    if (act == Activation::ReLU) {
      for (int64_t j = 0; j < z.cols; ++j) grad[j] = bf16_at_most_zero(in[j]) ? uint16_t{0} : grad[j];
    } else {
      for (int64_t j = 0; j < z.cols; ++j) {
        const bool positive = !bf16_at_most_zero(in[j]) && (in[j] & kMagnitude) <= kInfinity;
        grad[j] = positive ? grad[j] : bf16_scaled(grad[j], slope);
      }
    }
  }
}

bool activation(const Block& h, const Block& z, Activation act, double negative_slope) {
  const bool simple = act == Activation::ReLU || act == Activation::LeakyReLU || act == Activation::Identity;
  if (!simple || !unit_column_stride(h) || !unit_column_stride(z) || !z.base->is_cpu()) return false;
  switch (z.base->scalar_type()) {
    case at::kFloat: activation_rows<float>(h, z, act, static_cast<float>(negative_slope)); return true;
    case at::kDouble: activation_rows<double>(h, z, act, negative_slope); return true;
    case at::kBFloat16: bf16_activation_rows(h, z, act, static_cast<float>(negative_slope)); return true;
    default: return false;
  }
}

bool activation_grad(const Block& dz, const Block& z, Activation act, double negative_slope) {
  const bool simple = act == Activation::ReLU || act == Activation::LeakyReLU;
  if (!simple || !unit_column_stride(dz) || !unit_column_stride(z) || !z.base->is_cpu()) return false;
  switch (z.base->scalar_type()) {
    case at::kFloat: activation_grad_rows<float>(dz, z, act, static_cast<float>(negative_slope)); return true;
    case at::kDouble: activation_grad_rows<double>(dz, z, act, negative_slope); return true;
    case at::kBFloat16: bf16_activation_grad_rows(dz, z, act, static_cast<float>(negative_slope)); return true;
    default: return false;
  }
}

// out (+)= a * b row by row (a dropout mask applied: b holds its factors).
template <typename T>
void multiply_rows(const Block& out, bool accumulate, const Block& a, const Block& b) {
  const T* a_data = a.data<T>();
  const T* b_data = b.data<T>();
  T* out_data = out.data<T>();
  at::parallel_for(0, out.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(out.cols, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* x = a_data + i * a.row_stride;
      const T* f = b_data + i * b.row_stride;
      T* o = out_data + i * out.row_stride;
      if (accumulate) {
        for (int64_t j = 0; j < out.cols; ++j) o[j] += x[j] * f[j];
      } else {
        for (int64_t j = 0; j < out.cols; ++j) o[j] = x[j] * f[j];
      }
    }
  });
}

bool multiply(const Block& out, bool accumulate, const Block& a, const Block& b) {
  const auto dtype = out.base->scalar_type();
  if (!out.base->is_cpu() || a.base->scalar_type() != dtype || b.base->scalar_type() != dtype) return false;
  if (!unit_column_stride(out) || !unit_column_stride(a) || !unit_column_stride(b)) return false;
  switch (dtype) {
    case at::kFloat: multiply_rows<float>(out, accumulate, a, b); return true;
    case at::kDouble: multiply_rows<double>(out, accumulate, a, b); return true;
    default: return false;
  }
}

bool runs_recurrence(const SpinalShape& shape, at::ScalarType dtype) {
  return (dtype == at::kFloat || dtype == at::kDouble) && shape.layer_width <= kNarrowRecurrenceMaxWidth;
}

chain::GemmEngine make_engine() {
  chain::GemmEngine engine;
  engine.gemm = &gemm;
  engine.activation = &activation;
  engine.activation_grad = &activation_grad;
  engine.multiply = &multiply;
  engine.runs_recurrence = &runs_recurrence;
  engine.forward_recurrence = &narrow_forward_recurrence;
  engine.backward_recurrence = &narrow_backward_recurrence;
  engine.inference_block_elements = kInferenceBlockElements;
  engine.training_block_elements = kTrainingBlockElements;
  engine.groups_layers = &groups_layers;
  engine.dropout_block_elements = kDropoutBlockElements;
  return engine;
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") != 0;
#else
  return false;
#endif
}

}  // namespace

const chain::GemmEngine& chain_engine(at::ScalarType dtype) {
  static const chain::GemmEngine engine = make_engine();
  return dtype == at::kFloat || dtype == at::kDouble ? engine : chain::aten_engine();
}

const chain::GemmEngine& bf16_chain_engine() {
  static const chain::GemmEngine engine = [] {
    chain::GemmEngine bf16 = chain::aten_engine();
    bf16.groups_layers = &bf16_groups_layers;
    if (bf16_tile_kernels_run()) {
      bf16.gemm = &bf16_gemm;
      bf16.gemm_activation = &bf16_gemm_activation;
      bf16.gemm_activation_grad = &bf16_gemm_activation_grad;
    }
    bf16.activation = &activation;
    bf16.activation_grad = &activation_grad;
    bf16.dropout_block_elements = kDropoutBlockElements;
    return bf16;
  }();
  return engine;
}

bool native_bf16_gemm() {
  static const bool enabled = [] {
    const char* setting = std::getenv("SPINAL_OPS_CPU_BF16_GEMM");
    if (setting != nullptr && std::string_view(setting) == "0") return false;
    return cpu_has_avx512_bf16() && at::hasMKLDNN();
  }();
  return enabled;
}

}  // namespace spinal_ops::cpu

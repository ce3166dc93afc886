// Fused forward of narrow layers on AVX2 (scheme in narrow_chain.h).
#include "narrow_chain.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "../message_text.h"
#include "narrow_recurrence.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPINAL_HAVE_AVX2_PATH 1
#include <immintrin.h>
// Only these functions are compiled for AVX2+FMA (the rest of the extension stays portable);
// they run only after cpu_has_avx2_fma() said yes.
#define SPINAL_AVX2 __attribute__((target("avx2,fma")))
#else
#define SPINAL_HAVE_AVX2_PATH 0
#endif

namespace spinal_ops::cpu {
namespace {

constexpr int64_t kTileRows = 4;
constexpr int64_t kLanes = 8;            // floats per ymm register
constexpr int64_t kTileGrain = 16;       // tiles per parallel task: 64 rows

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

bool cpu_has_avx2_fma() {
#if SPINAL_HAVE_AVX2_PATH
  static const bool has = [] {
    const std::string capability = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    return (capability == "AVX2" || capability == "AVX512") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

// Layers g, g+period, ... read the window starting at column (g*s) mod N; their input weights
// are packed side by side into one [s, columns] panel (columns = layers*w rounded up to 8).
struct WindowGroup {
  int64_t first_layer;
  int64_t num_layers;
  int64_t columns;       // panel width, a multiple of kLanes
  int64_t panel_offset;  // floats into Plan::input_panels
  int64_t tile_column;   // first column of the group in a tile's product buffer
  int64_t start;         // first input column of the window
  int64_t head;          // window columns before it wraps past N-1
};

// Everything a tile reads: the packed weights and the tensors' data pointers.
struct Plan {
  SpinalShape shape;
  int64_t period = 0;             // group stride: N / gcd(N, s)
  std::vector<WindowGroup> groups;
  std::vector<int64_t> layer_column;  // column of layer l in the tile's product buffer
  int64_t product_columns = 0;        // width of the product buffer (sum of the groups' panel widths)
  int64_t out_padded = 0;             // M rounded up to 8 (0 without projection)
  std::vector<float> input_panels;    // per group [s, columns]: A^T of its layers side by side
  std::vector<float> input_bias;      // [product_columns], zero where there is no bias
  int64_t width_padded = 0;           // w rounded up to 8: the recurrence's vector width
  std::vector<float> recurrent_t;     // [L-1, w, width_padded]: R_l^T, rows zero-padded
  std::vector<float> output_panel;    // [L*w, out_padded]: W_out^T
  std::vector<float> output_bias;     // [out_padded]
  const float* x = nullptr;
  float* out = nullptr;
  float* pre_activation = nullptr;    // Z, when training
  float negative_slope = 0;
};

Plan make_plan(const SpinalShape& shape, const at::Tensor& weight_in, const at::Tensor& weight_hidden,
               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight_out,
               const std::optional<at::Tensor>& bias_out) {
  Plan plan;
  plan.shape = shape;
  const int64_t n = shape.in_features, s = shape.split_size, w = shape.layer_width, num_layers = shape.num_layers;
  plan.period = n / std::gcd(n, s);
  plan.layer_column.resize(num_layers);
  const int64_t group_count = std::min(plan.period, num_layers);
  for (int64_t g = 0; g < group_count; ++g) {
    WindowGroup group{g, (num_layers - g + plan.period - 1) / plan.period, 0, 0, plan.product_columns,
                      shape.window_start(g), shape.window_head(g)};
    group.columns = round_up(group.num_layers * w, kLanes);
    group.panel_offset = s * plan.product_columns;
    plan.product_columns += group.columns;
    plan.groups.push_back(group);
  }
  plan.input_panels.assign(s * plan.product_columns, 0.f);
  plan.input_bias.assign(plan.product_columns, 0.f);
  const float* a = weight_in.const_data_ptr<float>();
  const float* b = bias ? bias->const_data_ptr<float>() : nullptr;
  for (const WindowGroup& group : plan.groups) {
    float* panel = plan.input_panels.data() + group.panel_offset;
    for (int64_t j = 0; j < group.num_layers; ++j) {
      const int64_t layer = group.first_layer + j * plan.period, column = j * w;
      plan.layer_column[layer] = group.tile_column + column;
      for (int64_t c = 0; c < w; ++c) {
        const float* a_row = a + (layer * w + c) * s;
        for (int64_t k = 0; k < s; ++k) panel[k * group.columns + column + c] = a_row[k];
        if (b) plan.input_bias[group.tile_column + column + c] = b[layer * w + c];
      }
    }
  }
  plan.width_padded = round_up(w, kLanes);
  plan.recurrent_t.assign((num_layers - 1) * w * plan.width_padded, 0.f);
  const float* r = weight_hidden.const_data_ptr<float>();
  for (int64_t layer = 0; layer + 1 < num_layers; ++layer) {
    for (int64_t j = 0; j < w; ++j) {
      for (int64_t k = 0; k < w; ++k) {
        plan.recurrent_t[(layer * w + k) * plan.width_padded + j] = r[(layer * w + j) * w + k];
      }
    }
  }
  if (weight_out) {
    const int64_t m = shape.out_features, hidden = shape.hidden();
    plan.out_padded = round_up(m, kLanes);
    plan.output_panel.assign(hidden * plan.out_padded, 0.f);
    const float* wo = weight_out->const_data_ptr<float>();
    for (int64_t o = 0; o < m; ++o) {
      for (int64_t k = 0; k < hidden; ++k) plan.output_panel[k * plan.out_padded + o] = wo[o * hidden + k];
    }
    plan.output_bias.assign(plan.out_padded, 0.f);
    if (bias_out) std::copy_n(bias_out->const_data_ptr<float>(), m, plan.output_bias.begin());
  }
  return plan;
}

#if SPINAL_HAVE_AVX2_PATH

// c[r, 0:8V) += sum_k a[r][k] * b[k, 0:8V) for the kTileRows rows: kTileRows x V accumulators in
// registers for the whole k loop, one broadcast of a per row and one load of b per vector per k.
template <int V>
SPINAL_AVX2 void panel_product(const float* const* a, int64_t depth, const float* b, int64_t ldb, float* c,
                               int64_t ldc) {
  // Loops over r and v are unrolled so that the accumulators are registers, not stack slots.
  __m256 acc[kTileRows][V];
#pragma GCC unroll 4
  for (int r = 0; r < kTileRows; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_loadu_ps(c + r * ldc + v * kLanes);
  }
  for (int64_t k = 0; k < depth; ++k) {
    __m256 bk[V];
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) bk[v] = _mm256_loadu_ps(b + k * ldb + v * kLanes);
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a[r] + k);
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(ar, bk[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kTileRows; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(c + r * ldc + v * kLanes, acc[r][v]);
  }
}

// c[r, 0:columns) += a[r, 0:depth) @ b[depth, columns] (columns a multiple of 8, = b's row stride),
// in panels of 3 vectors (12 accumulators) and a last one of 1 or 2.
SPINAL_AVX2 void tile_product(const float* const* a, int64_t depth, const float* b, int64_t columns, float* c,
                              int64_t ldc) {
  int64_t column = 0;
  for (; column + 3 * kLanes <= columns; column += 3 * kLanes) {
    panel_product<3>(a, depth, b + column, columns, c + column, ldc);
  }
  if (columns - column == 2 * kLanes) panel_product<2>(a, depth, b + column, columns, c + column, ldc);
  if (columns - column == kLanes) panel_product<1>(a, depth, b + column, columns, c + column, ldc);
}

// phi on a vector of z: ReLU, leaky ReLU and identity in registers, the others element by element.
template <Activation kAct>
SPINAL_AVX2 __m256 activate_vector(__m256 z, float negative_slope) {
  if constexpr (kAct == Activation::ReLU) {
    return _mm256_max_ps(_mm256_setzero_ps(), z);  // max returns its second operand for a NaN: kept
  } else if constexpr (kAct == Activation::LeakyReLU) {
    const __m256 positive = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ);
    return _mm256_blendv_ps(_mm256_mul_ps(z, _mm256_set1_ps(negative_slope)), z, positive);
  } else if constexpr (kAct == Activation::Identity) {
    return z;
  } else {
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, z);
    for (float& lane : lanes) lane = activate(kAct, lane, negative_slope);
    return _mm256_load_ps(lanes);
  }
}

// One row's recurrence: z_l = P_l + h_{l-1} @ R_{l-1}^T, h_l = phi(z_l), for l = 0..L-1, with z_l in
// WV vector registers (lanes past w are padding: computed, never stored). h_l goes to h[l*w:],
// z_l to z[l*w:] when z is given.
template <Activation kAct, int WV>
SPINAL_AVX2 void recurrence_row(const Plan& plan, const float* products, float* h, float* z) {
  const int64_t w = plan.shape.layer_width, padded = plan.width_padded;
  // Lanes of the last vector that hold columns (< w): masked stores write only those.
  alignas(32) int32_t lane_ids[kLanes] = {0, 1, 2, 3, 4, 5, 6, 7};
  const __m256i last_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(w - (WV - 1) * kLanes)),
                                               _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_ids)));
  alignas(32) float previous[WV * kLanes];  // h_{l-1}, read back lane by lane for the broadcasts
  for (int64_t layer = 0; layer < plan.shape.num_layers; ++layer) {
    __m256 acc[WV];
    const float* p = products + plan.layer_column[layer];
#pragma GCC unroll 4
    for (int v = 0; v < WV; ++v) acc[v] = _mm256_loadu_ps(p + v * kLanes);
    if (layer > 0) {
      const float* rt = plan.recurrent_t.data() + (layer - 1) * w * padded;
      for (int64_t k = 0; k < w; ++k) {
        const __m256 hk = _mm256_broadcast_ss(previous + k);
#pragma GCC unroll 4
        for (int v = 0; v < WV; ++v) acc[v] = _mm256_fmadd_ps(hk, _mm256_loadu_ps(rt + k * padded + v * kLanes), acc[v]);
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < WV; ++v) {
      const __m256i mask = v == WV - 1 ? last_mask : _mm256_set1_epi32(-1);
      if (z) _mm256_maskstore_ps(z + layer * w + v * kLanes, mask, acc[v]);
      const __m256 hv = activate_vector<kAct>(acc[v], plan.negative_slope);
      _mm256_maskstore_ps(h + layer * w + v * kLanes, mask, hv);
      _mm256_store_ps(previous + v * kLanes, hv);
    }
  }
}

// Scratch of one parallel task: the tile's products, hidden activations and outputs.
struct TileBuffers {
  std::vector<float> products;  // [kTileRows, product_columns]
  std::vector<float> hidden;    // [kTileRows, L*w]
  std::vector<float> outputs;   // [kTileRows, out_padded]
  explicit TileBuffers(const Plan& plan)
      // kLanes more: the recurrence loads whole vectors from a layer's w columns.
      : products(kTileRows * plan.product_columns + kLanes),
        hidden(kTileRows * plan.shape.hidden()),
        outputs(kTileRows * plan.out_padded) {}
};

template <Activation kAct>
SPINAL_AVX2 void forward_tile(const Plan& plan, int64_t first_row, TileBuffers& buffers) {
  const SpinalShape& shape = plan.shape;
  const int64_t n = shape.in_features, hidden_width = shape.hidden();
  const int64_t rows = std::min(kTileRows, shape.batch - first_row);
  const bool projection = plan.out_padded > 0;
  const float* x_rows[kTileRows];
  for (int64_t r = 0; r < kTileRows; ++r) x_rows[r] = plan.x + (first_row + std::min(r, rows - 1)) * n;

  // 1. P = bias + x[:, window] @ A^T, one panel per window group (two pieces where it wraps).
  float* products = buffers.products.data();
  for (int64_t r = 0; r < kTileRows; ++r) {
    std::memcpy(products + r * plan.product_columns, plan.input_bias.data(), plan.product_columns * sizeof(float));
  }
  for (const WindowGroup& group : plan.groups) {
    const float* panel = plan.input_panels.data() + group.panel_offset;
    const float* a[kTileRows];
    for (int64_t r = 0; r < kTileRows; ++r) a[r] = x_rows[r] + group.start;
    tile_product(a, group.head, panel, group.columns, products + group.tile_column, plan.product_columns);
    if (group.head < shape.split_size) {
      for (int64_t r = 0; r < kTileRows; ++r) a[r] = x_rows[r];
      tile_product(a, shape.split_size - group.head, panel + group.head * group.columns, group.columns,
                   products + group.tile_column, plan.product_columns);
    }
  }

  // 2. The recurrence, row by row; h_l lands in the tile's H (projection) or in out.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = first_row + r;
    float* h = projection ? buffers.hidden.data() + r * hidden_width : plan.out + row * hidden_width;
    float* z = plan.pre_activation ? plan.pre_activation + row * hidden_width : nullptr;
    const float* row_products = products + r * plan.product_columns;
    switch (plan.width_padded / kLanes) {
      case 1: recurrence_row<kAct, 1>(plan, row_products, h, z); break;
      case 2: recurrence_row<kAct, 2>(plan, row_products, h, z); break;
      case 3: recurrence_row<kAct, 3>(plan, row_products, h, z); break;
      default: recurrence_row<kAct, 4>(plan, row_products, h, z); break;
    }
  }
  if (!projection) return;

  // 3. y = b_out + H @ W_out^T.
  float* outputs = buffers.outputs.data();
  for (int64_t r = 0; r < kTileRows; ++r) {
    std::memcpy(outputs + r * plan.out_padded, plan.output_bias.data(), plan.out_padded * sizeof(float));
  }
  const float* a[kTileRows];
  for (int64_t r = 0; r < kTileRows; ++r) a[r] = buffers.hidden.data() + std::min(r, rows - 1) * hidden_width;
  tile_product(a, hidden_width, plan.output_panel.data(), plan.out_padded, outputs, plan.out_padded);
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(plan.out + (first_row + r) * shape.out_features, outputs + r * plan.out_padded,
                shape.out_features * sizeof(float));
  }
}

template <Activation kAct>
void forward_tiles(const Plan& plan) {
  const int64_t tiles = (plan.shape.batch + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, kTileGrain, [&](int64_t begin, int64_t end) {
    TileBuffers buffers(plan);
    for (int64_t tile = begin; tile < end; ++tile) forward_tile<kAct>(plan, tile * kTileRows, buffers);
  });
}

#endif  // SPINAL_HAVE_AVX2_PATH

}  // namespace

bool uses_fused_narrow_forward(const SpinalShape& shape, const at::Tensor& x) {
  return x.scalar_type() == at::kFloat && shape.layer_width <= kNarrowMaxWidth && cpu_has_avx2_fma();
}

std::tuple<at::Tensor, at::Tensor> fused_narrow_forward(const SpinalShape& shape, const at::Tensor& x,
                                                        const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::optional<at::Tensor>& weight_out,
                                                        const std::optional<at::Tensor>& bias_out, Activation act,
                                                        double negative_slope, bool keep_pre_activation) {
  TORCH_CHECK(uses_fused_narrow_forward(shape, x), "spinal_ops: the fused narrow forward needs float32, w <= ",
              text(kNarrowMaxWidth), " and a CPU with AVX2 and FMA");
  const auto options = x.options();
  at::Tensor out = at::empty({shape.batch, shape.output_width()}, options);
  at::Tensor pre_activation = keep_pre_activation ? at::empty({shape.batch, shape.hidden()}, options)
                                                  : at::empty({0}, options);
  if (shape.batch == 0) return {out, pre_activation};
#if SPINAL_HAVE_AVX2_PATH
  Plan plan = make_plan(shape, weight_in, weight_hidden, bias, weight_out, bias_out);
  plan.x = x.const_data_ptr<float>();
  plan.out = out.mutable_data_ptr<float>();
  plan.pre_activation = keep_pre_activation ? pre_activation.mutable_data_ptr<float>() : nullptr;
  plan.negative_slope = static_cast<float>(negative_slope);
  with_activation(act, [&](auto kAct) { forward_tiles<decltype(kAct)::value>(plan); });
#endif
  return {out, pre_activation};
}

}  // namespace spinal_ops::cpu

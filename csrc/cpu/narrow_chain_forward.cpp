// Narrow-chain forward on AVX2 (scheme in narrow_chain.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../chain/dropout_factors.h"
#include "../common/message_text.h"
#include "narrow_chain.h"
#include "narrow_layout.h"

namespace spinal_ops::cpu {
namespace {

constexpr int64_t kTileGrain = 16;  // tiles per parallel task: 64 rows

#if SPINAL_HAVE_AVX2_PATH

// Everything a tile reads: the packed weights and the tensors' data pointers.
struct Plan {
  SpinalShape shape;
  NarrowLayout layout;
  int64_t width_padded;               // w rounded up to 8: the recurrence's vector width
  int64_t out_padded = 0;             // M rounded up to 8 (0 without projection)
  std::vector<float> input_panels;    // per group [s, group.columns] at s * group.tile_column: A^T side by side
  std::vector<float> input_bias;      // [layout.columns], zero where there is no bias
  std::vector<float> recurrent_t;     // [L-1, w, width_padded]: R_l^T, rows zero-padded
  std::vector<float> output_panel;    // [L*w, out_padded]: W_out^T
  std::vector<float> output_bias;     // [out_padded]
  // Dropout (active only): each layer's A_l^T on its own, [L, s, width_padded], columns zero-padded:
  // a layer's input product reads its own masked window, so the groups' panels do not serve.
  const Dropout* dropout = nullptr;
  std::vector<float> layer_panels;
  const float* x = nullptr;
  float* out = nullptr;
  float* pre_activation = nullptr;    // Z, when training
  float negative_slope = 0;

  Plan(const SpinalShape& shape_, const at::Tensor& weight_in, const at::Tensor& weight_hidden,
       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight_out,
       const std::optional<at::Tensor>& bias_out)
      : shape(shape_), layout(shape_), width_padded(round_up(shape_.layer_width, kLanes)) {
    const int64_t s = shape.split_size, w = shape.layer_width, hidden = shape.hidden();
    input_panels.assign(s * layout.columns, 0.f);
    input_bias.assign(layout.columns, 0.f);
    const float* a = weight_in.const_data_ptr<float>();
    const float* b = bias ? bias->const_data_ptr<float>() : nullptr;
    for (const WindowGroup& group : layout.groups) {
      float* panel = input_panels.data() + s * group.tile_column;
      for (int64_t j = 0; j < group.num_layers; ++j) {
        const int64_t layer = layout.layer(group, j);
        // panel[k, j*w + c] = A_layer[c, k]
        transpose(a + layer * w * s, w, s, s, panel + j * w, group.columns);
        if (b) std::copy_n(b + layer * w, w, input_bias.begin() + layout.layer_column[layer]);
      }
    }
    recurrent_t.assign((shape.num_layers - 1) * w * width_padded, 0.f);
    const float* r = weight_hidden.const_data_ptr<float>();
    for (int64_t layer = 0; layer + 1 < shape.num_layers; ++layer) {
      transpose(r + layer * w * w, w, w, w, recurrent_t.data() + layer * w * width_padded, width_padded);
    }
    if (weight_out) {
      const int64_t m = shape.out_features;
      out_padded = round_up(m, kLanes);
      output_panel.assign(hidden * out_padded, 0.f);
      const float* wo = weight_out->const_data_ptr<float>();
      transpose(wo, m, hidden, hidden, output_panel.data(), out_padded);
      output_bias.assign(out_padded, 0.f);
      if (bias_out) std::copy_n(bias_out->const_data_ptr<float>(), m, output_bias.begin());
    }
  }

  void set_dropout(const Dropout& active, const at::Tensor& weight_in) {
    dropout = &active;
    const int64_t s = shape.split_size, w = shape.layer_width;
    layer_panels.assign(shape.num_layers * s * width_padded, 0.f);
    const float* a = weight_in.const_data_ptr<float>();
    for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
      transpose(a + layer * w * s, w, s, s, layer_panels.data() + layer * s * width_padded, width_padded);
    }
  }
};

// Scratch of one parallel task: the tile's products, z of one layer, hidden activations, outputs.
struct TileBuffers {
  std::vector<float> products;  // [kTileRows, layout.columns]
  std::vector<float> z;         // [kTileRows, width_padded]
  std::vector<float> hidden;    // [kTileRows, L*w]
  std::vector<float> outputs;   // [kTileRows, out_padded]
  // Dropout only: a masked input of the tile (a layer's window [kTileRows, s], h_{l-1}
  // [kTileRows, width_padded] or H [kTileRows, L*w]), one layer's input product, a row's factors.
  std::vector<float> masked;
  std::vector<float> layer_product;  // [kTileRows, width_padded]
  std::vector<float> factors;
  explicit TileBuffers(const Plan& plan)
      // kLanes more: whole vectors are read from a layer's w columns.
      : products(kTileRows * plan.layout.columns + kLanes),
        z(kTileRows * plan.width_padded),
        hidden(kTileRows * plan.shape.hidden()),
        outputs(kTileRows * plan.out_padded) {
    if (plan.dropout != nullptr) {
      const int64_t widest = std::max({plan.shape.split_size, plan.width_padded, plan.shape.hidden()});
      masked.assign(kTileRows * widest, 0.f);
      layer_product.assign(kTileRows * plan.width_padded, 0.f);
      factors.assign(widest, 0.f);
    }
  }
};

// The tile's rows (row r: global row first_row + min(r, rows - 1), as the tile's pointers) of
// `count` values at values[r] times the factors of sites first_site.., into masked[r * count + j].
void masked_rows(const Dropout& dropout, int64_t first_row, int64_t rows, const float* const* values,
                 int64_t first_site, int64_t count, TileBuffers& buffers) {
  for (int64_t r = 0; r < kTileRows; ++r) {
    float* out = buffers.masked.data() + r * count;
    if (r >= rows) {  // a repeated last row: computed, never stored
      std::copy_n(out - count, count, out);
      continue;
    }
    chain::fill_factors(dropout, first_row + r, first_site, count, buffers.factors.data());
    for (int64_t j = 0; j < count; ++j) out[j] = values[r][j] * buffers.factors[j];
  }
}

template <Activation kAct>
SPINAL_AVX2 void forward_tile(const Plan& plan, int64_t first_row, TileBuffers& buffers) {
  const SpinalShape& shape = plan.shape;
  const int64_t n = shape.in_features, hidden_width = shape.hidden(), columns = plan.layout.columns;
  const int64_t rows = std::min(kTileRows, shape.batch - first_row);
  const bool projection = plan.out_padded > 0;
  const float* x_rows[kTileRows];
  for (int64_t r = 0; r < kTileRows; ++r) x_rows[r] = plan.x + (first_row + std::min(r, rows - 1)) * n;

  // 1. P = bias + x[:, window] @ A^T, one panel product per window group (two where it wraps).
  //    With dropout one product per layer, on its window times its factors (gathered across the
  //    wrap), into the layer's columns.
  float* products = buffers.products.data();
  for (int64_t r = 0; r < kTileRows; ++r) {
    std::memcpy(products + r * columns, plan.input_bias.data(), columns * sizeof(float));
  }
  const Dropout* dropout = plan.dropout;
  const int64_t s = shape.split_size, w = shape.layer_width, padded = plan.width_padded;
  for (int64_t layer = 0; dropout != nullptr && layer < shape.num_layers; ++layer) {
    const int64_t start = shape.window_start(layer), head = shape.window_head(layer);
    float* window = buffers.masked.data();
    for (int64_t r = 0; r < kTileRows; ++r) {
      float* out = window + r * s;
      if (r >= rows) {
        std::copy_n(out - s, s, out);
        continue;
      }
      chain::fill_factors(*dropout, first_row + r, dropout->window_site(layer), s, buffers.factors.data());
      const float* f = buffers.factors.data();
      for (int64_t k = 0; k < head; ++k) out[k] = x_rows[r][start + k] * f[k];
      for (int64_t k = head; k < s; ++k) out[k] = x_rows[r][k - head] * f[k];
    }
    float* product = buffers.layer_product.data();
    std::fill(buffers.layer_product.begin(), buffers.layer_product.end(), 0.f);
    const float* a[kTileRows];
    for (int64_t r = 0; r < kTileRows; ++r) a[r] = window + r * s;
    tile_product(a, 1, s, plan.layer_panels.data() + layer * s * padded, padded, padded, product, padded);
    for (int64_t r = 0; r < kTileRows; ++r) {
      float* p = products + r * columns + plan.layout.layer_column[layer];
      for (int64_t c = 0; c < w; ++c) p[c] += product[r * padded + c];
    }
  }
  for (const WindowGroup& group : plan.layout.groups) {
    if (dropout != nullptr) break;
    const float* panel = plan.input_panels.data() + shape.split_size * group.tile_column;
    const float* a[kTileRows];
    for (int64_t r = 0; r < kTileRows; ++r) a[r] = x_rows[r] + group.start;
    tile_product(a, 1, group.head, panel, group.columns, group.columns, products + group.tile_column, columns);
    if (group.head < shape.split_size) {
      for (int64_t r = 0; r < kTileRows; ++r) a[r] = x_rows[r];
      tile_product(a, 1, shape.split_size - group.head, panel + group.head * group.columns, group.columns,
                   group.columns, products + group.tile_column, columns);
    }
  }

  // 2. The recurrence a layer at a time: z_l = P_l + h_{l-1} @ R_{l-1}^T as a panel product over
  //    the tile's rows (four independent rows hide the FMA latency), then Z and h_l = phi(z_l) row by
  //    row; h_l lands in the tile's H (projection) or in out. Lanes past w are computed, never stored.
  const __m256i last_mask = first_lanes(w - (padded - kLanes));
  float* h_rows[kTileRows];
  for (int64_t r = 0; r < kTileRows; ++r) {
    const int64_t row = std::min(r, rows - 1);
    h_rows[r] = projection ? buffers.hidden.data() + row * hidden_width : plan.out + (first_row + row) * hidden_width;
  }
  float* z_tile = buffers.z.data();
  for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
    for (int64_t r = 0; r < kTileRows; ++r) {
      std::memcpy(z_tile + r * padded, products + r * columns + plan.layout.layer_column[layer], padded * sizeof(float));
    }
    if (layer > 0) {
      const float* a[kTileRows];
      for (int64_t r = 0; r < kTileRows; ++r) a[r] = h_rows[r] + (layer - 1) * w;
      if (dropout != nullptr) {  // h_{l-1} times its factors as layer l's input
        masked_rows(*dropout, first_row, rows, a, dropout->hidden_site(layer), w, buffers);
        for (int64_t r = 0; r < kTileRows; ++r) a[r] = buffers.masked.data() + r * w;
      }
      tile_product(a, 1, w, plan.recurrent_t.data() + (layer - 1) * w * padded, padded, padded, z_tile, padded);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* z_out = plan.pre_activation ? plan.pre_activation + (first_row + r) * hidden_width + layer * w : nullptr;
      for (int64_t v = 0; v < padded; v += kLanes) {
        const bool whole = v + kLanes <= w;
        const __m256 z = _mm256_loadu_ps(z_tile + r * padded + v);
        if (z_out) store_layer_vector(z_out + v, last_mask, whole, z);
        store_layer_vector(h_rows[r] + layer * w + v, last_mask, whole, activate_vector<kAct>(z, plan.negative_slope));
      }
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
  if (dropout != nullptr) {  // H times its factors as the projection's input
    masked_rows(*dropout, first_row, rows, a, dropout->projection_site(), hidden_width, buffers);
    for (int64_t r = 0; r < kTileRows; ++r) a[r] = buffers.masked.data() + r * hidden_width;
  }
  tile_product(a, 1, hidden_width, plan.output_panel.data(), plan.out_padded, plan.out_padded, outputs,
               plan.out_padded);
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

bool narrow_chain_kernels_run() { return cpu_has_avx2_fma(); }

bool uses_narrow_chain(const SpinalShape& shape, const at::Tensor& x) {
  return x.scalar_type() == at::kFloat && shape.layer_width <= kNarrowChainMaxWidth && cpu_has_avx2_fma();
}

std::tuple<at::Tensor, at::Tensor> narrow_chain_forward(const SpinalShape& shape, const at::Tensor& x,
                                                        const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::optional<at::Tensor>& weight_out,
                                                        const std::optional<at::Tensor>& bias_out, Activation act,
                                                        double negative_slope, bool keep_pre_activation,
                                                        const Dropout& dropout) {
  TORCH_CHECK(uses_narrow_chain(shape, x), "spinal_ops: the narrow-chain forward needs float32, w <= ",
              text(kNarrowChainMaxWidth), " and a CPU with AVX2 and FMA");
  const auto options = x.options();
  at::Tensor out = at::empty({shape.batch, shape.output_width()}, options);
  at::Tensor pre_activation = keep_pre_activation ? at::empty({shape.batch, shape.hidden()}, options)
                                                  : at::empty({0}, options);
  if (shape.batch == 0) return {out, pre_activation};
#if SPINAL_HAVE_AVX2_PATH
  Plan plan(shape, weight_in, weight_hidden, bias, weight_out, bias_out);
  plan.x = x.const_data_ptr<float>();
  plan.out = out.mutable_data_ptr<float>();
  plan.pre_activation = keep_pre_activation ? pre_activation.mutable_data_ptr<float>() : nullptr;
  plan.negative_slope = static_cast<float>(negative_slope);
  if (dropout.active) plan.set_dropout(dropout, weight_in);
  with_activation(act, [&](auto kAct) { forward_tiles<decltype(kAct)::value>(plan); });
#endif
  return {out, pre_activation};
}

}  // namespace spinal_ops::cpu

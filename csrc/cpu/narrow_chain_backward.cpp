// Narrow-chain backward on AVX2 (scheme in narrow_chain.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../chain/dropout_factors.h"
#include "../chain/hoisted_chain.h"
#include "../common/message_text.h"
#include "narrow_chain.h"
#include "narrow_layout.h"

namespace spinal_ops::cpu {
namespace {

constexpr int64_t kBlockRows = 64;  // rows per block of a chunk: bounds the block buffers

// dW_in broadcasts x's window columns. Read in place, a tile walks one cache line per row, N floats
// apart, which the hardware prefetchers do not follow once x no longer stays cached from the
// forward (from 4 MB: mnist at batch 4096, 1 thread, ran the product 2.5x slower per row than at
// batch 1024). From that size each block of x is transposed first and read row by row; below it
// the transpose would cost more than it saves. The transpose reads x from memory as four-row
// streams the prefetchers do not keep ahead of, so each tile of the block's backward first asks
// for its rows of x into L2 (a training step takes ~0.97 of the time it takes without). Reproduce:
// `spinal-bench --preset mnist --batch 1024 4096 --mode train frozen --backends cpu --threads 1`
// against a build with kTransposedInputMinBytes raised (or the prefetch in backward_chunks removed).
constexpr int64_t kTransposedInputMinBytes = int64_t{4} << 20;

using chain::kGradBias;
using chain::kGradBiasOut;
using chain::kGradWeightHidden;
using chain::kGradWeightIn;
using chain::kGradWeightOut;
using chain::kGradX;

// Offsets of the gradients in one chunk's partial sums (a single float array per chunk): dW_in^T
// [split_rows, layout.columns] (group-major columns), dW_hidden [L-1, width_rows, width_padded], db
// [layout.columns], dW_out [out_rows, hidden_padded], db_out [M].
struct PartialLayout {
  int64_t weight_in, weight_hidden, bias, weight_out, bias_out, size;
};

// Whether a group's window is whole vectors of x that do not wrap (s a multiple of 8, the window
// within [0, N)): then dZ_g @ A_g of a block's full tiles goes into dx's rows in place.
bool window_is_whole_vectors(const SpinalShape& shape, const WindowGroup& group) {
  return group.head == shape.split_size && shape.split_size % kLanes == 0;
}

// The packed weights, the tensors' data pointers and what to compute.
struct BackwardPlan {
  SpinalShape shape;
  NarrowLayout layout;
  std::array<bool, 6> mask;
  bool need_dz;                      // any of dx, dW_in, dW_hidden, db
  bool need_hidden;                  // h = phi(z) for dW_hidden or dW_out
  bool windows_partition_input;      // N = (number of windows) * s: every column of x read by one group
  bool every_window_in_place;        // every group's dx is written in place (whole vectors, no wrap)
  bool transposes_input;             // dW_in reads x's blocks transposed (kTransposedInputMinBytes)
  int64_t width_padded;              // w rounded up to 8
  int64_t width_rows;                // w rounded up to kTileRows (rows of dW_hidden's partial)
  int64_t split_padded;              // s rounded up to 8
  int64_t split_rows;                // s rounded up to kTileRows (rows of dW_in^T's partial)
  int64_t hidden_padded;             // L*w rounded up to 8
  int64_t out_rows;                  // M rounded up to kTileRows (rows of dW_out's partial)
  std::vector<float> output_weights; // [M, hidden_padded]: W_out rows, zero-padded (dH = G @ W_out)
  std::vector<float> recurrent;      // [L-1, w, width_padded]: R_l rows, zero-padded (dz_l += dz_{l+1} @ R_{l+1})
  std::vector<float> input_weights;  // [layout.columns, split_padded]: A rows, group-major (dx_window += dZ_g @ A_g)
  PartialLayout partial;
  // Dropout (active only; narrow_chain.h): dW_in^T's partial then holds layer l at column
  // l * width_padded of weight_in_columns = L * width_padded (a layer's product reads its own
  // masked window, so the groups' columns do not serve).
  const Dropout* dropout = nullptr;
  int64_t weight_in_columns;
  const float* grad_out = nullptr;   // G [B, M], or dH [B, L*w] without projection
  const float* x = nullptr;
  const float* z = nullptr;          // Z [B, L*w]
  float* grad_x = nullptr;
  float negative_slope = 0;

  BackwardPlan(const SpinalShape& shape_, const at::Tensor& weight_in, const at::Tensor& weight_hidden,
               const std::optional<at::Tensor>& weight_out, const std::array<bool, 6>& mask_,
               const Dropout& dropout_)
      : shape(shape_),
        layout(shape_),
        mask(mask_),
        need_dz(mask_[kGradX] || mask_[kGradWeightIn] || mask_[kGradWeightHidden] || mask_[kGradBias]),
        need_hidden((mask_[kGradWeightHidden] && shape_.num_layers > 1) || (weight_out && mask_[kGradWeightOut])),
        windows_partition_input(static_cast<int64_t>(layout.groups.size()) * shape_.split_size == shape_.in_features),
        every_window_in_place(std::all_of(layout.groups.begin(), layout.groups.end(),
                                          [&](const WindowGroup& g) { return window_is_whole_vectors(shape_, g); })),
        transposes_input(mask_[kGradWeightIn] && !dropout_.active &&
                         shape_.batch * shape_.in_features * static_cast<int64_t>(sizeof(float)) >= kTransposedInputMinBytes),
        width_padded(round_up(shape_.layer_width, kLanes)),
        width_rows(round_up(shape_.layer_width, kTileRows)),
        split_padded(round_up(shape_.split_size, kLanes)),
        split_rows(round_up(shape_.split_size, kTileRows)),
        hidden_padded(round_up(shape_.hidden(), kLanes)),
        out_rows(round_up(shape_.out_features, kTileRows)) {
    const int64_t s = shape.split_size, w = shape.layer_width, hidden = shape.hidden();
    if (dropout_.active) dropout = &dropout_;
    weight_in_columns = dropout ? shape.num_layers * width_padded : layout.columns;
    if (weight_out) {
      output_weights.assign(shape.out_features * hidden_padded, 0.f);
      const float* wo = weight_out->const_data_ptr<float>();
      for (int64_t o = 0; o < shape.out_features; ++o) {
        std::copy_n(wo + o * hidden, hidden, output_weights.begin() + o * hidden_padded);
      }
    }
    recurrent.assign((shape.num_layers - 1) * w * width_padded, 0.f);
    const float* r = weight_hidden.const_data_ptr<float>();
    for (int64_t row = 0; row < (shape.num_layers - 1) * w; ++row) {
      std::copy_n(r + row * w, w, recurrent.begin() + row * width_padded);
    }
    if (mask[kGradX]) {
      input_weights.assign(layout.columns * split_padded, 0.f);
      const float* a = weight_in.const_data_ptr<float>();
      for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
        for (int64_t c = 0; c < w; ++c) {
          std::copy_n(a + (layer * w + c) * s, s, input_weights.begin() + (layout.layer_column[layer] + c) * split_padded);
        }
      }
    }
    partial.weight_in = 0;
    partial.weight_hidden = partial.weight_in + (mask[kGradWeightIn] ? split_rows * weight_in_columns : 0);
    partial.bias = partial.weight_hidden + (mask[kGradWeightHidden] ? (shape.num_layers - 1) * width_rows * width_padded : 0);
    partial.weight_out = partial.bias + (mask[kGradBias] ? layout.columns : 0);
    const bool projection = weight_out.has_value();
    partial.bias_out = partial.weight_out + (projection && mask[kGradWeightOut] ? out_rows * hidden_padded : 0);
    partial.size = partial.bias_out + (projection && mask[kGradBiasOut] ? shape.out_features : 0);
  }

  bool projection() const { return !output_weights.empty(); }
  // Column of layer l's dW_in^T in the partial.
  int64_t weight_in_column(int64_t layer) const {
    return dropout ? layer * width_padded : layout.layer_column[layer];
  }
  int64_t grad_out_width() const { return shape.output_width(); }
};

#if SPINAL_HAVE_AVX2_PATH

// Buffers of one parallel task, for a block of up to kBlockRows rows.
struct BlockBuffers {
  std::vector<float> grad_z;       // [kBlockRows, layout.columns], group-major; padding columns stay 0
  std::vector<float> hidden;       // [kBlockRows, hidden_padded]: h = phi(z), layer order
  std::vector<float> grad_hidden;  // [kTileRows, hidden_padded]: dH = G @ W_out of a tile
  std::vector<float> grad_z_tile;  // [kTileRows, width_padded]: one layer's dz of a tile
  std::vector<float> product;      // dZ_g @ A_g of a block's rows (dx) that are not written in place: [kBlockRows
                                   // or, when every window is, kTileRows (a last tile), split_padded]
  std::vector<float> grad_out;     // [kBlockRows, out_rows]: G of a block, zero-padded (dW_out)
  std::vector<float> input_t;      // [N, kBlockRows]: x's block transposed (plan.transposes_input)
  // Dropout only. hidden then holds h_l times its factors as layer l+1's input (dW_hidden), and
  // hidden_projection H times its factors as the projection's input (dW_out); per tile row, the
  // factors of H and of each h_{l-1} (layer l at l * width_padded, lanes past w zero); dz_{l+1} @
  // R_{l+1} of a tile before its factors scale it; per layer, the block's window factors and its
  // masked window (dW_in), [kBlockRows, s] each.
  std::vector<float> hidden_projection;
  std::vector<float> projection_factors;  // [kTileRows, L*w]
  std::vector<float> hidden_factors;      // [kTileRows, L * width_padded]
  std::vector<float> product_tile;        // [kTileRows, width_padded]
  std::vector<float> window_factors;
  std::vector<float> masked_input;
  explicit BlockBuffers(const BackwardPlan& plan)
      : grad_z(kBlockRows * plan.layout.columns + kLanes, 0.f),
        hidden(kBlockRows * plan.hidden_padded + kLanes, 0.f),
        grad_hidden(kTileRows * plan.hidden_padded + kLanes, 0.f),
        grad_z_tile(kTileRows * plan.width_padded),
        product((plan.every_window_in_place && plan.dropout == nullptr ? kTileRows : kBlockRows) * plan.split_padded),
        grad_out(kBlockRows * plan.out_rows, 0.f),
        input_t(plan.transposes_input ? plan.shape.in_features * kBlockRows : 0) {
    if (plan.dropout == nullptr) return;
    const int64_t hidden_width = plan.shape.hidden(), s = plan.shape.split_size;
    hidden_projection.assign(kBlockRows * plan.hidden_padded + kLanes, 0.f);
    projection_factors.assign(kTileRows * hidden_width, 0.f);
    hidden_factors.assign(kTileRows * plan.shape.num_layers * plan.width_padded, 0.f);
    product_tile.assign(kTileRows * plan.width_padded, 0.f);
    window_factors.assign(kBlockRows * s, 0.f);
    masked_input.assign(kBlockRows * s, 0.f);
  }
};

// A tile of up to kTileRows rows (first_row.. of the block starting at block_row): dH, h = phi(Z)
// where needed, the recurrence a layer at a time from the last one down (dz_l = (dH_l + dz_{l+1}
// @ R_{l+1}) * phi'(z_l): the product over the tile's rows, the rest row by row), written into the
// block's dZ. Lanes past w are computed, never stored.
template <Activation kAct>
SPINAL_AVX2 void backward_tile(const BackwardPlan& plan, int64_t block_row, int64_t first_row, int64_t rows,
                               BlockBuffers& buffers) {
  const SpinalShape& shape = plan.shape;
  const int64_t w = shape.layer_width, columns = plan.layout.columns;
  const int64_t out_width = plan.grad_out_width(), hidden_width = shape.hidden(), padded = plan.width_padded;
  const int64_t row0 = block_row + first_row;  // global row of the tile's first row
  const __m256i last_mask = first_lanes(w - (padded - kLanes));
  const float* grad_hidden_rows[kTileRows];
  if (plan.projection()) {
    std::fill(buffers.grad_hidden.begin(), buffers.grad_hidden.end(), 0.f);
    const float* a[kTileRows];
    for (int64_t r = 0; r < kTileRows; ++r) a[r] = plan.grad_out + (row0 + std::min(r, rows - 1)) * out_width;
    tile_product(a, 1, shape.out_features, plan.output_weights.data(), plan.hidden_padded, plan.hidden_padded,
                 buffers.grad_hidden.data(), plan.hidden_padded);
    for (int64_t r = 0; r < kTileRows; ++r) grad_hidden_rows[r] = buffers.grad_hidden.data() + r * plan.hidden_padded;
    if (plan.dropout != nullptr) {  // dH = (G @ W_out) times H's factors as the projection's input
      for (int64_t r = 0; r < kTileRows; ++r) {
        float* f = buffers.projection_factors.data() + r * hidden_width;
        chain::fill_factors(*plan.dropout, row0 + std::min(r, rows - 1), plan.dropout->projection_site(),
                            hidden_width, f);
        float* dh = buffers.grad_hidden.data() + r * plan.hidden_padded;
        for (int64_t j = 0; j < hidden_width; ++j) dh[j] *= f[j];
      }
    }
  } else {
    for (int64_t r = 0; r < kTileRows; ++r) grad_hidden_rows[r] = plan.grad_out + (row0 + std::min(r, rows - 1)) * hidden_width;
  }
  // Dropout: each tile row's factors of h_{l-1} as layer l's input (l >= 1).
  const int64_t hidden_factor_width = shape.num_layers * padded;
  if (plan.dropout != nullptr) {
    for (int64_t r = 0; r < kTileRows; ++r) {
      for (int64_t layer = 1; layer < shape.num_layers; ++layer) {
        chain::fill_factors(*plan.dropout, row0 + std::min(r, rows - 1), plan.dropout->hidden_site(layer), w,
                            buffers.hidden_factors.data() + r * hidden_factor_width + layer * padded);
      }
    }
  }
  if (plan.need_hidden) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* z = plan.z + (row0 + r) * hidden_width;
      float* hidden = buffers.hidden.data() + (first_row + r) * plan.hidden_padded;
      for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
        for (int64_t v = 0; v < padded; v += kLanes) {
          const bool whole = v + kLanes <= w;
          const __m256 zv = load_layer_vector(z + layer * w + v, last_mask, whole);
          store_layer_vector(hidden + layer * w + v, last_mask, whole, activate_vector<kAct>(zv, plan.negative_slope));
        }
      }
      if (plan.dropout == nullptr) continue;
      // H times its factors for dW_out, then h_l times those of layer l+1's input for dW_hidden.
      if (plan.projection()) {
        const float* f = buffers.projection_factors.data() + r * hidden_width;
        float* projected = buffers.hidden_projection.data() + (first_row + r) * plan.hidden_padded;
        for (int64_t j = 0; j < hidden_width; ++j) projected[j] = hidden[j] * f[j];
      }
      for (int64_t layer = 0; layer + 1 < shape.num_layers; ++layer) {
        const float* f = buffers.hidden_factors.data() + r * hidden_factor_width + (layer + 1) * padded;
        for (int64_t k = 0; k < w; ++k) hidden[layer * w + k] *= f[k];
      }
    }
  }
  if (!plan.need_dz) return;
  float* grad_z_tile = buffers.grad_z_tile.data();
  float* grad_z_rows[kTileRows];  // this tile's rows of the block's dZ (group-major)
  for (int64_t r = 0; r < kTileRows; ++r) grad_z_rows[r] = buffers.grad_z.data() + (first_row + std::min(r, rows - 1)) * columns;
  for (int64_t layer = shape.num_layers - 1; layer >= 0; --layer) {
    for (int64_t r = 0; r < kTileRows; ++r) {
      for (int64_t v = 0; v < padded; v += kLanes) {
        const __m256 dh = load_layer_vector(grad_hidden_rows[r] + layer * w + v, last_mask, v + kLanes <= w);
        _mm256_storeu_ps(grad_z_tile + r * padded + v, dh);
      }
    }
    if (layer + 1 < shape.num_layers) {  // + dz_{l+1} @ R_{l+1}, R_{l+1} = weight_hidden[l]
      const float* a[kTileRows];
      for (int64_t r = 0; r < kTileRows; ++r) a[r] = grad_z_rows[r] + plan.layout.layer_column[layer + 1];
      if (plan.dropout == nullptr) {
        tile_product(a, 1, w, plan.recurrent.data() + layer * w * padded, padded, padded, grad_z_tile, padded);
      } else {  // times the factors of h_l as layer l+1's input (lanes past w: factor 0)
        float* product = buffers.product_tile.data();
        std::fill(buffers.product_tile.begin(), buffers.product_tile.end(), 0.f);
        tile_product(a, 1, w, plan.recurrent.data() + layer * w * padded, padded, padded, product, padded);
        for (int64_t r = 0; r < kTileRows; ++r) {
          const float* f = buffers.hidden_factors.data() + r * hidden_factor_width + (layer + 1) * padded;
          for (int64_t j = 0; j < padded; ++j) grad_z_tile[r * padded + j] += product[r * padded + j] * f[j];
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* z = plan.z + (row0 + r) * hidden_width + layer * w;
      for (int64_t v = 0; v < padded; v += kLanes) {
        const bool whole = v + kLanes <= w;
        const __m256 dz = times_activation_grad<kAct>(_mm256_loadu_ps(grad_z_tile + r * padded + v),
                                                      load_layer_vector(z + v, last_mask, whole), plan.negative_slope);
        store_layer_vector(grad_z_rows[r] + plan.layout.layer_column[layer] + v, last_mask, whole, dz);
      }
    }
  }
}

// dx of a block's rows = sum over groups of dZ_g @ A_g in the window's columns, after the block's
// dZ is complete: a block product (column panels outer) keeps each panel of A_g in L1 for all the
// block's rows. Where the windows partition x's columns (N = k*s: each column read by one group)
// the products overwrite dx's rows, else the rows are zeroed and every group adds into them. A
// window of whole vectors that does not wrap is written in place; the rest (a wrapped or ragged
// window, a last tile of fewer than kTileRows rows) goes through the scratch block.
SPINAL_AVX2 void block_input_grad(const BackwardPlan& plan, int64_t block_row, int64_t rows, BlockBuffers& buffers) {
  const SpinalShape& shape = plan.shape;
  const int64_t n = shape.in_features, s = shape.split_size, columns = plan.layout.columns;
  const bool partitioned = plan.windows_partition_input;
  float* dx = plan.grad_x + block_row * n;
  if (!partitioned) {
    for (int64_t r = 0; r < rows; ++r) std::fill_n(dx + r * n, n, 0.f);
  }
  const int64_t full_rows = rows / kTileRows * kTileRows;
  for (const WindowGroup& group : plan.layout.groups) {
    const float* grad_z = buffers.grad_z.data() + group.tile_column;
    const float* weights = plan.input_weights.data() + group.tile_column * plan.split_padded;
    const int64_t depth = group.num_layers * shape.layer_width;
    int64_t first_scratch_row = 0;
    if (window_is_whole_vectors(shape, group)) {
      if (partitioned) {
        block_product<false>(grad_z, columns, full_rows, depth, weights, plan.split_padded, s, dx + group.start, n);
      } else {
        block_product<true>(grad_z, columns, full_rows, depth, weights, plan.split_padded, s, dx + group.start, n);
      }
      first_scratch_row = full_rows;
    }
    if (first_scratch_row == rows) continue;
    // Rows past `rows` of the rounded-up tile read stale dZ rows of the buffer: computed, never stored.
    float* product = buffers.product.data();
    block_product<false>(grad_z + first_scratch_row * columns, columns, round_up(rows - first_scratch_row, kTileRows),
                         depth, weights, plan.split_padded, plan.split_padded, product, plan.split_padded);
    for (int64_t r = first_scratch_row; r < rows; ++r) {
      const float* p = product + (r - first_scratch_row) * plan.split_padded;
      float* dx_row = dx + r * n;
      if (partitioned) {
        std::copy_n(p, s, dx_row + group.start);
        continue;
      }
      for (int64_t k = 0; k < group.head; ++k) dx_row[group.start + k] += p[k];
      for (int64_t k = group.head; k < s; ++k) dx_row[k - group.head] += p[k];
    }
  }
}

// Dropout: dx and dW_in of a block's rows, a layer at a time, each layer's window factors computed
// once for both (dx's window columns (+)= (dz_l @ A_l) times them; dW_in_l^T += (x window times
// them)^T @ dz_l, the masked window a [rows, s] block that stays in L1/L2 while its columns are
// broadcast). dx's rows are zeroed first: windows may overlap or leave columns unread.
SPINAL_AVX2 void block_dropout_input_grads(const BackwardPlan& plan, int64_t block_row, int64_t rows,
                                           BlockBuffers& buffers, float* partial) {
  const SpinalShape& shape = plan.shape;
  const Dropout& dropout = *plan.dropout;
  const int64_t n = shape.in_features, s = shape.split_size, w = shape.layer_width, columns = plan.layout.columns;
  float* dx = plan.mask[kGradX] ? plan.grad_x + block_row * n : nullptr;
  if (dx != nullptr) std::fill_n(dx, rows * n, 0.f);
  float* factors = buffers.window_factors.data();
  for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
    const int64_t start = shape.window_start(layer), head = shape.window_head(layer);
    const int64_t column = plan.layout.layer_column[layer];
    for (int64_t r = 0; r < rows; ++r) {
      chain::fill_factors(dropout, block_row + r, dropout.window_site(layer), s, factors + r * s);
    }
    if (plan.mask[kGradWeightIn]) {
      float* masked = buffers.masked_input.data();  // [rows, s]
      for (int64_t r = 0; r < rows; ++r) {
        const float* x_row = plan.x + (block_row + r) * n;
        const float* f = factors + r * s;
        float* out = masked + r * s;
        for (int64_t k = 0; k < head; ++k) out[k] = x_row[start + k] * f[k];
        for (int64_t k = head; k < s; ++k) out[k] = x_row[k - head] * f[k];
      }
      float* grad_in = partial + plan.partial.weight_in + plan.weight_in_column(layer);
      for (int64_t j = 0; j < s; j += kTileRows) {
        const float* a[kTileRows];  // columns past s (rows of the padding) read column j
        for (int64_t i = 0; i < kTileRows; ++i) a[i] = masked + (j + i < s ? j + i : j);
        // Columns past w read the next layer's dz (or padding) into the partial's padding columns.
        tile_product(a, s, rows, buffers.grad_z.data() + column, columns, plan.width_padded,
                     grad_in + j * plan.weight_in_columns, plan.weight_in_columns);
      }
    }
    if (dx != nullptr) {
      // Rows past `rows` of the rounded-up block read stale dZ rows: computed, never stored.
      float* product = buffers.product.data();
      block_product<false>(buffers.grad_z.data() + column, columns, round_up(rows, kTileRows), w,
                           plan.input_weights.data() + column * plan.split_padded, plan.split_padded,
                           plan.split_padded, product, plan.split_padded);
      for (int64_t r = 0; r < rows; ++r) {
        const float* p = product + r * plan.split_padded;
        const float* f = factors + r * s;
        float* dx_row = dx + r * n;
        for (int64_t k = 0; k < head; ++k) dx_row[start + k] += p[k] * f[k];
        for (int64_t k = head; k < s; ++k) dx_row[k - head] += p[k] * f[k];
      }
    }
  }
}

// The weight and bias gradients of a block of rows, added into the chunk's partial: dW_in_g +=
// dZ_g^T @ x_window and dW_out += G^T @ H as panel products over the block's rows (A read by
// columns), db += column sums of dZ, db_out += column sums of G.
SPINAL_AVX2 void block_weight_grads(const BackwardPlan& plan, int64_t block_row, int64_t rows, BlockBuffers& buffers,
                                    float* partial) {
  const SpinalShape& shape = plan.shape;
  const int64_t n = shape.in_features, s = shape.split_size, columns = plan.layout.columns;
  const int64_t out_width = plan.grad_out_width();
  if (plan.mask[kGradWeightIn] && plan.dropout == nullptr) {  // (with dropout: block_dropout_input_grads)
    // dW_in_g^T [s, group columns] += x_window^T @ dZ_g: the window's columns of x are broadcast
    // (one pointer per column: a wrapped window needs no copy), dZ_g's rows are the vectors.
    // Column c of the block is at input + c * column_step, its rows row_step apart: x in place,
    // or its transpose (plan.transposes_input).
    const float* input = plan.x + block_row * n;
    int64_t column_step = 1, row_step = n;
    if (plan.transposes_input) {
      transpose(input, rows, n, n, buffers.input_t.data(), kBlockRows);
      input = buffers.input_t.data();
      column_step = kBlockRows;
      row_step = 1;
    }
    const float* grad_z = buffers.grad_z.data();
    float* grad_in = partial + plan.partial.weight_in;
    for (const WindowGroup& group : plan.layout.groups) {
      for (int64_t j = 0; j < s; j += kTileRows) {
        const float* a[kTileRows];
        for (int64_t i = 0; i < kTileRows; ++i) {  // columns past s (rows of the padding) read column j
          const int64_t column = j + i < s ? j + i : j;
          a[i] = input + (column < group.head ? group.start + column : column - group.head) * column_step;
        }
        tile_product(a, row_step, rows, grad_z + group.tile_column, columns, group.columns,
                     grad_in + j * columns + group.tile_column, columns);
      }
    }
  }
  if (plan.mask[kGradWeightHidden]) {
    // dR_{l-1} += dz_l^T @ h_{l-1} over the block's rows (rows of the partial past w, and columns
    // past w, hold products of neighbouring columns: never read).
    for (int64_t layer = 1; layer < shape.num_layers; ++layer) {
      transposed_product(buffers.grad_z.data() + plan.layout.layer_column[layer], columns, plan.width_rows, rows,
                         buffers.hidden.data() + (layer - 1) * shape.layer_width, plan.hidden_padded,
                         plan.width_padded,
                         partial + plan.partial.weight_hidden + (layer - 1) * plan.width_rows * plan.width_padded,
                         plan.width_padded);
    }
  }
  if (plan.mask[kGradBias]) {
    float* db = partial + plan.partial.bias;
    for (int64_t r = 0; r < rows; ++r) {
      const float* g = buffers.grad_z.data() + r * columns;
      for (int64_t c = 0; c < columns; ++c) db[c] += g[c];
    }
  }
  if (!plan.projection()) return;
  const float* grad_out = plan.grad_out + block_row * out_width;
  if (plan.mask[kGradWeightOut]) {
    // G's block, its rows padded to out_rows columns (zeros): dW_out's rows past M read those.
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(grad_out + r * out_width, shape.out_features, buffers.grad_out.begin() + r * plan.out_rows);
    }
    // (With dropout, H times its factors as the projection's input.)
    const float* hidden = plan.dropout != nullptr ? buffers.hidden_projection.data() : buffers.hidden.data();
    transposed_product(buffers.grad_out.data(), plan.out_rows, plan.out_rows, rows, hidden, plan.hidden_padded,
                       plan.hidden_padded, partial + plan.partial.weight_out, plan.hidden_padded);
  }
  if (plan.mask[kGradBiasOut]) {
    float* db_out = partial + plan.partial.bias_out;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t m = 0; m < shape.out_features; ++m) db_out[m] += grad_out[r * out_width + m];
    }
  }
}

template <Activation kAct>
void backward_chunks(const BackwardPlan& plan, int64_t chunk_rows, std::vector<float>& partials) {
  const int64_t batch = plan.shape.batch, chunks = (batch + chunk_rows - 1) / chunk_rows;
  const int64_t n = plan.shape.in_features;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    BlockBuffers buffers(plan);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      float* partial = partials.data() + chunk * plan.partial.size;
      const int64_t chunk_end_row = std::min(batch, (chunk + 1) * chunk_rows);
      for (int64_t block_row = chunk * chunk_rows; block_row < chunk_end_row; block_row += kBlockRows) {
        const int64_t block = std::min(kBlockRows, chunk_end_row - block_row);
        for (int64_t first = 0; first < block; first += kTileRows) {
          const int64_t rows = std::min(kTileRows, block - first);
          // The block's x, which dW_in transposes after the tiles, from memory into L2 meanwhile.
          if (plan.transposes_input) prefetch_floats<2>(plan.x + (block_row + first) * n, rows * n);
          backward_tile<kAct>(plan, block_row, first, rows, buffers);
        }
        if (plan.dropout != nullptr) {
          if (plan.mask[kGradX] || plan.mask[kGradWeightIn]) {
            block_dropout_input_grads(plan, block_row, block, buffers, partial);
          }
        } else if (plan.mask[kGradX]) {
          block_input_grad(plan, block_row, block, buffers);
        }
        block_weight_grads(plan, block_row, block, buffers, partial);
      }
    }
  });
}

// The summed partials, unpadded and in layer order, into the gradient tensors the mask asks for.
void write_weight_grads(const BackwardPlan& plan, const float* total, std::array<at::Tensor, 6>& grads) {
  const SpinalShape& shape = plan.shape;
  const int64_t s = shape.split_size, w = shape.layer_width, num_layers = shape.num_layers;
  if (plan.mask[kGradWeightIn]) {
    // A layer's dW_in is the transpose of its w columns of dW_in^T [s, layout.columns].
    float* out = grads[kGradWeightIn].mutable_data_ptr<float>();
    for (int64_t layer = 0; layer < num_layers; ++layer) {
      transpose(total + plan.partial.weight_in + plan.weight_in_column(layer), s, w, plan.weight_in_columns,
                out + layer * w * s, s);
    }
  }
  if (plan.mask[kGradWeightHidden]) {
    float* out = grads[kGradWeightHidden].mutable_data_ptr<float>();
    for (int64_t layer = 0; layer + 1 < num_layers; ++layer) {
      for (int64_t j = 0; j < w; ++j) {
        std::copy_n(total + plan.partial.weight_hidden + (layer * plan.width_rows + j) * plan.width_padded, w,
                    out + (layer * w + j) * w);
      }
    }
  }
  if (plan.mask[kGradBias]) {
    float* out = grads[kGradBias].mutable_data_ptr<float>();
    for (int64_t layer = 0; layer < num_layers; ++layer) {
      std::copy_n(total + plan.partial.bias + plan.layout.layer_column[layer], w, out + layer * w);
    }
  }
  if (plan.projection() && plan.mask[kGradWeightOut]) {
    float* out = grads[kGradWeightOut].mutable_data_ptr<float>();
    for (int64_t m = 0; m < shape.out_features; ++m) {
      std::copy_n(total + plan.partial.weight_out + m * plan.hidden_padded, shape.hidden(), out + m * shape.hidden());
    }
  }
  if (plan.projection() && plan.mask[kGradBiasOut]) {
    std::copy_n(total + plan.partial.bias_out, shape.out_features, grads[kGradBiasOut].mutable_data_ptr<float>());
  }
}

#endif  // SPINAL_HAVE_AVX2_PATH

}  // namespace

std::array<at::Tensor, 6> narrow_chain_backward(const SpinalShape& shape, const at::Tensor& grad_out,
                                                const at::Tensor& x, const at::Tensor& pre_activation,
                                                const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                                                const std::optional<at::Tensor>& weight_out, Activation act,
                                                double negative_slope, const std::array<bool, 6>& mask,
                                                const Dropout& dropout) {
  TORCH_CHECK(uses_narrow_chain(shape, x), "spinal_ops: the narrow-chain backward needs float32, w <= ",
              text(kNarrowChainMaxWidth), " and a CPU with AVX2 and FMA");
  const auto options = x.options();
  const bool projection = weight_out.has_value();
  std::array<at::Tensor, 6> grads;
  const at::Tensor* likes[6] = {&x, &weight_in, &weight_hidden, nullptr, projection ? &*weight_out : nullptr, nullptr};
  for (int slot = 0; slot < 6; ++slot) {
    const bool wanted = mask[slot] && (slot < kGradWeightOut || projection);
    if (!wanted) {
      grads[slot] = at::empty({0}, options);
    } else if (slot == kGradBias) {
      grads[slot] = at::empty({shape.num_layers, shape.layer_width}, options);
    } else if (slot == kGradBiasOut) {
      grads[slot] = at::empty({shape.out_features}, options);
    } else {
      grads[slot] = at::empty_like(*likes[slot]);
    }
  }
  std::array<bool, 6> wanted_mask = mask;
  if (!projection) wanted_mask[kGradWeightOut] = wanted_mask[kGradBiasOut] = false;
  BackwardPlan plan(shape, weight_in, weight_hidden, weight_out, wanted_mask, dropout);
  const int64_t chunk_rows = backward_chunk_rows(shape.batch);
  const int64_t chunks = (shape.batch + chunk_rows - 1) / chunk_rows;
  // At least one partial: an empty batch's weight gradients are its zeros.
  std::vector<float> partials(std::max<int64_t>(chunks, 1) * plan.partial.size, 0.f);
#if SPINAL_HAVE_AVX2_PATH
  if (shape.batch > 0) {
    plan.grad_out = grad_out.const_data_ptr<float>();
    plan.x = x.const_data_ptr<float>();
    plan.z = pre_activation.const_data_ptr<float>();
    plan.grad_x = mask[kGradX] ? grads[kGradX].mutable_data_ptr<float>() : nullptr;
    plan.negative_slope = static_cast<float>(negative_slope);
    with_activation(act, [&](auto kAct) { backward_chunks<decltype(kAct)::value>(plan, chunk_rows, partials); });
  }
  // Chunks added in chunk order: the same bits whatever the thread count. (The first chunk's
  // partial is the running total: a batch of one chunk, every batch up to 256 rows, adds nothing.)
  float* total = partials.data();
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    const float* part = partials.data() + chunk * plan.partial.size;
    for (int64_t i = 0; i < plan.partial.size; ++i) total[i] += part[i];
  }
  write_weight_grads(plan, total, grads);
#endif
  return grads;
}

}  // namespace spinal_ops::cpu

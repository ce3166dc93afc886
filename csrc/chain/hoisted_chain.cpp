// The hoisted spinal chain (scheme in hoisted_chain.h).
#include "hoisted_chain.h"

#include <c10/util/accumulate.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "dropout_factors.h"
#include "matrix_block.h"

namespace spinal_ops::chain {
namespace {

// Inference runs row blocks through one reused [rows, L*w] buffer of at most
// GemmEngine::inference_block_elements elements, but at least this many rows, so that each GEMM
// still has rows to work with.
constexpr int64_t kMinBlockRows = 256;

// Rows per block: whole blocks of at most `elements` elements of a [rows, hidden] buffer, at
// least kMinBlockRows rows, at most the batch.
int64_t block_rows(int64_t batch, int64_t hidden, int64_t elements) {
  return std::min(batch, std::max(kMinBlockRows, elements / hidden));
}

// Rows per block of the training forward and of the backward's recurrence: the engine's
// training blocks, or the whole batch.
int64_t training_block_rows(const GemmEngine& engine, const SpinalShape& shape) {
  return engine.training_block_elements > 0 ? block_rows(shape.batch, shape.hidden(), engine.training_block_elements)
                                            : shape.batch;
}

// Layers grouped by the input window they read: group g holds layers g, g+p, g+2p, ... where
// p = N / gcd(N, s) is the period of the window starts (l*s) mod N. "Slots" number the layers
// in group-major order. Where the engine leaves the layers ungrouped, or a dropout gives each
// layer its own x mask, every layer is its own group (p taken as L): layer order.
struct LayerGroups {
  int64_t num_layers;
  int64_t window_period;  // N / gcd(N, s)
  int64_t period;         // the group stride: window_period, or L when layers are not grouped
  int64_t count;          // number of groups, min(period, L)

  LayerGroups(const SpinalShape& shape, const GemmEngine& engine, const Dropout& dropout)
      : num_layers(shape.num_layers),
        window_period(shape.in_features / std::gcd(shape.in_features, shape.split_size)),
        period(dropout.active || (engine.groups_layers != nullptr && !engine.groups_layers(shape)) ? shape.num_layers
                                                                                                  : window_period),
        count(std::min(period, shape.num_layers)) {}

  int64_t size(int64_t group) const { return (num_layers - group + period - 1) / period; }
  int64_t first_slot(int64_t group) const {
    int64_t slot = 0;
    for (int64_t g = 0; g < group; ++g) slot += size(g);
    return slot;
  }
  int64_t slot(int64_t layer) const { return first_slot(layer % period) + layer / period; }
  // Column offset of each layer's slot in a [rows, L*w] group-major buffer.
  std::vector<int64_t> slot_offsets(int64_t layer_width) const {
    std::vector<int64_t> offsets(num_layers);
    for (int64_t layer = 0; layer < num_layers; ++layer) offsets[layer] = slot(layer) * layer_width;
    return offsets;
  }
  // One group, or one layer per group: group-major order is layer order.
  bool is_layer_order() const { return count == 1 || count == num_layers; }
  // Whether groups 0 .. window_period-1 cover x exactly once (s divides N, and there are that many
  // groups): grouped, each window is one group's; ungrouped, the first window_period layers'.
  bool windows_tile_once(const SpinalShape& shape) const {
    return shape.in_features % shape.split_size == 0 && count >= window_period;
  }
};

// Copies the layer dimension `dim` (size L) of src into dst, from layer order to group-major order
// (to_group_major) or back, on contiguous CPU tensors of equal shape: one memcpy per layer block.
// (at::cat of the strided layer slices costs ~10 µs of fixed overhead per call on a CPU, more
// than all the copies of a small layer: ~4 % of vgg5's training step at batch 64, `spinal-bench
// --preset vgg5 --batch 64 --mode train --backends cpu --threads 1` against a build without it.)
void permute_layers_cpu(at::Tensor& dst, const at::Tensor& src, int64_t dim, const LayerGroups& groups,
                        bool to_group_major) {
  const int64_t outer = c10::multiply_integers(src.sizes().begin(), src.sizes().begin() + dim);
  const size_t block_bytes = static_cast<size_t>(src.stride(dim)) * src.element_size();
  const auto* from = static_cast<const char*>(src.const_data_ptr());
  auto* to = static_cast<char*>(dst.mutable_data_ptr());
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t layer = 0; layer < groups.num_layers; ++layer) {
      const int64_t slot = o * groups.num_layers + groups.slot(layer), index = o * groups.num_layers + layer;
      const int64_t src_block = to_group_major ? index : slot, dst_block = to_group_major ? slot : index;
      std::memcpy(to + dst_block * block_bytes, from + src_block * block_bytes, block_bytes);
    }
  }
}

// The layer dimension `dim` (size L) of t in group-major order (t itself when that is layer order).
at::Tensor to_group_major(const at::Tensor& t, int64_t dim, const LayerGroups& groups) {
  if (groups.is_layer_order()) return t;
  if (t.is_cpu() && t.is_contiguous()) {
    at::Tensor grouped = at::empty_like(t, at::MemoryFormat::Contiguous);
    permute_layers_cpu(grouped, t, dim, groups, true);
    return grouped;
  }
  std::vector<at::Tensor> parts;
  parts.reserve(groups.count);
  for (int64_t g = 0; g < groups.count; ++g) parts.push_back(t.slice(dim, g, groups.num_layers, groups.period));
  return at::cat(parts, dim);
}

// t (group-major along dimension `dim`, of size L) in layer order: t itself when that is layer
// order, else a new contiguous tensor.
at::Tensor to_layer_order(const at::Tensor& t, int64_t dim, const LayerGroups& groups) {
  if (groups.is_layer_order()) return t;
  at::Tensor ordered = at::empty_like(t, at::MemoryFormat::Contiguous);
  if (t.is_cpu() && t.is_contiguous()) {
    permute_layers_cpu(ordered, t, dim, groups, false);
    return ordered;
  }
  for (int64_t g = 0; g < groups.count; ++g) {
    ordered.slice(dim, g, groups.num_layers, groups.period).copy_(t.narrow(dim, groups.first_slot(g), groups.size(g)));
  }
  return ordered;
}

// The parameters the forward reads, with the layer dimension in group-major order.
struct GroupedParams {
  at::Tensor weight_in;               // [L*w, s]
  std::optional<at::Tensor> bias;     // [L*w]
  at::Tensor weight_out;              // [M, L*w]; undefined without projection
};

GroupedParams group_params(const SpinalShape& shape, const LayerGroups& groups, const at::Tensor& weight_in,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight_out) {
  const int64_t hidden = shape.hidden();
  GroupedParams grouped;
  grouped.weight_in = to_group_major(weight_in, 0, groups).reshape({hidden, shape.split_size});
  if (bias) grouped.bias = to_group_major(*bias, 0, groups).reshape({hidden});
  if (weight_out) {
    const at::Tensor by_layer = weight_out->view({shape.out_features, shape.num_layers, shape.layer_width});
    grouped.weight_out = to_group_major(by_layer, 1, groups).reshape({shape.out_features, hidden});
  }
  return grouped;
}

// ---- dropout (hoisted_chain.h) ----

// One product with dropout factors: out (+)= a * factors[:, factor_column : factor_column + a.cols].
struct DropoutTerm {
  Block out;
  bool accumulate;
  Block a;
  int64_t factor_column;
};

// The terms' products with the factors of sites first_site .. first_site + width - 1 of rows
// first_row .. first_row + rows - 1 (row r of each block is row first_row + r). The factors are
// computed once for all the terms, in row blocks of at most GemmEngine::dropout_block_elements
// (so that on a CPU they are read from cache, not memory), in factor_dtype(like's dtype).
void apply_dropout(const GemmEngine& engine, const Dropout& dropout, int64_t first_row, int64_t rows,
                   int64_t first_site, int64_t width, c10::ArrayRef<DropoutTerm> terms, const at::Tensor& like) {
  if (rows == 0 || width == 0) return;
  const int64_t block = engine.dropout_block_elements > 0
                            ? std::min(rows, std::max<int64_t>(1, engine.dropout_block_elements / width))
                            : rows;
  const at::Tensor factors = at::empty({block, width}, like.options().dtype(factor_dtype(like.scalar_type())));
  for (int64_t row = 0; row < rows; row += block) {
    const int64_t count = std::min(block, rows - row);
    dropout_factors_out(dropout, first_row + row, first_site, factors, count);
    const Block part = Block::of(factors).row_range(0, count);
    for (const DropoutTerm& term : terms) {
      block_multiply(engine, term.out.row_range(row, count), term.accumulate, term.a.row_range(row, count),
                     part.columns(term.factor_column, term.a.cols));
    }
  }
}

// `values` times the factors of sites first_site.. (its rows are rows first_row..) into a new
// tensor of like's dtype.
at::Tensor dropped_copy(const GemmEngine& engine, const Block& values, const Dropout& dropout, int64_t first_row,
                        int64_t first_site, const at::Tensor& like) {
  at::Tensor out = at::empty({values.rows, values.cols}, like.options());
  apply_dropout(engine, dropout, first_row, values.rows, first_site, values.cols, {{Block::of(out), false, values, 0}},
                like);
  return out;
}

// Layer `layer`'s window of x_block's rows (rows first_row..) times its factors: [rows, s], the
// window's pieces side by side as weight_in's columns meet them. With `grad_x`, also
// grad_x's window columns (+)= window_grad * the same factors (the backward's dx; accumulate: add).
at::Tensor dropped_window(const GemmEngine& engine, const SpinalShape& shape, const Dropout& dropout,
                          int64_t first_row, const Block& x_block, int64_t layer, const at::Tensor& like,
                          bool want_window = true, const Block* grad_x = nullptr, const Block* window_grad = nullptr,
                          bool accumulate = false) {
  at::Tensor out = want_window ? at::empty({x_block.rows, shape.split_size}, like.options()) : at::Tensor();
  const std::vector<WindowPiece> pieces = window_pieces(shape, layer);
  std::vector<DropoutTerm> terms;
  for (const WindowPiece& piece : pieces) {
    if (want_window) {
      terms.push_back({Block::of(out).columns(piece.weight_start, piece.length), false,
                       x_block.columns(piece.input_start, piece.length), piece.weight_start});
    }
    if (grad_x != nullptr) {
      terms.push_back({grad_x->columns(piece.input_start, piece.length), accumulate,
                       window_grad->columns(piece.weight_start, piece.length), piece.weight_start});
    }
  }
  apply_dropout(engine, dropout, first_row, x_block.rows, dropout.window_site(layer), shape.split_size, terms, like);
  return out;
}

// Whether the engine runs the whole recurrence as one loop of its own (narrow layers on a CPU:
// csrc/cpu/narrow_recurrence.h) instead of one GEMM and one activation per layer.
bool uses_narrow_recurrence(const GemmEngine& engine, const SpinalShape& shape, const at::Tensor& x) {
  return engine.runs_recurrence != nullptr && engine.runs_recurrence(shape, x.scalar_type());
}

// The forward on `rows` of x and out. The group GEMMs write the input products into `products`
// [rows, L*w] (group-major, bias included); the recurrence turns slot l into z_l and h_l.
// * ATen recurrence (wide layers): z_l is computed in place in its slot, so `products` ends as Z
//   (group-major); h_l goes to `hidden`'s slot (which may be `products` itself when Z is not
//   kept) or, without projection, to out's layer columns. With Z kept in the buffer the GEMMs
//   write, no layer pays a copy of its products into Z.
// * narrow recurrence: one pass over the rows writes z_l to `pre_activation` (when defined, at
//   the same slot offsets) and h_l over its own slot of `products` (or into out).
// The projection reads H from `hidden` (or `products` on the narrow path).
// With an active dropout (layers ungrouped: group g is layer g), each layer's GEMM reads its
// window times its factors, the recurrence h_{l-1} times its, the projection H times its; x's
// rows are rows first_row.. of the batch (the factors' row counters).
void forward_rows(const GemmEngine& engine, const SpinalShape& shape, const LayerGroups& groups,
                  const GroupedParams& grouped, const at::Tensor& x, const at::Tensor& weight_hidden,
                  const std::optional<at::Tensor>& bias_out,
                  Activation act, double negative_slope, const at::Tensor& products, const at::Tensor& hidden,
                  const at::Tensor& pre_activation, at::Tensor out, const Dropout& dropout, int64_t first_row) {
  const int64_t w = shape.layer_width;
  const bool projection = grouped.weight_out.defined();
  const bool drops = dropout.active;
  // Blocks, not views (matrix_block.h): at small batch the views would cost as much as the math.
  const Block x_block = Block::of(x), products_block = Block::of(products), out_block = Block::of(out);
  const Block weight_in_block = Block::of(grouped.weight_in);
  const auto bias_out_block = bias_out ? std::optional<Block>(Block::row(*bias_out)) : std::nullopt;

  for (int64_t g = 0; g < groups.count; ++g) {
    const int64_t first = groups.first_slot(g) * w, width = groups.size(g) * w;
    const Block columns = products_block.columns(first, width);
    const Block weights = weight_in_block.row_range(first, width);
    const auto bias =
        grouped.bias ? std::optional<Block>(Block::row(*grouped.bias).columns(first, width)) : std::nullopt;
    if (drops) {
      const at::Tensor window = dropped_window(engine, shape, dropout, first_row, x_block, g, x);
      block_gemm(engine, columns, false, bias, Block::of(window), weights.t());
      continue;
    }
    bool first_piece = true;
    for (const WindowPiece& piece : window_pieces(shape, g)) {
      block_gemm(engine, columns, !first_piece, bias, x_block.columns(piece.input_start, piece.length),
                 weights.columns(piece.weight_start, piece.length).t());
      first_piece = false;
    }
  }

  const std::vector<int64_t> slots = groups.slot_offsets(w);
  if (uses_narrow_recurrence(engine, shape, x)) {
    // h_l goes to its slot (group-major H for the projection) or, without projection, to out.
    std::vector<int64_t> hidden_offsets = slots;
    if (!projection) {
      for (int64_t layer = 0; layer < shape.num_layers; ++layer) hidden_offsets[layer] = layer * w;
    }
    engine.forward_recurrence(products, slots, weight_hidden, act, negative_slope, pre_activation,
                              projection ? products : out, hidden_offsets, dropout, first_row);
    if (projection && drops) {
      const at::Tensor dropped =
          dropped_copy(engine, products_block, dropout, first_row, dropout.projection_site(), x);
      block_gemm(engine, out_block, false, bias_out_block, Block::of(dropped), Block::of(grouped.weight_out).t());
    } else if (projection) {
      block_gemm(engine, out_block, false, bias_out_block, products_block, Block::of(grouped.weight_out).t());
    }
    return;
  }
  const Block hidden_block = projection ? Block::of(hidden) : out_block;
  // `products` ends as Z (the training forward's) when h goes elsewhere: the training forward then
  // passes another `hidden` buffer (or none, without projection); inference and keeps_hidden pass
  // `products` itself.
  const bool keeps_z = !hidden.is_same(products);
  Block previous_hidden;  // h_{l-1}
  for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
    const Block z = products_block.columns(slots[layer], w);
    const Block h = hidden_block.columns(projection ? slots[layer] : layer * w, w);
    if (layer > 0 && !drops) {
      block_gemm_activation(engine, h, z, keeps_z, previous_hidden, Block::matrix(weight_hidden, layer - 1).t(), act,
                            negative_slope);
    } else {
      if (layer > 0) {
        const at::Tensor dropped =
            dropped_copy(engine, previous_hidden, dropout, first_row, dropout.hidden_site(layer), x);
        block_gemm(engine, z, true, std::nullopt, Block::of(dropped), Block::matrix(weight_hidden, layer - 1).t());
      }
      block_activation(engine, h, z, act, negative_slope);
    }
    previous_hidden = h;
  }
  if (projection && drops) {
    const at::Tensor dropped = dropped_copy(engine, hidden_block, dropout, first_row, dropout.projection_site(), x);
    block_gemm(engine, out_block, false, bias_out_block, Block::of(dropped), Block::of(grouped.weight_out).t());
  } else if (projection) {
    block_gemm(engine, out_block, false, bias_out_block, hidden_block, Block::of(grouped.weight_out).t());
  }
}

// Activations whose derivative is a function of their output (PyTorch's own backward of these
// reads the output): relu' = [h > 0] (exactly where z > 0, NaN passing as for z), tanh' = 1 - h^2,
// sigmoid' = h (1 - h), identity' = 1.
bool derivative_from_output(Activation act) {
  return act == Activation::ReLU || act == Activation::Tanh || act == Activation::Sigmoid ||
         act == Activation::Identity;
}

// Whether the chain keeps H = phi(Z) for the backward instead of Z: on the ATen recurrence with a
// projection, for an activation whose derivative is a function of H. The forward then computes
// the products, z_l and h_l in place in one [B, L*w] buffer (as inference does) and keeps it;
// the backward needs H for dW_out and dW_hidden anyway, so it neither allocates nor recomputes it.
bool keeps_hidden(const GemmEngine& engine, const SpinalShape& shape, const at::Tensor& x, Activation act,
                  bool projection) {
  return projection && !uses_narrow_recurrence(engine, shape, x) && derivative_from_output(act);
}

}  // namespace

void apply_activation(at::Tensor h, const at::Tensor& z, Activation act, double negative_slope) {
  // ATen's out= kernels are also what the reference backend runs, so NaN/Inf behave alike.
  switch (act) {
    case Activation::ReLU: at::clamp_min_out(h, z, 0); return;  // torch.relu: NaN stays NaN
    case Activation::LeakyReLU: at::leaky_relu_out(h, z, negative_slope); return;
    case Activation::GELU: at::gelu_out(h, z, "none"); return;
    case Activation::GELUTanh: at::gelu_out(h, z, "tanh"); return;
    case Activation::SiLU: at::silu_out(h, z); return;
    case Activation::Tanh: at::tanh_out(h, z); return;
    case Activation::Sigmoid: at::sigmoid_out(h, z); return;
    case Activation::Identity:
      if (!h.is_same(z)) h.copy_(z);
      return;
  }
}

void multiply_by_activation_grad(at::Tensor dz, const at::Tensor& z, const at::Tensor& h, Activation act,
                                 double negative_slope) {
  // The backward kernels autograd runs for the reference backend.
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

std::tuple<at::Tensor, at::Tensor> hoisted_forward(const GemmEngine& engine, const SpinalShape& shape,
                                                   const at::Tensor& x, const at::Tensor& weight_in,
                                                   const at::Tensor& weight_hidden,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& weight_out,
                                                   const std::optional<at::Tensor>& bias_out, Activation act,
                                                   double negative_slope, bool keep_pre_activation,
                                                   const Dropout& dropout) {
  const LayerGroups groups(shape, engine, dropout);
  const GroupedParams grouped = group_params(shape, groups, weight_in, bias, weight_out);
  const int64_t batch = shape.batch, hidden = shape.hidden();
  const auto options = x.options();
  at::Tensor out = at::empty({batch, shape.output_width()}, options);
  if (keep_pre_activation) {
    // What the backward reads, in group-major order: H where the chain keeps it (keeps_hidden),
    // computed in place in the buffer the group GEMMs write; else Z. The ATen recurrence computes
    // Z in that buffer itself, with H beside it when there is a projection; the narrow recurrence
    // writes Z from a scratch products buffer that then holds H.
    at::Tensor saved = at::empty({batch, hidden}, options);
    const bool projection = grouped.weight_out.defined();
    const bool narrow = uses_narrow_recurrence(engine, shape, x);
    const bool in_place = keeps_hidden(engine, shape, x, act, projection);
    // The buffers besides Z: the narrow recurrence's products (which end as H), or H beside Z.
    const at::Tensor products = narrow ? at::empty({batch, hidden}, options) : at::Tensor();
    const at::Tensor hidden_act =
        !narrow && !in_place && projection ? at::empty({batch, hidden}, options) : at::Tensor();
    const int64_t block = training_block_rows(engine, shape);
    for (int64_t row = 0; row < batch; row += block) {
      const int64_t rows = std::min(block, batch - row);
      const auto part = [&](const at::Tensor& t) { return t.defined() ? t.narrow(0, row, rows) : t; };
      const at::Tensor x_part = part(x), out_part = part(out), saved_part = part(saved);
      if (narrow) {
        const at::Tensor products_part = part(products);
        forward_rows(engine, shape, groups, grouped, x_part, weight_hidden, bias_out, act, negative_slope,
                     products_part, products_part, saved_part, out_part, dropout, row);
      } else {
        forward_rows(engine, shape, groups, grouped, x_part, weight_hidden, bias_out, act, negative_slope, saved_part,
                     in_place ? saved_part : part(hidden_act), at::Tensor(), out_part, dropout, row);
      }
    }
    return {out, saved};
  }
  const int64_t block = block_rows(batch, hidden, engine.inference_block_elements);
  if (batch > 0) {
    at::Tensor buffer = at::empty({block, hidden}, options);
    for (int64_t row = 0; row < batch; row += block) {
      const int64_t rows = std::min(block, batch - row);
      const at::Tensor block_buffer = buffer.narrow(0, 0, rows);  // products, then Z and H in place
      forward_rows(engine, shape, groups, grouped, x.narrow(0, row, rows), weight_hidden, bias_out, act, negative_slope,
                   block_buffer, block_buffer, at::Tensor(), out.narrow(0, row, rows), dropout, row);
    }
  }
  return {out, at::empty({0}, options)};
}

std::array<at::Tensor, 6> hoisted_backward(const GemmEngine& engine, const SpinalShape& shape,
                                           const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& pre_activation, const at::Tensor& weight_in,
                                           const at::Tensor& weight_hidden,
                                           const std::optional<at::Tensor>& weight_out, Activation act,
                                           double negative_slope, const GradMask& mask, const Dropout& dropout) {
  const auto options = x.options();
  std::array<at::Tensor, 6> grads;
  for (at::Tensor& grad : grads) grad = at::empty({0}, options);
  const bool projection = weight_out.has_value();
  const bool need_dz = mask[kGradX] || mask[kGradWeightIn] || mask[kGradWeightHidden] || mask[kGradBias];
  const int64_t batch = shape.batch, w = shape.layer_width, num_layers = shape.num_layers, hidden = shape.hidden();
  const bool drops = dropout.active;

  // Z, dZ and H = phi(Z) are in group-major order: each layer's z_l, dz_l and h_l in its slot
  // (layer order under dropout, whose layers are not grouped).
  const LayerGroups groups(shape, engine, dropout);
  // Blocks, not views (matrix_block.h).
  const auto slot_columns = [&](const at::Tensor& t, int64_t layer) {
    return Block::of(t).columns(groups.slot(layer) * w, w);
  };

  // H: dW_out and dW_hidden read it, and tanh/sigmoid's phi' does (the narrow recurrence rebuilds
  // h from Z for both itself). Where the forward kept H (keeps_hidden), `pre_activation` is H.
  const bool narrow = uses_narrow_recurrence(engine, shape, x);
  const bool saved_hidden = keeps_hidden(engine, shape, x, act, projection);
  const bool need_hidden = (mask[kGradWeightHidden] && !narrow) || (projection && mask[kGradWeightOut]) ||
                           (need_dz && (act == Activation::Tanh || act == Activation::Sigmoid) && !narrow);
  at::Tensor hidden_act;
  if (saved_hidden) {
    hidden_act = pre_activation;
  } else if (need_hidden) {
    hidden_act = at::empty({batch, hidden}, options);
    apply_activation(hidden_act, pre_activation, act, negative_slope);
  }
  // dZ, starting from dH = G @ W_out (or G itself without projection). Under dropout H's factors
  // (as the projection's input) scale dH and, in one pass with it, H for dW_out.
  at::Tensor grad_z;
  at::Tensor projection_input = hidden_act;  // what dW_out multiplies: H, or H times its factors
  const bool dropped_projection_input = drops && projection && mask[kGradWeightOut];
  if (dropped_projection_input) projection_input = at::empty({batch, hidden}, options);
  if (projection && need_dz) {
    const at::Tensor by_layer = weight_out->view({shape.out_features, num_layers, w});
    const at::Tensor grouped_weight_out = to_group_major(by_layer, 1, groups).reshape({shape.out_features, hidden});
    grad_z = at::empty({batch, hidden}, options);
    block_gemm(engine, Block::of(grad_z), false, std::nullopt, Block::of(grad_out), Block::of(grouped_weight_out));
  }
  if (drops && projection && (need_dz || mask[kGradWeightOut])) {
    std::vector<DropoutTerm> terms;
    if (need_dz) terms.push_back({Block::of(grad_z), false, Block::of(grad_z), 0});
    if (dropped_projection_input) terms.push_back({Block::of(projection_input), false, Block::of(hidden_act), 0});
    apply_dropout(engine, dropout, 0, batch, dropout.projection_site(), hidden, terms, x);
  }
  if (projection && mask[kGradWeightOut]) {
    const int64_t m = shape.out_features;
    const at::Tensor grad_weight_out = at::empty({m, hidden}, options);  // group-major columns
    block_gemm(engine, Block::of(grad_weight_out), false, std::nullopt, Block::of(grad_out).t(),
               Block::of(projection_input));
    grads[kGradWeightOut] = to_layer_order(grad_weight_out.view({m, num_layers, w}), 1, groups).view({m, hidden});
  }
  if (projection && mask[kGradBiasOut]) grads[kGradBiasOut] = grad_out.sum(0);
  if (!need_dz) return grads;

  if (!projection) {
    // dZ is built in place: a copy of G (to_group_major returns a new tensor unless the order is
    // already layer order, and then G itself).
    grad_z = groups.is_layer_order()
                 ? grad_out.clone()
                 : to_group_major(grad_out.view({batch, num_layers, w}), 1, groups).reshape({batch, hidden});
  }
  if (mask[kGradWeightHidden]) grads[kGradWeightHidden] = at::empty_like(weight_hidden);
  if (narrow) {
    engine.backward_recurrence(grad_z, groups.slot_offsets(w), pre_activation, weight_hidden, act, negative_slope,
                               mask[kGradWeightHidden] ? grads[kGradWeightHidden] : at::Tensor(), dropout, 0);
  } else {
    const int64_t block = training_block_rows(engine, shape);
    // dz_{l+1} @ R_{l+1} of a block's rows before its factors scale it (dropout only).
    const at::Tensor recurrent_product = drops ? at::empty({std::min(block, batch), w}, options) : at::Tensor();
    for (int64_t row = 0; row < batch; row += block) {
      const int64_t rows = std::min(block, batch - row);
      const auto slot_rows = [&](const at::Tensor& t, int64_t layer) {
        return slot_columns(t, layer).row_range(row, rows);
      };
      Block next_dz;  // dz_{l+1}
      for (int64_t layer = num_layers - 1; layer >= 0; --layer) {
        const Block dz = slot_rows(grad_z, layer);
        const Block h = hidden_act.defined() ? slot_rows(hidden_act, layer) : Block();
        // With H kept, relu's phi' reads h in place of z: the same mask (derivative_from_output).
        const Block z = saved_hidden ? h : slot_rows(pre_activation, layer);
        if (layer + 1 < num_layers && !drops) {
          block_gemm_activation_grad(engine, dz, z, h, next_dz, Block::matrix(weight_hidden, layer), act,
                                     negative_slope);
        } else {
          if (layer + 1 < num_layers) {
            // dz_l += (dz_{l+1} @ R_{l+1}) * the factors of h_l as layer l+1's input.
            const Block product = Block::of(recurrent_product).row_range(0, rows);
            block_gemm(engine, product, false, std::nullopt, next_dz, Block::matrix(weight_hidden, layer));
            apply_dropout(engine, dropout, row, rows, dropout.hidden_site(layer + 1), w, {{dz, true, product, 0}}, x);
          }
          block_activation_grad(engine, dz, z, h, act, negative_slope);
        }
        next_dz = dz;
      }
    }
  }

  if (mask[kGradWeightHidden] && !narrow) {
    for (int64_t layer = 1; layer < num_layers; ++layer) {
      const Block previous = slot_columns(hidden_act, layer - 1);
      const at::Tensor dropped =
          drops ? dropped_copy(engine, previous, dropout, 0, dropout.hidden_site(layer), x) : at::Tensor();
      block_gemm(engine, Block::matrix(grads[kGradWeightHidden], layer - 1), false, std::nullopt,
                 slot_columns(grad_z, layer).t(), drops ? Block::of(dropped) : previous);
    }
  }
  if (mask[kGradBias]) {
    grads[kGradBias] = to_layer_order(grad_z.sum(0).view({num_layers, w}), 0, groups);
  }
  if (drops && (mask[kGradWeightIn] || mask[kGradX])) {
    // One layer per group: dW_in_l = dz_l^T @ (x window * factors), and the window's columns of dx
    // get (dz_l @ A_l) * factors, written by the layers whose windows tile x once, else added; the
    // layer's factors (its own mask of x) computed once for both.
    const bool tiles_once = mask[kGradX] && groups.windows_tile_once(shape);
    at::Tensor grad_x;
    if (mask[kGradX]) grad_x = tiles_once ? at::empty_like(x) : at::zeros_like(x);
    const at::Tensor grad_weight_in = mask[kGradWeightIn] ? at::empty_like(weight_in) : at::Tensor();
    const at::Tensor window_product = mask[kGradX] ? at::empty({batch, shape.split_size}, options) : at::Tensor();
    const Block x_block = Block::of(x);
    for (int64_t layer = 0; layer < num_layers; ++layer) {
      const Block dz = slot_columns(grad_z, layer);
      if (mask[kGradX]) {
        block_gemm(engine, Block::of(window_product), false, std::nullopt, dz, Block::matrix(weight_in, layer));
      }
      const Block grad_x_block = mask[kGradX] ? Block::of(grad_x) : Block();
      const Block window_grad = mask[kGradX] ? Block::of(window_product) : Block();
      const at::Tensor window =
          dropped_window(engine, shape, dropout, 0, x_block, layer, x, mask[kGradWeightIn],
                         mask[kGradX] ? &grad_x_block : nullptr, &window_grad,
                         !tiles_once || layer >= groups.window_period);
      if (mask[kGradWeightIn]) {
        block_gemm(engine, Block::matrix(grad_weight_in, layer), false, std::nullopt, dz.t(), Block::of(window));
      }
    }
    if (mask[kGradWeightIn]) grads[kGradWeightIn] = grad_weight_in;
    if (mask[kGradX]) grads[kGradX] = grad_x;
    return grads;
  }
  if (mask[kGradWeightIn]) {
    const at::Tensor grouped = at::empty({hidden, shape.split_size}, options);
    const Block x_block = Block::of(x), grad_z_block = Block::of(grad_z);
    for (int64_t g = 0; g < groups.count; ++g) {
      const int64_t first = groups.first_slot(g) * w, width = groups.size(g) * w;
      const Block dz = grad_z_block.columns(first, width).t();
      for (const WindowPiece& piece : window_pieces(shape, g)) {
        block_gemm(engine, Block::of(grouped).row_range(first, width).columns(piece.weight_start, piece.length), false,
                   std::nullopt, dz, x_block.columns(piece.input_start, piece.length));
      }
    }
    grads[kGradWeightIn] = to_layer_order(grouped.view({num_layers, w, shape.split_size}), 0, groups);
  }
  if (mask[kGradX]) {
    // When the first window_period groups' windows tile x exactly once, their GEMMs write dx
    // (no zero fill) and later groups' (ungrouped layers reading a window again) add to it.
    // Otherwise windows overlap or leave columns unread, and every GEMM adds into zeros.
    const bool tiles_once = groups.windows_tile_once(shape);
    at::Tensor grad_x = tiles_once ? at::empty_like(x) : at::zeros_like(x);
    const at::Tensor grouped_weight_in = to_group_major(weight_in, 0, groups).reshape({hidden, shape.split_size});
    const Block grad_x_block = Block::of(grad_x), grad_z_block = Block::of(grad_z);
    for (int64_t g = 0; g < groups.count; ++g) {
      const int64_t first = groups.first_slot(g) * w, width = groups.size(g) * w;
      const Block dz = grad_z_block.columns(first, width);
      const Block weights = Block::of(grouped_weight_in).row_range(first, width);
      for (const WindowPiece& piece : window_pieces(shape, g)) {
        block_gemm(engine, grad_x_block.columns(piece.input_start, piece.length),
                   !tiles_once || g >= groups.window_period, std::nullopt, dz,
                   weights.columns(piece.weight_start, piece.length));
      }
    }
    grads[kGradX] = grad_x;
  }
  return grads;
}

}  // namespace spinal_ops::chain

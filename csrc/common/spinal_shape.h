// SpinalShape: the C++ mirror of spinal_ops.SpinalConfig for the compiled kernels.
//
// The Python side (SpinalConfig) validates user input before any op runs; these checks
// guard direct calls of the ops (torch.ops.spinal_ops.*, opcheck, the C++ test) so that
// no shape can make a kernel read or write out of bounds.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace spinal_ops {

struct SpinalShape {
  int64_t batch;          // B: rows of x
  int64_t in_features;    // N
  int64_t num_layers;     // L
  int64_t layer_width;    // w
  int64_t split_size;     // s
  int64_t out_features;   // M, or 0 when there is no output projection
  bool has_bias;       // b_l present (its gradient wanted, in the backward)
  bool has_bias_out;   // b_out present (likewise)

  int64_t hidden() const { return num_layers * layer_width; }
  int64_t output_width() const { return out_features > 0 ? out_features : hidden(); }
  // First input column read by `layer`: (layer * s) mod N. The window of s columns
  // starting there wraps past N at most once because s <= N.
  int64_t window_start(int64_t layer) const { return (layer * split_size) % in_features; }
  // Columns of the window before the wrap (the rest, split_size - this, start at column 0).
  int64_t window_head(int64_t layer) const {
    return std::min(split_size, in_features - window_start(layer));
  }
};

// One contiguous run of layer l's window: input columns [input_start, +length) meet weight_in
// columns [weight_start, +length). A window is one piece, or two when it wraps past column N-1.
struct WindowPiece {
  int64_t input_start;
  int64_t weight_start;
  int64_t length;
};

inline std::vector<WindowPiece> window_pieces(const SpinalShape& shape, int64_t layer) {
  const int64_t start = shape.window_start(layer), head = shape.window_head(layer);
  std::vector<WindowPiece> pieces{{start, 0, head}};
  if (head < shape.split_size) pieces.push_back({0, head, shape.split_size - head});
  return pieces;
}

// Checks the tensors of native_forward / native_backward against each other and returns the shape.
SpinalShape check_spinal_shape(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight_out,
                               const std::optional<at::Tensor>& bias_out);

// Checks the tensors of native_backward (grad_out [B, M or L*w] and pre_activation [B, L*w] beside
// the forward's x and weights) and returns the shape. has_bias and has_bias_out are left false:
// the backward's output mask says which bias gradients are wanted.
SpinalShape check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre_activation,
                                  const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                                  const std::optional<at::Tensor>& weight_out);

}  // namespace spinal_ops

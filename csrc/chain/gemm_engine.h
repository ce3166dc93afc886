// The one hook through which a device supplies the hoisted chain's GEMM engine (hoisted_chain.h).
//
// The chain is written once, device-generically; what differs per device is how its products
// run on blocks of tensors (matrix_block.h), whether the sequential recurrence of narrow layers
// runs as one loop of its own, and the row-block sizes that suit those kernels. A GemmEngine holds
// those as plain function pointers and numbers. The op that calls the chain picks the engine per
// call (by device and dtype) and passes it in; the chain includes nothing device-specific.
//
// Every function member may be null, and each returns false, having done nothing, where it does
// not take the call: the chain then runs ATen's own call for it (at::mm_out / at::addmm_out on
// views of the blocks, the activations' out= kernels), or for a member that joins two steps
// (gemm_activation, gemm_activation_grad) the two steps through the members above. aten_engine()
// is that default: every member null, so the whole chain runs on ATen calls (cuBLAS on CUDA).
// csrc/cpu/chain_engine.h supplies the CPU engine (PyTorch's BLAS called on pointers, the
// register-tiled and few-column float32 kernels, plain loops for ReLU-like activations, the narrow
// recurrence), csrc/cuda/lt_engine.h the opt-in cuBLASLt engine (activations in the epilogues).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "../common/activation.h"
#include "../common/philox.h"
#include "../common/spinal_shape.h"
#include "matrix_block.h"

namespace spinal_ops::chain {

struct GemmEngine {
  // ---- products and element-wise passes on blocks (matrix_block.h) ----
  // c = start + a @ b, where start is c itself (accumulate) or, for the first product of a sum,
  // the bias row broadcast over c's rows (zero without a bias).
  bool (*gemm)(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a,
               const Block& b) = nullptr;
  // h = phi(z) (h may be z itself).
  bool (*activation)(const Block& h, const Block& z, Activation act, double negative_slope) = nullptr;
  // dz *= phi'(z) in place (only activations whose derivative reads z; the chain handles the rest).
  bool (*activation_grad)(const Block& dz, const Block& z, Activation act, double negative_slope) = nullptr;
  // out = a * b, or out += a * b (accumulate), element-wise on equally sized blocks (out may be a
  // itself): a dropout mask applied, b its factors (dropout_factors.h), which may be of another
  // dtype (float32 factors for half types).
  bool (*multiply)(const Block& out, bool accumulate, const Block& a, const Block& b) = nullptr;

  // ---- one recurrence step in one call (where null or false: gemm, then the element-wise pass) ----
  // Forward, layer l > 0 without dropout: z += a @ b, h = phi(z), where z is layer l's slot of the
  // products and h its slot of H (h may be z itself). keep_z: z must hold the pre-activation on
  // return (the training forward keeps Z there); otherwise z is scratch once h is written.
  bool (*gemm_activation)(const Block& h, const Block& z, bool keep_z, const Block& a, const Block& b, Activation act,
                          double negative_slope) = nullptr;
  // Backward, layer l < L-1 without dropout: dz = (dz + a @ b) * phi'(z) in place (z: what the
  // chain's phi' reads, Z, or H for an activation whose derivative is a function of its output).
  bool (*gemm_activation_grad)(const Block& dz, const Block& z, const Block& a, const Block& b, Activation act,
                               double negative_slope) = nullptr;

  // ---- the sequential recurrence as one loop of the engine's own ----
  // Whether the engine runs the whole recurrence of this call itself (narrow layers). Where it
  // does, the chain calls these two instead of one GEMM and one activation per layer. Columns:
  // `products`, `grad_z` and Z hold layer l at slot_offsets[l] (group-major); H, where it is
  // written separately, at hidden_offsets[l].
  //   forward_recurrence, every row: z_l = products[slot_l] + (m_l * h_{l-1}) @ R_{l-1}^T (l > 0),
  //     h_l = phi(z_l); z_l to pre_activation when it is defined, h_l to `hidden` (which may be
  //     `products` itself: slot l is read before it is overwritten).
  //   backward_recurrence, every row from the last layer down: grad_z[slot_l] holds dH_l on entry
  //     and dz_l = (dH_l + m_{l+1} * (dz_{l+1} @ R_l)) * phi'(z_l) on return, z_l from
  //     pre_activation; when grad_weight_hidden is defined it gets dR_{l-1} = sum over rows of
  //     dz_l^T (m_l * h_{l-1}).
  //   m_l: the dropout factors of h_{l-1} as layer l's input (Dropout::hidden_site(l); all 1 when
  //   the dropout is inactive); `first_row` is the global row of the tensors' first row.
  bool (*runs_recurrence)(const SpinalShape& shape, at::ScalarType dtype) = nullptr;
  void (*forward_recurrence)(const at::Tensor& products, const std::vector<int64_t>& slot_offsets,
                             const at::Tensor& weight_hidden, Activation act, double negative_slope,
                             const at::Tensor& pre_activation, const at::Tensor& hidden,
                             const std::vector<int64_t>& hidden_offsets, const Dropout& dropout,
                             int64_t first_row) = nullptr;
  void (*backward_recurrence)(const at::Tensor& grad_z, const std::vector<int64_t>& slot_offsets,
                              const at::Tensor& pre_activation, const at::Tensor& weight_hidden, Activation act,
                              double negative_slope, const at::Tensor& grad_weight_hidden, const Dropout& dropout,
                              int64_t first_row) = nullptr;

  // ---- block sizes and layer grouping (hoisted_chain.h) ----
  // Inference runs row blocks of at most this many elements of the [rows, L*w] buffer.
  int64_t inference_block_elements = int64_t{1} << 26;
  // Training runs the forward and the backward's recurrence in row blocks of at most this many
  // elements of the kept buffer; 0: the whole batch at once.
  int64_t training_block_elements = 0;
  // Whether layers reading the same window are grouped into one GEMM; null: always.
  bool (*groups_layers)(const SpinalShape& shape) = nullptr;
  // Dropout factors are computed in row blocks of at most this many elements, each block shared by
  // the products that use it, so that they are read from cache; 0: the whole batch at once (one
  // kernel per use on a GPU).
  int64_t dropout_block_elements = 0;
};

// ATen's engine: every member at its default. GPUs use it (the cuBLAS launches of ungrouped
// layers would cost more than the grouping's weight copies, so it always groups, and its
// inference blocks are only a memory bound, large enough to fill a device).
inline const GemmEngine& aten_engine() {
  static const GemmEngine engine;
  return engine;
}

}  // namespace spinal_ops::chain

// The sequential part of the hoisted chain (csrc/chain/hoisted_chain.h) for narrow layers on a CPU.
//
// With w <= kNarrowRecurrenceMaxWidth the recurrence as ATen calls is one [rows, w] x [w, w] GEMM and one
// activation call per layer: BLAS runs a GEMM that small at a few GFLOP/s, and at small batch
// the calls' own overhead is most of the op's time. These loops do the whole recurrence in one
// pass over the rows instead.
//
// Scheme: at::parallel_for over row ranges; each row walks the L layers with h_{l-1} / dz_{l+1}
// held in a w-element array on the stack, so the recurrence never leaves L1; the w x w weights
// of R (a few KB at most) stay cached across rows. Per row and layer: w*w multiply-adds, w
// activations (and, in the backward with dR wanted, w*w more and w activations to rebuild h).
// The backward splits the rows into chunks fixed by the batch, each with its own dR partial,
// summed in chunk order: deterministic whatever the thread count. The input products (one GEMM
// per window group) and the output projection stay on BLAS, which runs them well.
//
// Column layouts: `products`, `grad_z` and Z hold layer l at column slot_offsets[l] (the chain's
// group-major order); H, where it is written separately, at hidden_offsets[l].
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "../common/activation.h"
#include "../common/philox.h"

namespace spinal_ops::cpu {

// Widest layer the loops handle (the per-row arrays live on the stack).
constexpr int64_t kNarrowRecurrenceMaxWidth = 32;

// Rows per parallel task: enough work (rows * L * w^2 multiply-adds) to outweigh a task's start.
constexpr int64_t kNarrowRowGrain = 64;

// Rows per chunk of a backward pass (here and in narrow_chain.h): fixed by the batch, not by the
// thread count, so that the weight-gradient partials (one per chunk, added in chunk order) give
// the same bits with any number of threads.
inline int64_t backward_chunk_rows(int64_t rows) {
  constexpr int64_t kMaxChunks = 64;       // bounds the partials' memory: 64 x the weights' size
  constexpr int64_t kMinChunkRows = 256;   // and their zeroing and summing next to the rows' work
  return std::max(kMinChunkRows, (rows + kMaxChunks - 1) / kMaxChunks);
}

// For every row r: z_l = products[r, slot_l] + (m_l * h_{l-1}) @ R_{l-1}^T (l > 0), h_l = phi(z_l).
// z_l goes to pre_activation[r, slot_l] when it is defined (training), h_l to
// hidden[r, hidden_offsets[l]:] (hidden may be `products` itself: slot l is read before it is
// overwritten). m_l: the dropout factors of h_{l-1} as layer l's input (philox.h, computed per row
// in the loop; 1 when the dropout is inactive); row r is row first_row + r of the batch.
void narrow_forward_recurrence(const at::Tensor& products, const std::vector<int64_t>& slot_offsets,
                               const at::Tensor& weight_hidden, Activation act, double negative_slope,
                               const at::Tensor& pre_activation, const at::Tensor& hidden,
                               const std::vector<int64_t>& hidden_offsets, const Dropout& dropout,
                               int64_t first_row);

// For every row r, from the last layer down: grad_z[r, slot_l] holds dH_l on entry and
// dz_l = (dH_l + m_{l+1} * (dz_{l+1} @ R_l)) * phi'(z_l) on return, z_l read from pre_activation
// (layer order). When grad_weight_hidden is defined it gets dR_{l-1} = sum_r dz_l^T (m_l * h_{l-1})
// (h = phi(z)), summed in the same pass: (L-1) w x w products that BLAS would run at a few GFLOP/s,
// one call each. m_l as in the forward.
void narrow_backward_recurrence(const at::Tensor& grad_z, const std::vector<int64_t>& slot_offsets,
                                const at::Tensor& pre_activation, const at::Tensor& weight_hidden, Activation act,
                                double negative_slope, const at::Tensor& grad_weight_hidden, const Dropout& dropout,
                                int64_t first_row);

}  // namespace spinal_ops::cpu

// A narrow spinal layer (w <= kNarrowChainMaxWidth, float32) forward and backward, each as one pass
// over row tiles vectorised for AVX2+FMA: no ATen call between reading the inputs and writing
// the results.
//
// Why: at w = 8 (the paper's MNIST layer) every GEMM of the hoisted ATen chain has 8..24 output
// columns, which BLAS runs at a fraction of its speed, and at small batch the chain's ~25 ATen
// calls (forward) and ~40 (backward) cost more than the math. Here each tile of kTileRows = 4
// rows goes through every stage while it is in L1.
//
// Column layout (narrow_layout.h): layers g, g+p, ... read the same window (p = N / gcd(N, s), as
// in csrc/chain/hoisted_chain.h) and form a group; a row's per-layer values (P, dZ) are kept group-major,
// each group's columns rounded up to a whole vector, so that a group is one panel product.
//
// Forward (narrow_chain_forward.cpp), per tile:
//   1. P[rows, group] = bias + x[rows, window] @ A_group^T, A^T packed once per call as [s, columns];
//   2. the recurrence a layer at a time: z_l = P_l + h_{l-1} @ R_{l-1}^T as a product over the
//      tile's rows (four independent rows hide the FMA latency), then Z (when training) and
//      h_l = phi(z_l) row by row;
//   3. y[rows, M] = b_out + H[rows, L*w] @ W_out^T (W_out^T packed [L*w, M rounded up to 8]);
//      without projection h_l goes straight to out.
//   Launch: at::parallel_for over tiles, 16 tiles per task at least.
//
// Backward (narrow_chain_backward.cpp), over chunks of rows fixed by the batch
// (backward_chunk_rows: the weight gradients are per-chunk partial sums added in chunk order, so
// the bits do not depend on the thread count), each in blocks of 64 rows:
//   per tile: dH = G @ W_out; h = phi(Z) where a weight gradient needs it; from the last layer
//   down, dz_l = (dH_l + dz_{l+1} @ R_{l+1}) * phi'(z_l) into the block's dZ;
//   per block: dx[rows, window] = dZ_g @ A_g per group as a block product (column panels of A_g
//   outer, so each stays in L1 for the block's 64 rows; written in place without a zero fill
//   where the windows partition x's columns, N = k*s); dW_in_g^T += x_window^T @ dZ_g (x's
//   window columns broadcast, dZ rows the vectors; from 4 MB of x each block of x is transposed
//   first, its rows prefetched into L2 by the block's tiles, see kTransposedInputMinBytes),
//   dR_{l-1} += dz_l^T @ h_{l-1}, dW_out += G^T @ H, db and db_out as column sums.
//   Only what output_mask asks for is computed.
//
// Dropout (an active Dropout, contract §1 "Masks"): the masks are applied inside the row tiles,
// each factor computed from the seed and its counter where it is needed (chain::fill_factors:
// Philox on 8 or 16 consecutive counters per vector) and never stored. Forward, per tile: each
// layer's input product on its own window times its factors (gathered across the wrap, a
// [4, s] block in L1), with A_l^T packed per layer (the groups' panels serve layers that read
// the same inputs, which under dropout they no longer do); h_{l-1} times its factors before the
// recurrence's product; H times its factors before the projection. Backward, per tile: dH = (G @
// W_out) times H's factors; dz_l = (dH_l + (dz_{l+1} @ R_{l+1}) times h_l's factors) * phi'(z_l);
// h_l times those factors for dW_hidden and H times its own for dW_out (two buffers). Per block and
// layer (block_dropout_input_grads): the window's factors once for dx's (dz_l @ A_l) and for
// dW_in_l^T += (x window times them)^T @ dz_l (its partial then in per-layer columns). What it
// costs: docs/design.md, "What dropout costs".
//
// Register tiling of every product (avx2_tiles.h, panel_product): 4 rows by up to 3 vectors of 8
// columns = 12 ymm accumulators for the whole reduction, one broadcast per row and one load per
// vector per step; the weights (tens of KB for the layers this path takes) stay in L1/L2. A tile's
// rows past the batch read the batch's last row and are not written.
//
// The path runs where the CPU has AVX2 and FMA and PyTorch's own kernels use them
// (torch.backends.cpu.get_cpu_capability() is not "DEFAULT"; ATEN_CPU_CAPABILITY=default
// forces the portable ATen chain); elsewhere, and for float64, the ATen chain runs.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "../common/activation.h"
#include "../common/philox.h"
#include "../common/spinal_shape.h"
#include "narrow_recurrence.h"

namespace spinal_ops::cpu {

// Widest layer the narrow-chain kernels take: they win for w <= 32 (mnist, w = 8: 2x the hoisted
// chain's speed), while at vgg5's w = 128 repacking 0.5 MB of weights per call makes them slower
// at batch 64 (E 2.4 against 1.4 in inference) and no faster at 4096. Reproduce: `spinal-bench
// --preset mnist vgg5 --batch 64 4096 --backends cpu --threads 1` against a build with this set
// to 128.
constexpr int64_t kNarrowChainMaxWidth = 32;

// Whether this machine runs the narrow-chain kernels (AVX2 and FMA, and PyTorch's own kernels use them).
bool narrow_chain_kernels_run();

// Whether the narrow-chain kernels run this call (dtype, width, CPU features).
bool uses_narrow_chain(const SpinalShape& shape, const at::Tensor& x);

// (out, pre_activation) as chain::hoisted_forward returns them; x and the parameters are
// contiguous float32.
std::tuple<at::Tensor, at::Tensor> narrow_chain_forward(const SpinalShape& shape, const at::Tensor& x,
                                                        const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::optional<at::Tensor>& weight_out,
                                                        const std::optional<at::Tensor>& bias_out, Activation act,
                                                        double negative_slope, bool keep_pre_activation,
                                                        const Dropout& dropout = Dropout{});

// The gradients as chain::hoisted_backward returns them (an empty [0] tensor where mask is false);
// every tensor contiguous float32.
std::array<at::Tensor, 6> narrow_chain_backward(const SpinalShape& shape, const at::Tensor& grad_out,
                                                const at::Tensor& x, const at::Tensor& pre_activation,
                                                const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                                                const std::optional<at::Tensor>& weight_out, Activation act,
                                                double negative_slope, const std::array<bool, 6>& mask,
                                                const Dropout& dropout = Dropout{});

}  // namespace spinal_ops::cpu

// The whole forward of a narrow spinal layer (w <= kNarrowMaxWidth, float32) as one pass over
// row tiles, vectorised for AVX2+FMA: no ATen call between reading x and writing y.
//
// Why: at w = 8 (the paper's MNIST layer) every GEMM of the hoisted ATen chain has 8..24 output
// columns, which BLAS runs at a fraction of its speed, and at small batch the chain's ~25 ATen
// calls cost more than the math. Here each tile of kTileRows rows goes through every stage while
// it is in L1:
//
//   1. input products: for each window group (layers g, g+p, ... reading the same columns, as
//      in csrc/aten_chain.h) P[rows, group columns] = bias + x[rows, window] @ A_group^T, with
//      A_group^T packed once per call as [s, columns rounded up to 8] panels;
//   2. recurrence, row by row: z_l = P_l + h_{l-1} @ R_{l-1}^T, h_l = phi(z_l) (Z written out
//      when training);
//   3. output projection: y[rows, M] = b_out + H[rows, L*w] @ W_out^T, with W_out^T packed as
//      [L*w, M rounded up to 8]; without projection h_l goes straight to out.
//
// Register tiling of stages 1 and 3 (panel_product): kTileRows = 4 rows by up to 3 vectors of 8
// columns = 12 ymm accumulators, one broadcast per row and one load per vector for every k; the
// weights (a few tens of KB for the layers this path takes) stay in L1/L2 across tiles.
// Launch: at::parallel_for over tiles (torch.get_num_threads() threads); a tile's rows past the
// batch read the batch's last row and are not written.
//
// The path runs where the CPU has AVX2 and FMA and PyTorch's own kernels use them
// (torch.backends.cpu.get_cpu_capability() is not "DEFAULT"; ATEN_CPU_CAPABILITY=default
// forces the portable ATen chain); elsewhere, and for float64, the ATen chain runs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../activation.h"
#include "../spinal_shape.h"

namespace spinal_ops::cpu {

// Whether fused_narrow_forward runs this call (dtype, width, CPU features).
bool uses_fused_narrow_forward(const SpinalShape& shape, const at::Tensor& x);

// (out, pre_activation) as chain::hoisted_forward returns them; x and the parameters are
// contiguous float32.
std::tuple<at::Tensor, at::Tensor> fused_narrow_forward(const SpinalShape& shape, const at::Tensor& x,
                                                        const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::optional<at::Tensor>& weight_out,
                                                        const std::optional<at::Tensor>& bias_out, Activation act,
                                                        double negative_slope, bool keep_pre_activation);

}  // namespace spinal_ops::cpu

// The hoisted spinal chain: one device-generic implementation; each product runs on the GEMM
// engine the calling op passes in (gemm_engine.h: ATen's by default, cuBLAS on CUDA; the CPU op's
// engine calls BLAS and its own kernels on pointers).
//
// Only h_{l-1} @ R_l^T is sequential. Everything else is hoisted out of the layer loop into a
// few large GEMMs:
//
//   * Layers whose windows start at the same column read the same input columns. Layer l starts
//     at (l*s) mod N, so equal starts repeat with period p = N / gcd(N, s): the groups are
//     {g, g+p, g+2p, ...} for g < min(p, L) (with N = k*s, p = k: k GEMMs instead of L).
//     Each group's input products are one GEMM x[:, window] @ [A_g; A_{g+p}; ...]^T, two when
//     the window wraps past column N-1.
//   * The group GEMMs write a [B, L*w] buffer in "group-major" column order (group 0's layers,
//     then group 1's, ...). Weights are permuted into that order once per call (weight-sized
//     copies, cheap next to the B-sized work). The recurrence then computes each z_l in place in
//     its slot: that buffer is the Z the forward returns and the backward reads, in group-major
//     order (a copy into layer order would cost a pass over [B, L*w] per call). Only y, or H
//     without projection, and the gradients leave the pair in layer order.
//   * With a projection and an activation whose derivative is a function of its output (relu,
//     tanh, sigmoid, identity), the forward keeps H = phi(Z) instead of Z: h_l is computed in
//     place over z_l, so the forward uses one [B, L*w] buffer, and the backward, which needs H
//     for dW_out and dW_hidden anyway, neither allocates nor recomputes it. (Not on the narrow
//     recurrence, which rebuilds h from Z row by row.)
//     The engine may leave layers ungrouped (GemmEngine::groups_layers: the CPU's does for wide
//     layers, where a GEMM is efficient alone and the copies would cost more than grouping
//     gains): then one GEMM per layer, in layer order.
//   * The output projection is one GEMM on H; its gradients dW_out = G^T H and dH = G W_out are
//     one GEMM each; dx and dW_in are one GEMM per group (and window piece).
//
// The backward computes only what `output_mask` asks for (x, weight_in, weight_hidden, bias,
// weight_out, bias_out): a frozen backbone pays no dx, frozen spinal weights no weight
// gradients; a gradient not asked for is returned as an empty [0] tensor. The forward keeps Z
// only when asked (training); inference runs row blocks through one reused buffer, so its
// memory is O(B*M + block*L*w) instead of O(B*L*w). Where the engine asks for it
// (GemmEngine::training_block_elements), training runs the forward and the backward's recurrence
// in row blocks too, so that each activation pass finds its slot still cached from the GEMM that
// wrote it.
//
// The GEMMs and activations work on blocks of the tensors (matrix_block.h), which the engine may
// run on pointers with no view made per block.
//
// Dropout (contract §1, "Masks"; an active `dropout`): each layer's window of x, h_{l-1} as layer
// l's input and H as the projection's input are multiplied by their factors (dropout_factors.h:
// 0 or 1/(1-p), from the seed and the site's counter) where they are read, never stored, and the
// backward recomputes the same factors. Layers are then not grouped by window (each layer's x mask
// differs, so two layers no longer read the same input): one input GEMM per layer, on the layer's
// masked window, and Z in layer order. Per layer the forward makes the masked copy of its window
// (and of h_{l-1}), the projection one of H; the backward scales dH by H's factors and dx's
// products by the windows', and multiplies the weight gradients' inputs (x windows, h_{l-1}, H) by
// theirs. The narrow recurrence applies h_{l-1}'s factors inside its row loop.
//
// Tensors come in the compute dtype (the CPU op upcasts bfloat16 first; cuBLAS computes half
// types with fp32 accumulation itself) and contiguous. "The narrow recurrence" below is an
// engine's own loop for the whole recurrence of narrow layers (GemmEngine::runs_recurrence).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "../common/activation.h"
#include "../common/philox.h"
#include "../common/spinal_shape.h"
#include "gemm_engine.h"

namespace spinal_ops::chain {

// Gradient slots of native_backward, in schema order.
enum GradSlot : int { kGradX, kGradWeightIn, kGradWeightHidden, kGradBias, kGradWeightOut, kGradBiasOut };
using GradMask = std::array<bool, 6>;

// h = phi(z) into h (which may be z itself), for equally shaped, possibly strided, tensors.
void apply_activation(at::Tensor h, const at::Tensor& z, Activation act, double negative_slope);

// dz *= phi'(z) in place; h = phi(z) (tanh and sigmoid use it).
void multiply_by_activation_grad(at::Tensor dz, const at::Tensor& z, const at::Tensor& h, Activation act,
                                 double negative_slope);

// (out, pre_activation): out is y [B, M] (H [B, L*w] without projection); pre_activation is what
// hoisted_backward reads, Z or H [B, L*w] in group-major order (see above), when
// keep_pre_activation, else an empty [0] tensor. The backward takes the forward's `dropout`.
std::tuple<at::Tensor, at::Tensor> hoisted_forward(const GemmEngine& engine, const SpinalShape& shape,
                                                   const at::Tensor& x, const at::Tensor& weight_in,
                                                   const at::Tensor& weight_hidden,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& weight_out,
                                                   const std::optional<at::Tensor>& bias_out, Activation act,
                                                   double negative_slope, bool keep_pre_activation,
                                                   const Dropout& dropout = Dropout{});

// (grad_x, grad_weight_in, grad_weight_hidden, grad_bias, grad_weight_out, grad_bias_out); a
// slot whose mask entry is false holds an empty [0] tensor.
std::array<at::Tensor, 6> hoisted_backward(const GemmEngine& engine, const SpinalShape& shape,
                                           const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& pre_activation, const at::Tensor& weight_in,
                                           const at::Tensor& weight_hidden,
                                           const std::optional<at::Tensor>& weight_out, Activation act,
                                           double negative_slope, const GradMask& mask,
                                           const Dropout& dropout = Dropout{});

}  // namespace spinal_ops::chain

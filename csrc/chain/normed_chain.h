// The normed chain: a training call of a layer with batch norm (contract §1, "Training stages"),
// optionally with dropout, as the op pair normed_forward / normed_backward.
//
// Batch norm needs the whole batch's statistics of z_l before h_l exists, so the chain runs layer
// by layer over the whole batch, in layer order:
//
//   z_l = A_l · drop(x[c_l]) + R_l · drop(h_{l-1}) + b_l          (stored in pre_norm [B, L*w])
//   u_l = γ_l (z_l − mean_l) / sqrt(var_l + eps) + β_l            (batch statistics, biased var)
//   h_l = φ(u_l);  y = W_out · drop(H) + b_out
//
// Everything is ATen calls (addmm/mm per layer into a contiguous [B, w] buffer, ATen's batch-norm
// statistics and backward kernels on it), so one implementation serves CPU and CUDA tensors. Dropout
// factors come from dropout_factors.h (the contract's Philox sites and counters), recomputed by the
// backward, as are u and h from pre_norm and the statistics: nothing else is stored. Statistics are
// float32 for half inputs (and the normalisation computed in float32), the compute dtype otherwise.
// The running statistics are not touched: the caller updates them from batch_mean and batch_var.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace spinal_ops::chain {

// (out, pre_norm, batch_mean, batch_var): out is y [B, M] (H [B, L*w] without projection),
// pre_norm is Z [B, L*w] in layer order, the statistics are [L, w].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> normed_forward(
    const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& weight_hidden,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight_out,
    const std::optional<at::Tensor>& bias_out, const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias, c10::string_view activation, double negative_slope,
    double norm_eps, bool allow_tf32, const std::optional<at::Tensor>& dropout_seed, double dropout_p);

// Gradients of x, weight_in, weight_hidden, bias, weight_out, bias_out, norm_weight, norm_bias; a
// slot whose output_mask entry is false holds an empty [0] tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
normed_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre_norm,
                const at::Tensor& batch_mean, const at::Tensor& batch_var, const at::Tensor& weight_in,
                const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
                const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
                std::array<bool, 8> output_mask, c10::string_view activation, double negative_slope,
                double norm_eps, bool allow_tf32, const std::optional<at::Tensor>& dropout_seed, double dropout_p);

}  // namespace spinal_ops::chain

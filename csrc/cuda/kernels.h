// Host entry points of the CUDA kernels (forward.cu, backward.cu). Inputs are contiguous CUDA tensors of one dtype, already checked by
// check_spinal_shape; outputs are allocated by the caller (register.cu).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "../common/activation.h"
#include "../common/philox.h"
#include "../common/spinal_shape.h"

namespace spinal_ops {
namespace cuda_kernels {

// Data pointer of an optional tensor, nullptr when absent.
template <typename T>
T* optional_data(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

// Why the native kernels run no layer of `dtype` on `device`, "" where they do: bfloat16 before
// compute capability 8.0 (sm_75 has fp16 tensor cores but no bf16 ones), and every dtype before
// 7.5 (no device code for it); the op routes those to the hoisted chain at every width. Python's
// CudaBackend.supports() reports it (the text names the compute capability, not the device).
std::string native_kernels_refusal(at::ScalarType dtype, int device);

// Widest layer the tile kernels run on `device` for this dtype (and, for float32, TF32 policy):
// kTileKernelMaxWidth (tile_mma.cuh), or less where their shared memory exceeds the device's opt-in
// maximum per block (99 KB on sm_86/89/120, 64 KB on sm_75). 0: none fits, or the dtype has no
// native kernels on the device (native_kernels_refusal).
int64_t tile_kernel_width_limit(at::ScalarType dtype, bool allow_tf32, int device);

// The routing decision of the CUDA op: the tile kernels when the dtype runs on the device
// (native_kernels_refusal) and w <= tile_kernel_width_limit(...) under the op's TF32 choice, the
// hoisted chain (csrc/chain/hoisted_chain.h) otherwise.
bool use_native_kernels(const SpinalShape& shape, at::ScalarType dtype, bool allow_tf32, int device);

// Whether this shape runs the narrow kernels (narrow_kernels.cuh: w <= 16, M <= 16; one thread per
// row) for the forward and backward launch 1 rather than the tiled ones.
bool narrow_kernels_fit(const SpinalShape& shape);

// Whether the warp-level narrow forward (warp_narrow_kernels.cuh) can run this layer on `device`:
// fp16 or bf16, compute capability 8.0+, w <= 32, M <= 32 (or none), and its shared memory (every
// layer's weights and one warp's tiles) within the device's opt-in maximum.
bool warp_narrow_forward_fits(const SpinalShape& shape, at::ScalarType dtype, int device);

// Whether the forward runs it: where it fits and SPINAL_OPS_CUDA_WARP_NARROW=1 (read per call), as
// it has not yet been measured on a GPU.
bool use_warp_narrow_forward(const SpinalShape& shape, at::ScalarType dtype, int device);

// One launch of the warp-level narrow forward (warp_narrow_forward_fits must hold): writes out and,
// where pre_activation has rows, Z.
void launch_warp_narrow_forward(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
                                const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& weight_out,
                                const std::optional<at::Tensor>& bias_out, Activation act, float negative_slope,
                                const at::Tensor& out, const at::Tensor& pre_activation);

// One launch: writes out [B, M or L*w] and pre_activation Z [B, L*w]. B > 0. The narrow kernel
// runs where it fits unless `allow_narrow` is false (the CPU model of CUDA tests both kernels);
// with allow_narrow, use_warp_narrow_forward() sends a call without dropout to the warp-level narrow
// forward. An active `dropout` is applied inside the kernels (contract §1, "Masks").
void launch_native_forward(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
                          const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                          Activation act, float negative_slope, bool allow_tf32, const at::Tensor& out,
                          const at::Tensor& pre_activation, const Dropout& dropout, bool allow_narrow = true);

// The persistent forward (persistent_forward.cuh): one launch over every SM for any w, with the
// tile forward's outputs and Z layout. Opt-in: whether SPINAL_OPS_CUDA_PERSISTENT=1 is set now.
bool persistent_forward_requested();

// Whether the persistent forward runs `dtype` on `device` (the native kernels' dtype rules; its
// shared memory does not grow with w and fits every target).
bool persistent_forward_fits(at::ScalarType dtype, bool allow_tf32, int device);

// One launch (and a memset of its counters): writes out and, when pre_activation is not empty,
// Z [B, L*w]. B > 0.
void launch_persistent_forward(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
                               const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                               Activation act, float negative_slope, bool allow_tf32, const at::Tensor& out,
                               const at::Tensor& pre_activation);

struct BackwardOutputs {
  at::Tensor grad_x, grad_weight_in, grad_weight_hidden, grad_bias, grad_weight_out, grad_bias_out;
};

// Whether the warp-level narrow backward launch 1 (warp_narrow_kernels.cuh) can run this layer on
// `device`: where the warp-level forward fits and its own shared memory (the weights, the dx tiles
// and one warp's tiles) is within the device's opt-in maximum.
bool warp_narrow_backward_fits(const SpinalShape& shape, at::ScalarType dtype, int device);

// Whether launch_native_backward runs it: where the forward would run its warp-level partner
// (use_warp_narrow_forward: SPINAL_OPS_CUDA_WARP_NARROW=1) and it fits.
bool use_warp_narrow_backward(const SpinalShape& shape, at::ScalarType dtype, int device);

// The two backward launches with launch 1 on the warp-level kernel (warp_narrow_backward_fits must
// hold; no dropout). B > 0.
void launch_warp_narrow_backward(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                                 const at::Tensor& pre_activation, const at::Tensor& weight_in,
                                 const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
                                 Activation act, float negative_slope, const BackwardOutputs& grads);

// Whether the op runs its forward and backward launch 1 on the persistent kernels
// (persistent_forward.cuh, persistent_backward.cuh) at any w: no dropout, SPINAL_OPS_CUDA_PERSISTENT=1
// (read per call: a forward and its backward must see the same setting, as the persistent and tile
// forwards write Z in layer order and the hoisted forward does not) and where the persistent
// forward fits.
bool use_persistent_kernels(const Dropout& dropout, at::ScalarType dtype, bool allow_tf32, int device);

// The two backward launches with launch 1 on the persistent kernel, for any w (no dropout). B > 0.
void launch_persistent_backward(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& pre_activation, const at::Tensor& weight_in,
                                const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
                                Activation act, float negative_slope, bool allow_tf32, const BackwardOutputs& grads);

// Two launches: data gradients (dx, dZ), then every weight/bias gradient. B > 0. Launch 1 runs the
// narrow kernel where it fits unless `allow_narrow` is false; with allow_narrow,
// use_warp_narrow_backward() sends a call without dropout to the warp-level one; before either,
// use_persistent_kernels() sends one to the persistent launch 1. `dropout`: the forward's, recomputed.
void launch_native_backward(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& pre_activation, const at::Tensor& weight_in,
                           const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
                           Activation act, float negative_slope, bool allow_tf32, const BackwardOutputs& grads,
                           const Dropout& dropout, bool allow_narrow = true);

}  // namespace cuda_kernels
}  // namespace spinal_ops

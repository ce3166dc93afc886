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

// One launch: writes out [B, M or L*w] and pre_activation Z [B, L*w]. B > 0. The narrow kernel
// runs where it fits unless `allow_narrow` is false (the CPU model of CUDA tests both kernels).
// An active `dropout` is applied inside the kernels (contract §1, "Masks").
void launch_native_forward(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
                          const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                          Activation act, float negative_slope, bool allow_tf32, const at::Tensor& out,
                          const at::Tensor& pre_activation, const Dropout& dropout, bool allow_narrow = true);

struct BackwardOutputs {
  at::Tensor grad_x, grad_weight_in, grad_weight_hidden, grad_bias, grad_weight_out, grad_bias_out;
};

// Two launches: data gradients (dx, dZ), then every weight/bias gradient. B > 0. Launch 1 runs the
// narrow kernel where it fits unless `allow_narrow` is false. `dropout`: the forward's, recomputed.
void launch_native_backward(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& pre_activation, const at::Tensor& weight_in,
                           const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
                           Activation act, float negative_slope, bool allow_tf32, const BackwardOutputs& grads,
                           const Dropout& dropout, bool allow_narrow = true);

}  // namespace cuda_kernels
}  // namespace spinal_ops

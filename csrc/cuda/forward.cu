// Host launcher of the fused forward kernel (forward_kernel.cuh holds the kernel, its tiling and smem budget).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "forward_kernel.cuh"

namespace spinal_ops {
namespace cuda_kernels {
namespace {

template <class Mma, typename T>
void launch(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
            const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
            const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out, Activation act,
            float slope, const at::Tensor& out, const at::Tensor& pre_activation) {
  const ForwardArgs<T> p = make_forward_args<T>(shape, x, weight_in, weight_hidden, bias, weight_out, bias_out, act,
                                                slope, out, pre_activation);
  const SmemLayout<Mma, T> layout(p.state_width);
  const auto kernel = spinal_forward_kernel<Mma, T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(layout.total)));
  const int64_t blocks = (shape.batch + Mma::kTileM - 1) / Mma::kTileM;
  TORCH_CHECK(blocks <= INT32_MAX, "spinal_ops: batch ", shape.batch, " is too large for the CUDA grid");
  kernel<<<static_cast<unsigned>(blocks), kThreads, layout.total, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool fused_path_supports(const SpinalShape& shape) { return shape.layer_width <= kFusedMaxWidth; }

void launch_fused_forward(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
                          const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                          Activation act, float negative_slope, const at::Tensor& out,
                          const at::Tensor& pre_activation) {
  TORCH_CHECK(fused_path_supports(shape), "spinal_ops: fused CUDA forward needs w <= ", kFusedMaxWidth);
  switch (x.scalar_type()) {
    case at::kFloat:
      if (at::globalContext().allowTF32CuBLAS()) {
        launch<WmmaMma<32, nvcuda::wmma::precision::tf32>, float>(shape, x, weight_in, weight_hidden, bias, weight_out,
                                                                  bias_out, act, negative_slope, out, pre_activation);
      } else {
        launch<SimtMma<32>, float>(shape, x, weight_in, weight_hidden, bias, weight_out, bias_out, act,
                                   negative_slope, out, pre_activation);
      }
      break;
    case at::kHalf:
      launch<WmmaMma<64, __half>, at::Half>(shape, x, weight_in, weight_hidden, bias, weight_out, bias_out, act,
                                            negative_slope, out, pre_activation);
      break;
    case at::kBFloat16:
      launch<WmmaMma<64, __nv_bfloat16>, at::BFloat16>(shape, x, weight_in, weight_hidden, bias, weight_out,
                                                       bias_out, act, negative_slope, out, pre_activation);
      break;
    default:
      TORCH_CHECK(false, "spinal_ops: the CUDA kernels take float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

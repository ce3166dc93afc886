// Host launcher of the two fused backward kernels (backward_kernels.cuh holds the kernels,
// their tiling and smem budget): allocates the dZ workspace and the split-K workspace.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "backward_kernels.cuh"

namespace spinal_ops {
namespace cuda_kernels {
namespace {

// DataMma runs launch 1 (dZ, dx), GradMma launch 2 (weight and bias gradients); both tile kM rows.
template <class DataMma, class GradMma, typename T>
void launch(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre_activation,
            const at::Tensor& weight_in, const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
            Activation act, float slope, const BackwardOutputs& grads) {
  static_assert(DataMma::kTileM == GradMma::kTileM, "both launches split the rows alike");
  constexpr int kM = DataMma::kTileM;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t row_tiles = ceil_div(shape.batch, kM);
  TORCH_CHECK(row_tiles <= INT32_MAX, "spinal_ops: batch ", shape.batch, " is too large for the CUDA grid");
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.get_device()));
  // Launch 2's work split is decided first: launch 1 zeroes its tile counters.
  const WeightGradPlan plan = plan_weight_grads<kM>(shape, sm_count);
  const int64_t ctas = plan.tiles.total * plan.splits;
  TORCH_CHECK(ctas <= INT32_MAX, "spinal_ops: too many weight-gradient tiles for the CUDA grid");
  at::Tensor partials, counters;
  if (plan.splits > 1) {
    partials = at::empty({ctas * kM * kTileN}, x.options().dtype(at::kFloat));
    counters = at::empty({plan.tiles.total}, x.options().dtype(at::kInt));
  }
  int* counters_data = plan.splits > 1 ? counters.data_ptr<int>() : nullptr;
  const at::Tensor grad_pre = at::empty_like(pre_activation);

  const DataGradArgs<T> d =
      make_data_grad_args<T>(shape, grad_out, pre_activation, weight_in, weight_hidden, weight_out, act, slope,
                             grad_pre, grads.grad_x, counters_data, plan.tiles.total);
  const SmemLayout<DataMma, T> data_layout(d.state_width);
  const auto data_kernel = spinal_data_grad_kernel<DataMma, T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(data_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(data_layout.total)));
  data_kernel<<<static_cast<unsigned>(row_tiles), kThreads, data_layout.total, stream>>>(d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const WeightGradArgs<T> g = make_weight_grad_args<T>(
      shape, plan, grad_out, x, pre_activation, grad_pre, act, slope, grads,
      plan.splits > 1 ? partials.data_ptr<float>() : nullptr, counters_data);
  const SmemLayout<GradMma, T> grad_layout(0);
  const auto grad_kernel = spinal_weight_grad_kernel<GradMma, T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(grad_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(grad_layout.total)));
  grad_kernel<<<static_cast<unsigned>(ctas), kThreads, grad_layout.total, stream>>>(g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_fused_backward(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& pre_activation, const at::Tensor& weight_in,
                           const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
                           Activation act, float negative_slope, const BackwardOutputs& grads) {
  TORCH_CHECK(fused_path_supports(shape), "spinal_ops: fused CUDA backward needs w <= ", kFusedMaxWidth);
  switch (x.scalar_type()) {
    case at::kFloat:
      if (at::globalContext().allowTF32CuBLAS()) {
        // TF32 for the data gradients (the matmuls eager runs in TF32 too), exact fp32 for launch 2:
        // its bias gradients are column sums, which eager computes in fp32, and TF32-rounding the
        // summed rows would cost ~1e-3 relative error there.
        launch<WmmaMma<32, nvcuda::wmma::precision::tf32>, SimtMma<32>, float>(
            shape, grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, act, negative_slope, grads);
      } else {
        launch<SimtMma<32>, SimtMma<32>, float>(shape, grad_out, x, pre_activation, weight_in, weight_hidden,
                                                weight_out, act, negative_slope, grads);
      }
      break;
    case at::kHalf:
      launch<WmmaMma<64, __half>, WmmaMma<64, __half>, at::Half>(shape, grad_out, x, pre_activation, weight_in, weight_hidden, weight_out,
                                            act, negative_slope, grads);
      break;
    case at::kBFloat16:
      launch<WmmaMma<64, __nv_bfloat16>, WmmaMma<64, __nv_bfloat16>, at::BFloat16>(shape, grad_out, x, pre_activation, weight_in, weight_hidden,
                                                       weight_out, act, negative_slope, grads);
      break;
    default:
      TORCH_CHECK(false, "spinal_ops: the CUDA kernels take float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

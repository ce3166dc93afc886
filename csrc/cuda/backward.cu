// Host launcher of the two fused backward kernels (backward_kernels.cuh holds the kernels,
// their tiling and smem budget): allocates the dZ workspace and the split-K workspace.
#include "backward_kernels.cuh"
#include "launch.cuh"

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
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  // Launch 2's work split is decided first: launch 1 zeroes its tile counters.
  const WeightGradPlan plan = plan_weight_grads<kM>(shape, sm_count);
  const int64_t ctas = plan.tiles.total * plan.splits;
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
  launch_kernel<spinal_data_grad_kernel<DataMma, T>>(ceil_div(shape.batch, kM), fused_smem_bytes<DataMma, T>(d.w),
                                                     fused_smem_bytes<DataMma, T>(kFusedMaxWidth), d);

  const WeightGradArgs<T> g = make_weight_grad_args<T>(
      shape, plan, grad_out, x, pre_activation, grad_pre, act, slope, grads,
      plan.splits > 1 ? partials.data_ptr<float>() : nullptr, counters_data);
  const int64_t grad_smem = SmemLayout<GradMma, T>(0).total;
  launch_kernel<spinal_weight_grad_kernel<GradMma, T>>(ctas, grad_smem, grad_smem, g);
}

}  // namespace

void launch_fused_backward(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& pre_activation, const at::Tensor& weight_in,
                           const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
                           Activation act, float negative_slope, bool allow_tf32, const BackwardOutputs& grads) {
  TORCH_CHECK(shape.layer_width <= kFusedMaxWidth, "spinal_ops: fused CUDA backward needs w <= ", kFusedMaxWidth);
  with_kernel_types(x.scalar_type(), allow_tf32, [&](auto types) {
    using Types = decltype(types);
    launch<typename Types::DataMma, typename Types::GradMma, typename Types::Element>(
        shape, grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, act, negative_slope, grads);
  });
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

// Host launcher of the two tile backward kernels (backward_kernels.cuh holds the kernels,
// their tiling and smem budget; narrow_kernels.cuh the narrow layers' launch 1): allocates the dZ
// workspace and the split-K workspace.
#include "backward_kernels.cuh"
#include "launch.cuh"
#include "narrow_kernels.cuh"

namespace spinal_ops {
namespace cuda_kernels {
namespace {

// Launch 1 for narrow layers: one thread per row (narrow_kernels.cuh).
template <typename T>
void launch_narrow_data_grad(const SpinalShape& shape, const DataGradArgs<T>& d, const Dropout& dropout) {
  with_narrow_width(shape.layer_width, [&](auto width) {
    constexpr int W = decltype(width)::value;
    const int64_t smem_bytes = NarrowSmem<W>::kBytes;
    const int64_t blocks = ceil_div(shape.batch, kNarrowRows);
    with_dropout(dropout, [&](auto drops) {
      constexpr bool kDrops = decltype(drops)::value;
      launch_kernel<spinal_narrow_data_grad_kernel<T, W, kDrops>>(blocks, smem_bytes, smem_bytes, d, kNarrowRows);
    });
  });
}

// DataMma runs launch 1 (dZ, dx; narrow layers: the narrow kernel where allowed), GradMma launch 2
// (weight and bias gradients); both tile kM rows.
template <class DataMma, class GradMma, typename T>
void launch(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre_activation,
            const at::Tensor& weight_in, const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
            Activation act, float slope, const BackwardOutputs& grads, const Dropout& dropout, bool allow_narrow) {
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
                             dropout, grad_pre, grads.grad_x, counters_data, plan.tiles.total);
  if (allow_narrow && narrow_kernels_fit(shape)) {
    launch_narrow_data_grad<T>(shape, d, dropout);
  } else {
    with_dropout(dropout, [&](auto drops) {
      constexpr bool kDrops = decltype(drops)::value;
      launch_kernel<spinal_data_grad_kernel<DataMma, T, kDrops>>(ceil_div(shape.batch, kM),
                                                                  tile_smem_bytes<DataMma, T>(d.w),
                                                                  tile_smem_bytes<DataMma, T>(kTileKernelMaxWidth), d);
    });
  }

  const WeightGradArgs<T> g = make_weight_grad_args<T>(
      shape, plan, grad_out, x, pre_activation, grad_pre, act, slope, dropout, grads,
      plan.splits > 1 ? partials.data_ptr<float>() : nullptr, counters_data);
  const int64_t grad_smem = SmemLayout<GradMma, T>(0).total;
  with_dropout(dropout, [&](auto drops) {
    constexpr bool kDrops = decltype(drops)::value;
    launch_kernel<spinal_weight_grad_kernel<GradMma, T, kDrops>>(ctas, grad_smem, grad_smem, g);
  });
}

}  // namespace

void launch_native_backward(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& pre_activation, const at::Tensor& weight_in,
                           const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
                           Activation act, float negative_slope, bool allow_tf32, const BackwardOutputs& grads,
                           const Dropout& dropout, bool allow_narrow) {
  TORCH_CHECK(shape.layer_width <= kTileKernelMaxWidth, "spinal_ops: CUDA tile backward needs w <= ", kTileKernelMaxWidth);
  const int capability = compute_capability(c10::cuda::current_device());
  with_kernel_types(x.scalar_type(), allow_tf32, capability, [&](auto types) {
    using Types = decltype(types);
    launch<typename Types::DataMma, typename Types::GradMma, typename Types::Element>(
        shape, grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, act, negative_slope, grads, dropout,
        allow_narrow);
  });
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

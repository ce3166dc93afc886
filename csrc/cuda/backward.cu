// Host launcher of the two tile backward kernels (backward_kernels.cuh holds the kernels,
// their tiling and smem budget; narrow_kernels.cuh the narrow layers' launch 1;
// warp_narrow_kernels.cuh the opt-in warp-level one, persistent_backward.cuh the opt-in persistent
// one): allocates the dZ workspace and the split-K workspace.
#include <algorithm>

#include "backward_kernels.cuh"
#include "launch.cuh"
#include "narrow_kernels.cuh"
#include "persistent_backward.cuh"
#include "warp_narrow_kernels.cuh"

namespace spinal_ops {
namespace cuda_kernels {
namespace {

// Which kernel runs launch 1; launch 2 is the same after each.
enum class DataGradKernel { kTiled, kNarrow, kWarpNarrow, kPersistent };

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

// Warps per CTA of the warp-level data-gradient kernel whose shared memory fits `optin` bytes (at
// most kWarpNarrowMaxWarps); 0 when not even one does. The layer's sizes must hold w, M <= 32.
int64_t warp_narrow_grad_warps_fitting(const SpinalShape& shape, int64_t optin) {
  int64_t warps = 0;
  with_warp_narrow_sizes(shape, [&](auto width, auto outputs) {
    using Layout = WarpNarrowGradLayout<decltype(width)::value, decltype(outputs)::value>;
    const Layout layout(static_cast<int>(shape.num_layers), shape.out_features > 0);
    const int64_t weights = layout.total(0, warp_narrow_dx_tiles(static_cast<int>(shape.in_features),
                                                                  static_cast<int>(shape.split_size),
                                                                  static_cast<int>(shape.num_layers)));
    warps = warp_narrow_warps_in(optin, weights, layout.warp_bytes);
  });
  return warps;
}

// Launch 1 on the warp-level kernel (warp_narrow_kernels.cuh): a persistent grid of CTAs with as
// many warps as fit (the weights are staged once per CTA), at most one per 16-row tile.
template <typename T>
void launch_warp_narrow_data_grad(const SpinalShape& shape, const DataGradArgs<T>& d) {
  const int device = c10::cuda::current_device();
  const int64_t optin = smem_optin(device);
  const int64_t tiles = ceil_div(shape.batch, kWarpRows);
  const int64_t warps = std::min(warp_narrow_grad_warps_fitting(shape, optin), tiles);
  const int64_t dx_tiles = warp_narrow_dx_tiles(d.n, d.s, d.num_layers);
  with_warp_narrow_sizes(shape, [&](auto width, auto outputs) {
    constexpr int W = decltype(width)::value, MP = decltype(outputs)::value;
    constexpr auto kernel = spinal_warp_narrow_data_grad_kernel<T, W, MP>;
    const int64_t smem_bytes =
        WarpNarrowGradLayout<W, MP>(d.num_layers, d.out_features > 0).total(static_cast<int>(warps), dx_tiles);
    launch_persistent_warps<kernel>(tiles, warps, smem_bytes, optin, d);
  });
}

// DataMma runs launch 1 (dZ, dx) where `data_kernel` is kTiled or kPersistent (allow_tf32 picks it
// again there), GradMma launch 2 (weight and bias gradients); both tile kM rows.
template <class DataMma, class GradMma, typename T>
void launch(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre_activation,
            const at::Tensor& weight_in, const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
            Activation act, float slope, bool allow_tf32, const BackwardOutputs& grads, const Dropout& dropout,
            DataGradKernel data_kernel) {
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
  if (data_kernel == DataGradKernel::kWarpNarrow) {
    if constexpr (std::is_same_v<T, float>) {
      TORCH_CHECK(false, "spinal_ops: the warp-level narrow backward takes fp16 and bf16 only");
    } else {
      launch_warp_narrow_data_grad<T>(shape, d);
    }
  } else if (data_kernel == DataGradKernel::kPersistent) {
    launch_persistent_data_grad<T>(shape, d, x, allow_tf32);
  } else if (data_kernel == DataGradKernel::kNarrow) {
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

void run_backward(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                  const at::Tensor& pre_activation, const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                  const std::optional<at::Tensor>& weight_out, Activation act, float negative_slope, bool allow_tf32,
                  const BackwardOutputs& grads, const Dropout& dropout, DataGradKernel data_kernel) {
  // Launch 2 and the persistent launch 1 take any width; the other launches 1 keep a row tile's dZ on chip.
  TORCH_CHECK(data_kernel == DataGradKernel::kPersistent || shape.layer_width <= kTileKernelMaxWidth,
              "spinal_ops: CUDA tile backward needs w <= ", kTileKernelMaxWidth);
  const int capability = compute_capability(c10::cuda::current_device());
  with_kernel_types(x.scalar_type(), allow_tf32, capability, [&](auto types) {
    using Types = decltype(types);
    launch<typename Types::DataMma, typename Types::GradMma, typename Types::Element>(
        shape, grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, act, negative_slope, allow_tf32, grads,
        dropout, data_kernel);
  });
}

}  // namespace

bool warp_narrow_backward_fits(const SpinalShape& shape, at::ScalarType dtype, int device) {
  return warp_narrow_forward_fits(shape, dtype, device) &&
         warp_narrow_grad_warps_fitting(shape, smem_optin(device)) > 0;
}

bool use_warp_narrow_backward(const SpinalShape& shape, at::ScalarType dtype, int device) {
  return use_warp_narrow_forward(shape, dtype, device) && warp_narrow_backward_fits(shape, dtype, device);
}

void launch_warp_narrow_backward(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                                 const at::Tensor& pre_activation, const at::Tensor& weight_in,
                                 const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
                                 Activation act, float negative_slope, const BackwardOutputs& grads) {
  const int device = c10::cuda::current_device();
  TORCH_CHECK(warp_narrow_backward_fits(shape, x.scalar_type(), device),
              "spinal_ops: the warp-level narrow backward does not run w = ", text(shape.layer_width), ", M = ",
              text(shape.out_features), " in ", x.scalar_type(), " on device ", text(device));
  // No dropout stage (launch_native_backward sends calls with one to the other kernels); TF32 does
  // not apply to half types.
  run_backward(shape, grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, act, negative_slope,
               /*allow_tf32=*/false, grads, Dropout{}, DataGradKernel::kWarpNarrow);
}

void launch_persistent_backward(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& pre_activation, const at::Tensor& weight_in,
                                const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
                                Activation act, float negative_slope, bool allow_tf32, const BackwardOutputs& grads) {
  // No dropout stage (use_persistent_kernels sends calls with one to the other kernels).
  run_backward(shape, grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, act, negative_slope,
               allow_tf32, grads, Dropout{}, DataGradKernel::kPersistent);
}

void launch_native_backward(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& pre_activation, const at::Tensor& weight_in,
                           const at::Tensor& weight_hidden, const std::optional<at::Tensor>& weight_out,
                           Activation act, float negative_slope, bool allow_tf32, const BackwardOutputs& grads,
                           const Dropout& dropout, bool allow_narrow) {
  // The persistent and warp-level launches 1 have no dropout stage: calls with a dropout take the
  // kernels below.
  const int device = c10::cuda::current_device();
  if (use_persistent_kernels(dropout, x.scalar_type(), allow_tf32, device)) {
    launch_persistent_backward(shape, grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, act,
                               negative_slope, allow_tf32, grads);
    return;
  }
  if (allow_narrow && !dropout.active && use_warp_narrow_backward(shape, x.scalar_type(), device)) {
    launch_warp_narrow_backward(shape, grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, act,
                                negative_slope, grads);
    return;
  }
  run_backward(shape, grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, act, negative_slope,
               allow_tf32, grads, dropout,
               allow_narrow && narrow_kernels_fit(shape) ? DataGradKernel::kNarrow : DataGradKernel::kTiled);
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

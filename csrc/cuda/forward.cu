// Host launcher of the tile forward kernels (forward_kernel.cuh: the tiled kernel, its tiling and
// smem budget; narrow_kernels.cuh: one thread per row for narrow layers) and the routing
// between the tile kernels and the hoisted chain.
#include "forward_kernel.cuh"
#include "launch.cuh"
#include "narrow_kernels.cuh"

namespace spinal_ops {
namespace cuda_kernels {
namespace {

template <class Mma, typename T>
void launch(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
            const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
            const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out, Activation act,
            float slope, const at::Tensor& out, const at::Tensor& pre_activation, const Dropout& dropout) {
  const ForwardArgs<T> p = make_forward_args<T>(shape, x, weight_in, weight_hidden, bias, weight_out, bias_out, act,
                                                slope, out, pre_activation, dropout);
  with_dropout(dropout, [&](auto drops) {
    constexpr bool kDrops = decltype(drops)::value;
    launch_kernel<spinal_forward_kernel<Mma, T, kDrops>>(ceil_div(shape.batch, Mma::kTileM),
                                                          tile_smem_bytes<Mma, T>(p.w),
                                                          tile_smem_bytes<Mma, T>(kTileKernelMaxWidth), p);
  });
}

// The narrow forward kernel (narrow_kernels.cuh), compiled for w <= 8 and w <= 16.
template <typename T>
void launch_narrow(const SpinalShape& shape, const ForwardArgs<T>& p, const Dropout& dropout) {
  with_narrow_width(shape.layer_width, [&](auto width) {
    constexpr int W = decltype(width)::value;
    const int64_t smem_bytes = NarrowSmem<W>::kBytes;
    const int64_t blocks = ceil_div(shape.batch, kNarrowRows);
    with_dropout(dropout, [&](auto drops) {
      constexpr bool kDrops = decltype(drops)::value;
      launch_kernel<spinal_narrow_forward_kernel<T, W, kDrops>>(blocks, smem_bytes, smem_bytes, p, kNarrowRows);
    });
  });
}

int64_t tile_smem_bytes_for(at::ScalarType dtype, bool tf32, int capability, int64_t w) {
  return with_kernel_types(dtype, tf32, capability, [&](auto types) {
    using Types = decltype(types);
    return tile_smem_bytes<typename Types::DataMma, typename Types::Element>(w);
  });
}

}  // namespace

std::string native_kernels_refusal(at::ScalarType dtype, int device) {
  const int capability = compute_capability(device);
  if (capability < kOldestCapability) {
    return "compute capability " + text(capability / 10) + "." + text(capability % 10) +
           " is older than the native kernels' oldest target, 7.5";
  }
  if (dtype == at::kBFloat16 && capability < kSm80Capability) {
    return "compute capability " + text(capability / 10) + "." + text(capability % 10) +
           " has no bfloat16 tensor cores (the native kernels need 8.0)";
  }
  return "";
}

int64_t tile_kernel_width_limit(at::ScalarType dtype, bool allow_tf32, int device) {
  if (!native_kernels_refusal(dtype, device).empty()) return 0;
  const bool tf32 = dtype == at::kFloat && allow_tf32;
  const int capability = compute_capability(device);
  const int64_t optin = smem_optin(device);
  // The smem need grows with round_up(w, kTileK): try kTileKernelMaxWidth, then each kTileK step below.
  int64_t w = kTileKernelMaxWidth;
  while (w > 0 && tile_smem_bytes_for(dtype, tf32, capability, w) > optin) w = round_up(w, kTileK) - kTileK;
  return w;
}

bool narrow_kernels_fit(const SpinalShape& shape) {
  return shape.layer_width <= kNarrowKernelMaxWidth && shape.out_features <= kNarrowKernelMaxOut;
}

bool use_native_kernels(const SpinalShape& shape, at::ScalarType dtype, bool allow_tf32, int device) {
  // bf16 before compute capability 8.0 (no bf16 tensor cores): the hoisted chain at every width.
  if (!native_kernels_refusal(dtype, device).empty()) return false;
  return shape.layer_width <= tile_kernel_width_limit(dtype, allow_tf32, device);
}

void launch_native_forward(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
                          const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                          Activation act, float negative_slope, bool allow_tf32, const at::Tensor& out,
                          const at::Tensor& pre_activation, const Dropout& dropout, bool allow_narrow) {
  TORCH_CHECK(shape.layer_width <= kTileKernelMaxWidth, "spinal_ops: CUDA tile forward needs w <= ", kTileKernelMaxWidth);
  const int capability = compute_capability(c10::cuda::current_device());
  with_kernel_types(x.scalar_type(), allow_tf32, capability, [&](auto types) {
    using Types = decltype(types);
    using T = typename Types::Element;
    if (allow_narrow && narrow_kernels_fit(shape)) {
      launch_narrow<T>(shape, make_forward_args<T>(shape, x, weight_in, weight_hidden, bias, weight_out, bias_out,
                                                   act, negative_slope, out, pre_activation, dropout),
                      dropout);
      return;
    }
    launch<typename Types::DataMma, typename Types::Element>(shape, x, weight_in, weight_hidden, bias, weight_out,
                                                             bias_out, act, negative_slope, out, pre_activation,
                                                             dropout);
  });
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

// Host launcher of the tile forward kernels (forward_kernel.cuh: the tiled kernel, its tiling and
// smem budget; narrow_kernels.cuh: one thread per row for narrow layers; warp_narrow_kernels.cuh:
// one warp per 16 rows on tensor cores, opt-in) and the routing between the tile kernels and the
// hoisted chain.
#include <cstdlib>
#include <cstring>

#include "forward_kernel.cuh"
#include "launch.cuh"
#include "narrow_kernels.cuh"
#include "warp_narrow_kernels.cuh"

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

// Warps per CTA of the warp-level narrow forward whose shared memory fits `optin` bytes (at most
// kWarpNarrowMaxWarps); 0 when not even one does. The layer's sizes must hold w, M <= 32.
int64_t warp_narrow_warps_fitting(const SpinalShape& shape, int64_t optin) {
  if (shape.split_size > optin) return 0;  // one row of A alone would not fit (and s fits an int)
  int64_t warps = 0;
  with_warp_narrow_sizes(shape, [&](auto width, auto outputs) {
    const WarpNarrowLayout<decltype(width)::value, decltype(outputs)::value> layout(
        static_cast<int>(shape.split_size), static_cast<int>(shape.num_layers), shape.out_features > 0);
    warps = warp_narrow_warps_in(optin, layout.warp_base, layout.warp_bytes);
  });
  return warps;
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

bool warp_narrow_forward_fits(const SpinalShape& shape, at::ScalarType dtype, int device) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (shape.layer_width > kWarpNarrowMaxWidth || shape.out_features > kWarpNarrowMaxOut) return false;
  if (compute_capability(device) < kSm80Capability) return false;
  return warp_narrow_warps_fitting(shape, smem_optin(device)) > 0;
}

bool use_warp_narrow_forward(const SpinalShape& shape, at::ScalarType dtype, int device) {
  const char* enabled = std::getenv("SPINAL_OPS_CUDA_WARP_NARROW");
  return enabled != nullptr && std::strcmp(enabled, "1") == 0 && warp_narrow_forward_fits(shape, dtype, device);
}

void launch_warp_narrow_forward(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
                                const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& weight_out,
                                const std::optional<at::Tensor>& bias_out, Activation act, float negative_slope,
                                const at::Tensor& out, const at::Tensor& pre_activation) {
  const int device = c10::cuda::current_device();
  TORCH_CHECK(warp_narrow_forward_fits(shape, x.scalar_type(), device),
              "spinal_ops: the warp-level narrow forward does not run w = ", text(shape.layer_width), ", M = ",
              text(shape.out_features), " in ", x.scalar_type(), " on device ", text(device));
  const int64_t optin = smem_optin(device);
  const int64_t tiles = ceil_div(shape.batch, kWarpRows);
  // As many warps per CTA as fit (the weights are staged once per CTA), at most one per tile.
  const int64_t warps = std::min(warp_narrow_warps_fitting(shape, optin), tiles);
  const auto run = [&](auto element) {
    using T = decltype(element);
    // No dropout stage here (launch_native_forward sends calls with one to the other kernels).
    const ForwardArgs<T> p = make_forward_args<T>(shape, x, weight_in, weight_hidden, bias, weight_out, bias_out,
                                                  act, negative_slope, out, pre_activation, Dropout{});
    with_warp_narrow_sizes(shape, [&](auto width, auto outputs) {
      constexpr int W = decltype(width)::value, MP = decltype(outputs)::value;
      const int64_t smem_bytes = WarpNarrowLayout<W, MP>(p.s, p.num_layers, p.out_features > 0).total(warps);
      launch_persistent_warps<spinal_warp_narrow_forward_kernel<T, W, MP>>(tiles, warps, smem_bytes, optin, p);
    });
  };
  if (x.scalar_type() == at::kHalf) {
    run(at::Half{});
  } else {
    run(at::BFloat16{});
  }
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
  // The warp-level forward has no dropout stage: calls with a dropout take the kernels below.
  if (allow_narrow && !dropout.active && use_warp_narrow_forward(shape, x.scalar_type(), c10::cuda::current_device())) {
    launch_warp_narrow_forward(shape, x, weight_in, weight_hidden, bias, weight_out, bias_out, act, negative_slope,
                               out, pre_activation);
    return;
  }
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

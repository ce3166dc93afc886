// The fused CUDA kernels (csrc/cuda/forward_kernel.cuh, backward_kernels.cuh) run on CPU through
// cuda_shim.h, as torch ops spinal_emu::forward / backward with the schemas of fused_forward /
// fused_backward plus the accumulator policy ("simt", "tf32", "wmma") and, for backward, the SM
// count that sizes the split-K. Policy "aten" runs the op's multi-launch path
// (csrc/cuda/multi_launch.cu, plain ATen) instead. Built by tests/test_cuda_emulation.py; never
// part of the package.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_shim.h"
// clang-format off: the shim must come before the kernels
#include "../../csrc/cuda/backward_kernels.cuh"
#include "../../csrc/cuda/forward_kernel.cuh"
// clang-format on
#include "../../csrc/cuda/multi_launch.cu"  // host-only ATen code

namespace spinal_ops {
namespace cuda_kernels {

alignas(128) unsigned char smem[232 * 1024];  // the kernels' `extern __shared__` buffer

namespace {

template <class Mma, typename T>
void emulate_forward(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
                     const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                     Activation act, float slope, const at::Tensor& out, const at::Tensor& pre_activation) {
  const auto p =
      make_forward_args<T>(shape, x, weight_in, weight_hidden, bias, weight_out, bias_out, act, slope, out, pre_activation);
  TORCH_CHECK((SmemLayout<Mma, T>(p.state_width).total <= static_cast<int64_t>(sizeof(smem))));
  const auto blocks = static_cast<unsigned>((shape.batch + Mma::kTileM - 1) / Mma::kTileM);
  emu::launch(blocks, kThreads, [&] { spinal_forward_kernel<Mma, T>(p); });
}

template <class Mma, typename T>
void emulate_backward(const SpinalShape& shape, const at::Tensor& grad_out, const at::Tensor& x,
                      const at::Tensor& pre_activation, const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                      const std::optional<at::Tensor>& weight_out, Activation act, float slope,
                      const BackwardOutputs& grads, int sm_count) {
  constexpr int kM = Mma::kTileM;
  const WeightGradPlan plan = plan_weight_grads<kM>(shape, sm_count);
  const int64_t ctas = plan.tiles.total * plan.splits;
  // Counters start dirty on purpose: launch 1 must zero them.
  at::Tensor counters = at::full({plan.tiles.total}, 12345, x.options().dtype(at::kInt));
  at::Tensor partials = at::full({ctas * kM * kTileN}, NAN, x.options().dtype(at::kFloat));
  int* counters_data = plan.splits > 1 ? counters.data_ptr<int>() : nullptr;
  const at::Tensor grad_pre = at::full_like(pre_activation, NAN);
  const auto d = make_data_grad_args<T>(shape, grad_out, pre_activation, weight_in, weight_hidden, weight_out, act,
                                        slope, grad_pre, grads.grad_x, counters_data, plan.tiles.total);
  TORCH_CHECK((SmemLayout<Mma, T>(d.state_width).total <= static_cast<int64_t>(sizeof(smem))));
  emu::launch(static_cast<unsigned>((shape.batch + kM - 1) / kM), kThreads,
              [&] { spinal_data_grad_kernel<Mma, T>(d); });
  const auto g = make_weight_grad_args<T>(shape, plan, grad_out, x, pre_activation, grad_pre, act, slope, grads,
                                          plan.splits > 1 ? partials.data_ptr<float>() : nullptr, counters_data);
  emu::launch(static_cast<unsigned>(ctas), kThreads, [&] { spinal_weight_grad_kernel<Mma, T>(g); });
  if (plan.splits > 1) {
    TORCH_CHECK(counters.eq(0).all().item<bool>(), "split-K tile counters were not reset");
  }
}

// Calls F<Mma, T> for the policy name and x's dtype.
template <template <class, typename> class Call, typename... Args>
void dispatch(const at::Tensor& x, c10::string_view policy, Args&&... args) {
  const bool wmma = policy == "wmma", tf32 = policy == "tf32";
  TORCH_CHECK(wmma || tf32 || policy == "simt", "unknown policy");
  switch (x.scalar_type()) {
    case at::kFloat:
      TORCH_CHECK(!wmma, "float32 uses simt or tf32");
      if (tf32) {
        Call<WmmaMma<32, nvcuda::wmma::precision::tf32>, float>::run(std::forward<Args>(args)...);
      } else {
        Call<SimtMma<32>, float>::run(std::forward<Args>(args)...);
      }
      break;
    case at::kHalf:
      TORCH_CHECK(wmma, "float16 uses wmma");
      Call<WmmaMma<64, __half>, at::Half>::run(std::forward<Args>(args)...);
      break;
    case at::kBFloat16:
      TORCH_CHECK(wmma, "bfloat16 uses wmma");
      Call<WmmaMma<64, __nv_bfloat16>, at::BFloat16>::run(std::forward<Args>(args)...);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype");
  }
}

template <class Mma, typename T>
struct ForwardCall {
  template <typename... Args>
  static void run(Args&&... args) {
    emulate_forward<Mma, T>(std::forward<Args>(args)...);
  }
};

template <class Mma, typename T>
struct BackwardCall {
  template <typename... Args>
  static void run(Args&&... args) {
    emulate_backward<Mma, T>(std::forward<Args>(args)...);
  }
};

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight_in,
                                           const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& weight_out,
                                           const std::optional<at::Tensor>& bias_out, c10::string_view activation,
                                           double negative_slope, c10::string_view policy) {
  const SpinalShape shape = check_spinal_shape(x, weight_in, weight_hidden, bias, weight_out, bias_out);
  // NaN-filled outputs: a value the kernel fails to write shows up.
  at::Tensor out = at::full({shape.batch, shape.output_width()}, NAN, x.options());
  at::Tensor pre_activation = at::full({shape.batch, shape.hidden()}, NAN, x.options());
  if (policy == "aten") {
    multi_launch_forward(shape, x.contiguous(), weight_in.contiguous(), weight_hidden.contiguous(), bias, weight_out,
                         bias_out, parse_activation(activation), negative_slope, out, pre_activation);
    return {out, pre_activation};
  }
  TORCH_CHECK(shape.layer_width <= kFusedMaxWidth, "the fused kernels need w <= ", kFusedMaxWidth);
  dispatch<ForwardCall>(x, policy, shape, x.contiguous(), weight_in.contiguous(), weight_hidden.contiguous(), bias,
                        weight_out, bias_out, parse_activation(activation), static_cast<float>(negative_slope), out,
                        pre_activation);
  return {out, pre_activation};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre_activation,
                                 const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                                 const std::optional<at::Tensor>& weight_out, bool has_bias,
                                 c10::string_view activation, double negative_slope, c10::string_view policy,
                                 int64_t sm_count) {
  SpinalShape shape = check_spinal_shape(x, weight_in, weight_hidden, std::nullopt, weight_out, std::nullopt);
  shape.has_bias = has_bias;
  shape.has_bias_out = has_bias && weight_out.has_value();
  const auto options = x.options();
  BackwardOutputs grads;
  grads.grad_x = at::full_like(x, NAN);
  grads.grad_weight_in = at::full_like(weight_in, NAN);
  grads.grad_weight_hidden = at::full_like(weight_hidden, NAN);
  grads.grad_bias = has_bias ? at::full({shape.num_layers, shape.layer_width}, NAN, options) : at::empty({0}, options);
  grads.grad_weight_out = weight_out ? at::full_like(*weight_out, NAN) : at::empty({0}, options);
  grads.grad_bias_out = has_bias && weight_out ? at::full({shape.out_features}, NAN, options) : at::empty({0}, options);
  if (policy == "aten") {
    multi_launch_backward(shape, grad_out.contiguous(), x.contiguous(), pre_activation.contiguous(),
                          weight_in.contiguous(), weight_hidden.contiguous(), weight_out, parse_activation(activation),
                          negative_slope, grads);
    return {grads.grad_x, grads.grad_weight_in, grads.grad_weight_hidden, grads.grad_bias, grads.grad_weight_out,
            grads.grad_bias_out};
  }
  dispatch<BackwardCall>(x, policy, shape, grad_out.contiguous(), x.contiguous(), pre_activation.contiguous(),
                         weight_in.contiguous(), weight_hidden.contiguous(), weight_out,
                         parse_activation(activation), static_cast<float>(negative_slope), grads,
                         static_cast<int>(sm_count));
  return {grads.grad_x, grads.grad_weight_in, grads.grad_weight_hidden, grads.grad_bias, grads.grad_weight_out,
          grads.grad_bias_out};
}

}  // namespace
}  // namespace cuda_kernels
}  // namespace spinal_ops

TORCH_LIBRARY(spinal_emu, m) {
  m.def("forward", &spinal_ops::cuda_kernels::forward);
  m.def("backward", &spinal_ops::cuda_kernels::backward);
}

// Autograd of the compiled op pairs (fused_*, hoisted_*), registered at the Autograd key.
//
// In C++ so that a training step runs no Python between the dispatcher and the kernels (the
// Python registration, torch.library.register_autograd, cost ~0.5 ms per forward+backward on
// CPU: more than the whole step of a small layer). Semantics, shared with the triton pair's
// Python registration in spinal_ops/ops.py:
// * the forward saves x, Z (its second output, never differentiated), weight_in, weight_hidden and
//   weight_out, and its activation, slope and TF32 choice: the backward runs with the forward's
//   choice whatever the global flag says by then;
// * the backward is one call of the pair's backward op, whose output_mask asks only for the
//   gradients autograd needs (a frozen input pays no dx, frozen weights no weight gradients);
// * the backward op's own autograd node refuses a double backward with a clear error.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace spinal_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;

using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            const OptionalTensor&, const OptionalTensor&,
                                                            const OptionalTensor&, c10::string_view, double, bool,
                                                            bool);
using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardSignature = Gradients(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const OptionalTensor&, std::array<bool, 6>, c10::string_view,
                                    double, bool);

enum class Pair { kFused, kHoisted };

constexpr const char* pair_name(Pair pair) { return pair == Pair::kFused ? "fused" : "hoisted"; }

// The op spinal_ops::<pair><suffix>, looked up once per (pair, direction) by the callers' statics.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(Pair pair, const char* suffix) {
  const std::string name = std::string("spinal_ops::") + pair_name(pair) + suffix;
  return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").typed<Signature>();
}

template <Pair P>
const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = find_op<ForwardSignature>(P, "_forward");
  return op;
}

template <Pair P>
const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = find_op<BackwardSignature>(P, "_backward");
  return op;
}

OptionalTensor present(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// The backward op's node: a double backward through a fused backend raises instead of returning
// a wrong number.
template <Pair P>
struct NoDoubleBackward : torch::autograd::Function<NoDoubleBackward<P>> {
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& pre_activation, const at::Tensor& weight_in,
                               const at::Tensor& weight_hidden, const OptionalTensor& weight_out,
                               std::array<bool, 6> output_mask, c10::string_view activation, double negative_slope,
                               bool allow_tf32) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Gradients grads = backward_op<P>().call(grad_out, x, pre_activation, weight_in, weight_hidden, weight_out,
                                                   output_mask, activation, negative_slope, allow_tf32);
    return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
            std::get<3>(grads), std::get<4>(grads), std::get<5>(grads)};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grads*/) {
    TORCH_CHECK(false, "spinal_ops: double backward is not supported by the fused ops (spinal_ops::", pair_name(P),
                "_backward); use backend='reference' for higher-order gradients");
  }
};

template <Pair P>
Gradients backward_autograd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre_activation,
                            const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                            const OptionalTensor& weight_out, std::array<bool, 6> output_mask,
                            c10::string_view activation, double negative_slope, bool allow_tf32) {
  // A backward outside create_graph (grad mode off) needs no node to refuse a double backward:
  // call the op directly (a few µs per training step).
  if (!at::GradMode::is_enabled() ||
      !(grad_out.requires_grad() || x.requires_grad() || pre_activation.requires_grad() || weight_in.requires_grad() ||
        weight_hidden.requires_grad() || (weight_out.has_value() && weight_out->requires_grad()))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return backward_op<P>().call(grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, output_mask,
                                 activation, negative_slope, allow_tf32);
  }
  const variable_list grads = NoDoubleBackward<P>::apply(grad_out, x, pre_activation, weight_in, weight_hidden,
                                                         weight_out, output_mask, activation, negative_slope,
                                                         allow_tf32);
  return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
}

template <Pair P>
struct SpinalFunction : torch::autograd::Function<SpinalFunction<P>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight_in,
                               const at::Tensor& weight_hidden, const OptionalTensor& bias,
                               const OptionalTensor& weight_out, const OptionalTensor& bias_out,
                               c10::string_view activation, double negative_slope, bool allow_tf32,
                               bool keep_pre_activation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, pre_activation] = forward_op<P>().call(x, weight_in, weight_hidden, bias, weight_out, bias_out,
                                                      activation, negative_slope, allow_tf32, keep_pre_activation);
    ctx->save_for_backward({x, pre_activation, weight_in, weight_hidden, weight_out.value_or(at::Tensor())});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["allow_tf32"] = allow_tf32;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_bias_out"] = bias_out.has_value();
    // Z is never differentiated: no gradient buffer is made for it, and its undefined gradient
    // is not materialised as a [B, L*w] tensor of zeros before every backward.
    ctx->mark_non_differentiable({pre_activation});
    ctx->set_materialize_grads(false);
    return {out, pre_activation};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(10);  // one per forward argument; the four non-tensors get none
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return result;  // only Z was used downstream: no gradient flows
    const variable_list saved = ctx->get_saved_variables();
    const OptionalTensor weight_out = present(saved[4]);
    // needs_input_grad counts the tensor inputs that were given: the absent optional ones have no edge.
    const bool present_inputs[6] = {true, true, true, ctx->saved_data["has_bias"].toBool(), weight_out.has_value(),
                                    ctx->saved_data["has_bias_out"].toBool()};
    std::array<bool, 6> output_mask{};
    for (size_t i = 0, edge = 0; i < 6; ++i) {
      output_mask[i] = present_inputs[i] && ctx->needs_input_grad(edge++);
    }
    const Gradients computed = backward_autograd<P>(
        grad_out.contiguous(), saved[0], saved[1], saved[2], saved[3], weight_out, output_mask,
        ctx->saved_data["activation"].toStringRef(), ctx->saved_data["negative_slope"].toDouble(),
        ctx->saved_data["allow_tf32"].toBool());
    const at::Tensor all[6] = {std::get<0>(computed), std::get<1>(computed), std::get<2>(computed),
                               std::get<3>(computed), std::get<4>(computed), std::get<5>(computed)};
    for (size_t i = 0; i < 6; ++i) {
      if (output_mask[i]) result[i] = all[i];
    }
    return result;
  }
};

template <Pair P>
std::tuple<at::Tensor, at::Tensor> forward_autograd(const at::Tensor& x, const at::Tensor& weight_in,
                                                    const at::Tensor& weight_hidden, const OptionalTensor& bias,
                                                    const OptionalTensor& weight_out, const OptionalTensor& bias_out,
                                                    c10::string_view activation, double negative_slope,
                                                    bool allow_tf32, bool keep_pre_activation) {
  // Nothing to differentiate (no_grad, inference mode, no input requiring grad): call the op
  // directly, without the autograd node and its saved state (a few µs per call).
  const auto requires_grad = [](const OptionalTensor& t) { return t.has_value() && t->requires_grad(); };
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || weight_in.requires_grad() || weight_hidden.requires_grad() || requires_grad(bias) ||
        requires_grad(weight_out) || requires_grad(bias_out))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op<P>().call(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope,
                                allow_tf32, keep_pre_activation);
  }
  const variable_list outputs = SpinalFunction<P>::apply(x, weight_in, weight_hidden, bias, weight_out, bias_out,
                                                         activation, negative_slope, allow_tf32, keep_pre_activation);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(spinal_ops, Autograd, m) {
  m.impl("fused_forward", &forward_autograd<Pair::kFused>);
  m.impl("fused_backward", &backward_autograd<Pair::kFused>);
  m.impl("hoisted_forward", &forward_autograd<Pair::kHoisted>);
  m.impl("hoisted_backward", &backward_autograd<Pair::kHoisted>);
}

}  // namespace spinal_ops

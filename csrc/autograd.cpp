// Autograd of the op pairs (native_*, hoisted_*, and triton_*, whose kernels are Python),
// registered at the Autograd key.
//
// In C++ so that a training step runs no Python between the dispatcher and the kernels (the
// Python registration, torch.library.register_autograd, cost ~0.5 ms per forward+backward on
// CPU: more than the whole step of a small layer). Semantics, shared with the Python registration
// the triton pair falls back on where this library is not loaded (spinal_ops/ops.py):
// * the forward saves x, Z (its second output, never differentiated), weight_in, weight_hidden and
//   weight_out, and its activation, slope and TF32 choice: the backward runs with the forward's
//   choice whatever the global flag says by then; and its dropout seed (a 0-dim CPU tensor, kept as
//   it is) and p, so that the backward recomputes the forward's masks;
// * the backward is one call of the pair's backward op, whose output_mask asks only for the
//   gradients autograd needs (a frozen input pays no dx, frozen weights no weight gradients);
// * the backward op's own autograd node refuses a double backward with a clear error, and the
//   forward refuses forward-mode AD (dual tensors) before any kernel runs.
//
// The forward's node is a torch::autograd::Node of its own (SpinalBackward), made as PyTorch's
// generated code makes the built-in ops' nodes, not a torch::autograd::Function: the Function
// machinery (metadata copied per input and output, the saved_data map, output wrapping) cost
// ~14 % of a training step of mnist's layer at batch 64 (`spinal-bench --preset mnist --batch 64
// --mode train frozen --backends cpu --threads 1` against a build with a Function). The
// double-backward refusal keeps a Function: it runs only under create_graph.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "common/switches.h"

namespace spinal_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;

using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            const OptionalTensor&, const OptionalTensor&,
                                                            const OptionalTensor&, c10::string_view, double, bool,
                                                            bool, const OptionalTensor&, double);
using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardSignature = Gradients(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const OptionalTensor&, std::array<bool, 6>, c10::string_view,
                                    double, bool, const OptionalTensor&, double);

enum class Pair { kNative, kHoisted, kTriton };

constexpr const char* pair_name(Pair pair) {
  return pair == Pair::kNative ? "native" : pair == Pair::kHoisted ? "hoisted" : "triton";
}

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

// The backward op's node: a double backward through an op pair raises instead of returning
// a wrong number.
template <Pair P>
struct NoDoubleBackward : torch::autograd::Function<NoDoubleBackward<P>> {
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& pre_activation, const at::Tensor& weight_in,
                               const at::Tensor& weight_hidden, const OptionalTensor& weight_out,
                               std::array<bool, 6> output_mask, c10::string_view activation, double negative_slope,
                               bool allow_tf32, const OptionalTensor& dropout_seed, double dropout_p) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Gradients grads = backward_op<P>().call(grad_out, x, pre_activation, weight_in, weight_hidden, weight_out,
                                                   output_mask, activation, negative_slope, allow_tf32, dropout_seed,
                                                   dropout_p);
    return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
            std::get<3>(grads), std::get<4>(grads), std::get<5>(grads)};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grads*/) {
    TORCH_CHECK(false, "spinal_ops: double backward is not supported by the op pairs (spinal_ops::", pair_name(P),
                "_backward); use backend='reference' for higher-order gradients");
  }
};

template <Pair P>
Gradients backward_autograd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre_activation,
                            const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                            const OptionalTensor& weight_out, std::array<bool, 6> output_mask,
                            c10::string_view activation, double negative_slope, bool allow_tf32,
                            const OptionalTensor& dropout_seed, double dropout_p) {
  // A backward outside create_graph (grad mode off) needs no node to refuse a double backward:
  // call the op directly (a few µs per training step).
  if (!at::GradMode::is_enabled() ||
      !(grad_out.requires_grad() || x.requires_grad() || pre_activation.requires_grad() || weight_in.requires_grad() ||
        weight_hidden.requires_grad() || (weight_out.has_value() && weight_out->requires_grad()))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return backward_op<P>().call(grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, output_mask,
                                 activation, negative_slope, allow_tf32, dropout_seed, dropout_p);
  }
  const variable_list grads = NoDoubleBackward<P>::apply(grad_out, x, pre_activation, weight_in, weight_hidden,
                                                         weight_out, output_mask, activation, negative_slope,
                                                         allow_tf32, dropout_seed, dropout_p);
  return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
}

// The node of the forward op: saves what the backward op reads and calls it once.
template <Pair P>
struct SpinalBackward : torch::autograd::Node {
  torch::autograd::SavedVariable x, pre_activation, weight_in, weight_hidden, weight_out;
  std::string activation;
  double negative_slope = 0;
  bool allow_tf32 = false;
  // The forward's dropout: its seed (a 0-dim int64 CPU tensor, never differentiated or changed:
  // held as it is) and p; the backward op recomputes the masks from them.
  OptionalTensor dropout_seed;
  double dropout_p = 0;
  // Which of the forward's tensor arguments (x, weight_in, weight_hidden, bias, weight_out,
  // bias_out) were given; an absent optional one has an empty edge and gets no gradient.
  std::array<bool, 6> given{};
  // The native pair's CUDA backward reads Z in the layout of the forward that made it: a layer
  // wider than the tile kernels has the persistent kernels' layer order under
  // SPINAL_OPS_CUDA_PERSISTENT=1 and the hoisted chain's group-major order without. The switch is
  // read per call, so the node keeps the forward's setting (native CUDA calls only) and refuses a
  // backward that would read the other layout.
  std::optional<bool> persistent_switch;

  std::string name() const override {
    return P == Pair::kNative ? "SpinalNativeBackward" : P == Pair::kHoisted ? "SpinalHoistedBackward" : "SpinalTritonBackward";
  }

  // Both lock the node's mutex, as the built-in nodes do (Note [Thread Safety on Autograd Node] in
  // PyTorch): backward calls on one retained graph from several threads may run this node at once.
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x.reset_data();
    pre_activation.reset_data();
    weight_in.reset_data();
    weight_hidden.reset_data();
    weight_out.reset_data();
    dropout_seed.reset();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list result(6);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return result;  // only Z was used downstream: no gradient flows
    TORCH_CHECK(!persistent_switch || *persistent_switch == switch_on(kPersistentSwitch), "spinal_ops: ",
                kPersistentSwitch, " changed between this call's forward and its backward (for a layer wider than the "
                "tile kernels they keep its pre-activations in different layouts); keep it set (or unset) from the "
                "forward to the backward");
    std::array<bool, 6> output_mask{};
    for (size_t i = 0; i < 6; ++i) output_mask[i] = given[i] && task_should_compute_output(i);
    const Gradients computed = backward_autograd<P>(grad_out.contiguous(), x.unpack(), pre_activation.unpack(),
                                                    weight_in.unpack(), weight_hidden.unpack(),
                                                    present(weight_out.unpack()), output_mask, activation,
                                                    negative_slope, allow_tf32, dropout_seed, dropout_p);
    const at::Tensor all[6] = {std::get<0>(computed), std::get<1>(computed), std::get<2>(computed),
                               std::get<3>(computed), std::get<4>(computed), std::get<5>(computed)};
    for (size_t i = 0; i < 6; ++i) {
      if (output_mask[i]) result[i] = all[i];
    }
    return result;
  }
};

// A new node of type T, held the way the installed PyTorch holds nodes: std::shared_ptr (with
// PyTorch's deleter, which frees long chains of nodes without deep recursion) in 2.11, the GPU
// image's version, and before; c10::intrusive_ptr in later ones (2.14 here).
template <typename T>
auto make_node() {
  if constexpr (std::is_same_v<decltype(torch::autograd::Edge::function), std::shared_ptr<torch::autograd::Node>>) {
    // deleteNode is found by argument-dependent lookup: the later headers no longer declare it.
    return std::shared_ptr<T>(new T(), [](auto* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<T>();
  }
}

template <Pair P>
std::tuple<at::Tensor, at::Tensor> forward_autograd(const at::Tensor& x, const at::Tensor& weight_in,
                                                    const at::Tensor& weight_hidden, const OptionalTensor& bias,
                                                    const OptionalTensor& weight_out, const OptionalTensor& bias_out,
                                                    c10::string_view activation, double negative_slope,
                                                    bool allow_tf32, bool keep_pre_activation,
                                                    const OptionalTensor& dropout_seed, double dropout_p) {
  using torch::autograd::isFwGradDefined;
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(isFwGradDefined(x) || isFwGradDefined(weight_in) || isFwGradDefined(weight_hidden) || isFwGradDefined(bias) ||
        isFwGradDefined(weight_out) || isFwGradDefined(bias_out)),
      "spinal_ops: forward-mode AD (dual tensors) is not supported by the op pairs (spinal_ops::", pair_name(P),
      "_forward); use backend='reference'");
  std::tuple<at::Tensor, at::Tensor> outputs;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    outputs = forward_op<P>().call(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation,
                                   negative_slope, allow_tf32, keep_pre_activation, dropout_seed, dropout_p);
  }
  // Nothing to differentiate (no_grad, inference mode, no input requiring grad): no node.
  if (!torch::autograd::compute_requires_grad(x, weight_in, weight_hidden, bias, weight_out, bias_out)) {
    return outputs;
  }
  auto node = make_node<SpinalBackward<P>>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weight_in, weight_hidden, bias, weight_out, bias_out));
  // Z gets no history: it is never differentiated, so autograd neither makes nor zero-fills a
  // [B, L*w] gradient for it.
  node->x = torch::autograd::SavedVariable(x, /*is_output=*/false);
  node->pre_activation = torch::autograd::SavedVariable(std::get<1>(outputs), /*is_output=*/false);
  node->weight_in = torch::autograd::SavedVariable(weight_in, /*is_output=*/false);
  node->weight_hidden = torch::autograd::SavedVariable(weight_hidden, /*is_output=*/false);
  node->weight_out = torch::autograd::SavedVariable(weight_out.value_or(at::Tensor()), /*is_output=*/false);
  node->activation = std::string(activation);
  node->negative_slope = negative_slope;
  node->allow_tf32 = allow_tf32;
  node->dropout_seed = dropout_seed;
  node->dropout_p = dropout_p;
  node->given = {true, true, true, bias.has_value(), weight_out.has_value(), bias_out.has_value()};
  if (P == Pair::kNative && x.is_cuda()) node->persistent_switch = switch_on(kPersistentSwitch);
  torch::autograd::set_history(std::get<0>(outputs), node);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(spinal_ops, Autograd, m) {
  m.impl("native_forward", &forward_autograd<Pair::kNative>);
  m.impl("native_backward", &backward_autograd<Pair::kNative>);
  m.impl("hoisted_forward", &forward_autograd<Pair::kHoisted>);
  m.impl("hoisted_backward", &backward_autograd<Pair::kHoisted>);
  // The triton pair is defined in Python (spinal_ops/backends/triton/op_pair.py) once this library
  // is loaded; its kernels are Python, its autograd this node.
  m.impl("triton_forward", &forward_autograd<Pair::kTriton>);
  m.impl("triton_backward", &backward_autograd<Pair::kTriton>);
}

}  // namespace spinal_ops

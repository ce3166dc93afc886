// Host launcher of the persistent forward kernel (persistent_forward.cuh: its units, launch
// scheme and smem budget) and its opt-in switch.
#include "../common/switches.h"
#include "launch.cuh"
#include "persistent_forward.cuh"

namespace spinal_ops {
namespace cuda_kernels {
namespace {

// The shallowest piece of s an input unit is split into: 8 K-chunks.
constexpr int64_t kMinSplitK = 8 * kTileK;

// Pieces of K = s per input product: split only while the unsplit input units (input_tiles) would
// leave co-resident CTAs idle, and no piece shallower than kMinSplitK or empty.
int64_t input_splits(int64_t s, int64_t input_tiles, int64_t max_ctas) {
  if (input_tiles >= max_ctas) return 1;
  const int64_t splits = std::min(ceil_div(s, kMinSplitK), ceil_div(max_ctas, input_tiles));
  return ceil_div(s, round_up(ceil_div(s, splits), kTileK));
}

// Launches Kernel (the persistent forward, or a variant with the same arguments) on at most
// `max_ctas` CTAs: allocates and zeroes the workspace, fills the arguments.
template <class Mma, typename T, auto Kernel>
void launch_persistent(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
                       const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                       Activation act, float slope, const at::Tensor& out, const at::Tensor& pre_activation,
                       int64_t max_ctas) {
  PersistentArgs<T> p{};
  // No dropout stage here (register.cu sends calls with one to the other paths).
  static_cast<ForwardArgs<T>&>(p) = make_forward_args<T>(shape, x, weight_in, weight_hidden, bias, weight_out,
                                                         bias_out, act, slope, out, pre_activation, Dropout{});
  const int64_t row_tiles = ceil_div(shape.batch, Mma::kTileM);
  const int64_t col_tiles = ceil_div(shape.layer_width, kTileN);
  const int64_t out_tiles = ceil_div(shape.out_features, kTileN);
  const int64_t counters = 2 * shape.num_layers * row_tiles;
  // Tickets run up to units + grid; unit indices and counter offsets are int.
  TORCH_CHECK(counters < INT32_MAX, "spinal_ops: B = ", text(shape.batch), " with L = ", text(shape.num_layers),
              " is too large for the persistent forward kernel");
  const int64_t splits = input_splits(shape.split_size, shape.num_layers * row_tiles * col_tiles, max_ctas);
  const int64_t units = persistent_units(p.num_layers, static_cast<int>(row_tiles), static_cast<int>(col_tiles),
                                         static_cast<int>(out_tiles), static_cast<int>(splits));
  TORCH_CHECK(units + std::min(units, max_ctas) <= INT32_MAX, "spinal_ops: ", text(units),
              " work units are too many for the persistent forward kernel");
  p.row_tiles = static_cast<int>(row_tiles);
  p.col_tiles = static_cast<int>(col_tiles);
  p.out_tiles = static_cast<int>(out_tiles);
  p.splits = static_cast<int>(splits);
  p.split_k = static_cast<int>(round_up(ceil_div(shape.split_size, splits), kTileK));
  const at::Tensor state = at::empty({shape.batch, shape.hidden()}, x.options().dtype(at::kFloat));
  const at::Tensor partials = at::empty({(splits - 1) * shape.batch * shape.hidden()}, state.options());
  // Counters start at zero every call: a memset on the stream, ordered before the launch.
  const at::Tensor sync = at::zeros({1 + counters}, x.options().dtype(at::kInt));
  p.state = state.data_ptr<float>();
  p.partials = splits > 1 ? partials.data_ptr<float>() : nullptr;
  p.next_unit = sync.data_ptr<int>();
  p.inputs_ready = p.next_unit + 1;
  p.layer_ready = p.inputs_ready + counters / 2;
  const int64_t smem = persistent_smem_bytes<Mma, T>();
  launch_kernel<Kernel>(std::min(units, max_ctas), smem, smem, p);
}

}  // namespace

bool persistent_forward_requested() { return switch_on(kPersistentSwitch); }

bool persistent_forward_fits(at::ScalarType dtype, bool allow_tf32, int device) {
  if (!native_kernels_refusal(dtype, device).empty()) return false;
  const int64_t smem = with_kernel_types(dtype, allow_tf32, compute_capability(device), [&](auto types) {
    using Types = decltype(types);
    return persistent_smem_bytes<typename Types::DataMma, typename Types::Element>();
  });
  return smem <= smem_optin(device);
}

void launch_persistent_forward(const SpinalShape& shape, const at::Tensor& x, const at::Tensor& weight_in,
                               const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                               Activation act, float negative_slope, bool allow_tf32, const at::Tensor& out,
                               const at::Tensor& pre_activation) {
  const int capability = compute_capability(c10::cuda::current_device());
  with_kernel_types(x.scalar_type(), allow_tf32, capability, [&](auto types) {
    using Types = decltype(types);
    using Mma = typename Types::DataMma;
    using T = typename Types::Element;
    constexpr auto kernel = spinal_persistent_forward_kernel<Mma, T>;
    const int64_t smem = persistent_smem_bytes<Mma, T>();
    const int64_t max_ctas = co_resident_ctas<kernel>(kThreads, smem, smem);
    launch_persistent<Mma, T, kernel>(shape, x, weight_in, weight_hidden, bias, weight_out, bias_out, act,
                                      negative_slope, out, pre_activation, max_ctas);
  });
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

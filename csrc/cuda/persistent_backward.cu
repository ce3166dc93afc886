// Host launcher of the persistent backward launch 1 (persistent_backward.cuh: its units, launch
// scheme and smem budget); backward.cu runs it, then launch 2.
#include <type_traits>

#include "launch.cuh"
#include "persistent_backward.cuh"

namespace spinal_ops {
namespace cuda_kernels {

template <typename T>
void launch_persistent_data_grad(const SpinalShape& shape, const DataGradArgs<T>& d, const at::Tensor& like,
                                 bool allow_tf32) {
  const int capability = compute_capability(c10::cuda::current_device());
  with_kernel_types(c10::CppTypeToScalarType<T>::value, allow_tf32, capability, [&](auto types) {
    using Types = decltype(types);
    if constexpr (std::is_same_v<typename Types::Element, T>) {
      using Mma = typename Types::DataMma;
      constexpr auto kernel = spinal_persistent_data_grad_kernel<Mma, T>;
      PersistentGradArgs<T> p{};
      static_cast<DataGradArgs<T>&>(p) = d;
      const int64_t row_tiles = ceil_div(shape.batch, Mma::kTileM);
      const int64_t col_tiles = ceil_div(shape.layer_width, kTileN);
      const int64_t x_tiles = ceil_div(shape.in_features, kTileN);
      const int64_t counters = shape.num_layers * row_tiles;
      const int64_t smem = persistent_smem_bytes<Mma, T>();
      const int64_t max_ctas = co_resident_ctas<kernel>(kThreads, smem, smem);
      const int64_t units = persistent_grad_units(static_cast<int>(shape.num_layers), static_cast<int>(row_tiles),
                                                  static_cast<int>(col_tiles), static_cast<int>(x_tiles));
      // Tickets run up to units + grid; unit indices and counter offsets are int.
      TORCH_CHECK(counters < INT32_MAX && units + std::min(units, max_ctas) <= INT32_MAX, "spinal_ops: ",
                  text(units), " work units are too many for the persistent backward kernel");
      p.row_tiles = static_cast<int>(row_tiles);
      p.col_tiles = static_cast<int>(col_tiles);
      p.x_tiles = static_cast<int>(x_tiles);
      const at::Tensor state = at::empty({shape.batch, shape.hidden()}, like.options().dtype(at::kFloat));
      // Counters start at zero every call: a memset on the stream, ordered before the launch.
      const at::Tensor sync = at::zeros({1 + counters}, like.options().dtype(at::kInt));
      p.state = state.data_ptr<float>();
      p.next_unit = sync.data_ptr<int>();
      p.layer_ready = p.next_unit + 1;
      launch_kernel<kernel>(std::min(units, max_ctas), smem, smem, p);
    }
  });
}

template void launch_persistent_data_grad<float>(const SpinalShape&, const DataGradArgs<float>&, const at::Tensor&,
                                                 bool);
template void launch_persistent_data_grad<at::Half>(const SpinalShape&, const DataGradArgs<at::Half>&,
                                                    const at::Tensor&, bool);
template void launch_persistent_data_grad<at::BFloat16>(const SpinalShape&, const DataGradArgs<at::BFloat16>&,
                                                        const at::Tensor&, bool);

bool use_persistent_kernels(const Dropout& dropout, at::ScalarType dtype, bool allow_tf32, int device) {
  return !dropout.active && persistent_forward_requested() && persistent_forward_fits(dtype, allow_tf32, device);
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

// The CUDA kernel behind chain::dropout_factors (csrc/chain/dropout_factors.h).
//
// Launch: one thread per factor, 256 threads per block, a 1-D grid over rows * width; each thread
// runs Philox4x32-10 once (common/philox.h) for its (row, site) counter. Registered at load time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "../chain/dropout_factors.h"

namespace spinal_ops::cuda_kernels {
namespace {

template <typename scalar_t>
__global__ void dropout_factors_kernel(Dropout dropout, int64_t row_begin, int64_t first_site, int64_t rows,
                                       int64_t width, scalar_t* out) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= rows * width) return;
  const int64_t row = index / width, column = index - row * width;
  // float64 gets 1/(1-p) in double, as the CPU loop gives it (the float scale would cost it 1e-8).
  const double kept = std::is_same_v<scalar_t, double> ? dropout.exact_scale : static_cast<double>(dropout.scale);
  out[index] = static_cast<scalar_t>(dropout.keeps(row_begin + row, first_site + column) ? kept : 0.0);
}

void cuda_dropout_factors(const Dropout& dropout, int64_t row_begin, int64_t first_site, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t rows = out.size(0), width = out.size(1), count = rows * width;
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>((count + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dropout_factors", [&] {
    dropout_factors_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dropout, row_begin, first_site, rows, width, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const bool registered = [] {
  chain::register_dropout_factors_kernel(c10::DeviceType::CUDA, cuda_dropout_factors);
  return true;
}();

}  // namespace
}  // namespace spinal_ops::cuda_kernels

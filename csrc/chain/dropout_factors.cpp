#include "dropout_factors.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <array>

namespace spinal_ops::chain {
namespace {

constexpr auto kDeviceTypes = static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES);

std::array<DropoutFactorsKernel, kDeviceTypes>& kernels() {
  static std::array<DropoutFactorsKernel, kDeviceTypes> table{};
  return table;
}

void cpu_dropout_factors(const Dropout& dropout, int64_t row_begin, int64_t first_site, const at::Tensor& out) {
  const int64_t rows = out.size(0), width = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dropout_factors", [&] {
    scalar_t* data = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t j = 0; j < width; ++j)
          data[r * width + j] = static_cast<scalar_t>(dropout.factor(row_begin + r, first_site + j));
    });
  });
}

}  // namespace

void register_dropout_factors_kernel(c10::DeviceType device, DropoutFactorsKernel kernel) {
  kernels()[static_cast<size_t>(device)] = kernel;
}

at::Tensor dropout_factors(const Dropout& dropout, int64_t row_begin, int64_t rows, int64_t first_site,
                           int64_t width, const at::TensorOptions& options) {
  at::Tensor out = at::empty({rows, width}, options);
  if (out.numel() == 0) return out;
  const auto device = options.device().type();
  if (device == c10::DeviceType::CPU) {
    cpu_dropout_factors(dropout, row_begin, first_site, out);
    return out;
  }
  const DropoutFactorsKernel kernel = kernels()[static_cast<size_t>(device)];
  TORCH_CHECK(kernel != nullptr, "spinal_ops: no dropout kernel for device ", options.device());
  kernel(dropout, row_begin, first_site, out);
  return out;
}

}  // namespace spinal_ops::chain

// Dropout factors as a tensor, for code that applies a mask with ATen calls (the hoisted chain):
// factors[r, j] = dropout.factor(row_begin + r, first_site + j), i.e. 0 or 1/(1-p) (common/philox.h).
// The factors are computed where they are used and never kept between forward and backward.
//
// The CPU loop is here; other devices register their kernel (csrc/cuda/dropout_factors.cu) so that
// this layer includes nothing device-specific.
#pragma once

#include <ATen/ATen.h>

#include "../common/philox.h"

namespace spinal_ops::chain {

// [rows, width] factors of sites first_site .. first_site + width - 1 of rows row_begin ..
// row_begin + rows - 1, with `options`' dtype and device.
at::Tensor dropout_factors(const Dropout& dropout, int64_t row_begin, int64_t rows, int64_t first_site,
                           int64_t width, const at::TensorOptions& options);

// Fills `out` ([rows, width], contiguous, on the kernel's device) with the factors of rows row_begin..
using DropoutFactorsKernel = void (*)(const Dropout& dropout, int64_t row_begin, int64_t first_site,
                                      const at::Tensor& out);
void register_dropout_factors_kernel(c10::DeviceType device, DropoutFactorsKernel kernel);

}  // namespace spinal_ops::chain

// Dropout factors as a tensor, for code that applies a mask with ATen calls (the hoisted chain):
// factors[r, j] = dropout.factor(row_begin + r, first_site + j), i.e. 0 or 1/(1-p) (common/philox.h).
// The factors are computed where they are used and never kept between forward and backward.
//
// The CPU loop is here; other devices register their kernel (csrc/cuda/dropout_factors.cu) so that
// this layer includes nothing device-specific. Also here: the op's dropout arguments checked and
// turned into a Dropout (make_dropout), and the CPU's factors of one row's run of sites
// (fill_factors), which the CPU kernels call inside their row loops.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../common/philox.h"
#include "../common/spinal_shape.h"

namespace spinal_ops::chain {

// The dropout of one op call from its schema arguments (Tensor? dropout_seed, float dropout_p),
// checked before anything runs: p in [0, 1) and the seed a 0-dim int64 CPU tensor (read with
// .item() on the host: no device sync). Inactive (every factor 1, the op exactly as without
// dropout) when the seed is absent or p is 0.
Dropout make_dropout(const std::optional<at::Tensor>& seed, double p, const SpinalShape& shape);

// The factors' dtype for a chain computing in `dtype`: the dtype itself for float32 and float64;
// float32 for the half types, so that a kept element is scaled by 1/(1-p) in float32 and rounded
// once as it is stored (as the eager reference's bfloat16 x * mask * (1/(1-p)) rounds it), not
// scaled by a 1/(1-p) already rounded to 8 bits.
at::ScalarType factor_dtype(at::ScalarType dtype);

// [rows, width] factors of sites first_site .. first_site + width - 1 of rows row_begin ..
// row_begin + rows - 1, with `options`' dtype and device.
at::Tensor dropout_factors(const Dropout& dropout, int64_t row_begin, int64_t rows, int64_t first_site,
                           int64_t width, const at::TensorOptions& options);

// The same into `out`, a contiguous [rows, width] tensor, or into its first `rows` rows.
void dropout_factors_out(const Dropout& dropout, int64_t row_begin, int64_t first_site, const at::Tensor& out,
                         int64_t rows = -1);

// out[j] = dropout's factor of site first_site + j of row `row`, j < count, on the CPU: Philox
// over lanes of consecutive counters that the compiler vectorises (and, on x86-64 Linux, compiles
// for AVX2 and AVX-512 too, picked at load by the CPU). Where double: 1/(1-p) in double.
void fill_factors(const Dropout& dropout, int64_t row, int64_t first_site, int64_t count, float* out);
void fill_factors(const Dropout& dropout, int64_t row, int64_t first_site, int64_t count, double* out);

// Fills `out` ([rows, width], contiguous, on the kernel's device) with the factors of rows row_begin..
using DropoutFactorsKernel = void (*)(const Dropout& dropout, int64_t row_begin, int64_t first_site,
                                      const at::Tensor& out);
void register_dropout_factors_kernel(c10::DeviceType device, DropoutFactorsKernel kernel);

}  // namespace spinal_ops::chain

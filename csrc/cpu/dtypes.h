// The CPU ops' dtypes (csrc/cpu/forward.cpp, backward.cpp): the checks and the
// bfloat16 upcast. The computation itself is the device-generic hoisted chain (csrc/chain/hoisted_chain.h).
#pragma once

#include <ATen/ATen.h>
#include <torch/types.h>

#include "../chain/hoisted_chain.h"

namespace spinal_ops::cpu {

// Kernels compute in float32 or float64; bfloat16 tensors are upcast to float32 on entry and
// the results rounded once on exit (fp32 accumulation, no bf16 GEMM on CPUs without AVX512-BF16).
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? at::kFloat : dtype;
}

// A tensor already of its dtype is returned as it is, without a dispatcher call of .to() (a call
// of the op passes up to 12 tensors through these; only bfloat16 ones are converted).
inline at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

inline at::Tensor to_compute(const at::Tensor& t) {
  return to_dtype(t, compute_dtype(t.scalar_type())).contiguous();
}

inline std::optional<at::Tensor> to_compute(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(to_compute(*t)) : std::nullopt;
}

inline void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "spinal_ops: the CPU kernels need CPU tensors, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "spinal_ops: the CPU kernels support float32, float64 and bfloat16, got ", dtype);
}

}  // namespace spinal_ops::cpu

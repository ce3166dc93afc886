// The CPU ops' dtypes (csrc/cpu/forward.cpp, backward.cpp): the checks and the
// bfloat16 upcast. The computation itself is the device-generic hoisted chain (csrc/chain/hoisted_chain.h).
#pragma once

#include <ATen/ATen.h>
#include <torch/types.h>

#include <cstdint>

#include "../chain/hoisted_chain.h"
#include "chain_engine.h"
#include "narrow_chain.h"

namespace spinal_ops::cpu {

// The CPU narrow chain and the CPU engine compute in float32 or float64; bfloat16 tensors they
// take are upcast to float32 on entry and the results rounded once on exit (fp32 accumulation).
// On CPUs that multiply bfloat16 natively the hoisted chain runs on the bfloat16 tensors
// themselves (runs_bfloat16_chain).
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

// Narrow bfloat16 layers (w <= 32) run the CPU narrow chain (in float32) below this batch and the
// bfloat16 chain (runs_bfloat16_chain) from it on: mnist (w = 8), 1 thread, AMD EPYC with
// AVX512_BF16, speed-up over the eager reference (train/frozen/infer): at batch 1024 the narrow
// chain 3.4x/2.9x/2.5x against 2.0x/1.6x/1.9x for the bfloat16 chain; at 4096 1.2x/1.3x/1.3x
// against 2.5x/1.3x/1.6x (`spinal-bench --preset mnist --batch 64 512 1024 4096 --backends cpu
// reference dense --dtype bfloat16 --threads 1 --min-run-time 0.3`, against builds with this at 0
// and at infinity).
constexpr int64_t kBfloat16NarrowChainMaxBatch = 2047;

// Whether this bfloat16 call runs the hoisted chain on its bfloat16 tensors as they are, on
// bf16_chain_engine (chain_engine.h: ATen's engine, every product an ATen GEMM, i.e. oneDNN's
// AVX512_BF16/AMX kernels; float32 accumulation inside each GEMM and each bias sum; results
// rounded to bfloat16 as they are stored, as the eager reference stores them), instead of
// widening to float32: on a CPU that multiplies bfloat16 natively (native_bf16_gemm), for layers
// the CPU narrow chain does not take and for narrow layers from kBfloat16NarrowChainMaxBatch on.
// Measured (AMD EPYC with AVX512_BF16, 1 thread, vgg5 train step at batch 4096): 23 ms, against
// 78 ms widened to float32 and 77 ms for float32 buffers whose GEMMs round their operands to
// bfloat16 (the conversions cost what the bfloat16 GEMMs save);
// benchmarks/results/bf16-cpu-amd-epyc.md has every preset. The forward and the backward decide
// alike (same shape and batch), so the backward reads the pre-activation layout its forward kept.
inline bool runs_bfloat16_chain(const SpinalShape& shape, const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 && native_bf16_gemm() &&
         !(shape.layer_width <= kNarrowChainMaxWidth && narrow_chain_kernels_run() &&
           shape.batch <= kBfloat16NarrowChainMaxBatch);
}

inline at::Tensor contiguous(const at::Tensor& t) { return t.contiguous(); }
inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

inline void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "spinal_ops: the CPU kernels need CPU tensors, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "spinal_ops: the CPU kernels support float32, float64 and bfloat16, got ", dtype);
}

}  // namespace spinal_ops::cpu

// The hoisted chain's engine on cuBLASLt (lt_engine.cu), opt-in per call.
#pragma once

#include <array>
#include <cstdint>

#include "../chain/gemm_engine.h"

namespace spinal_ops::cuda_kernels {

// Whether SPINAL_OPS_CUDA_LT=1 is set now: the CUDA ops then run the hoisted chain on lt_engine().
bool lt_engine_requested();

// The chain's engine on cuBLASLt. Its buffers and row blocks are aten_engine()'s, so a forward on
// one and a backward on the other agree.
const chain::GemmEngine& lt_engine();

// How many calls lt_engine() has taken since the process started, by kind: [products (gemm),
// recurrence steps with the activation in the epilogue, backward steps with phi' in the epilogue].
std::array<int64_t, 3> lt_engine_calls();

}  // namespace spinal_ops::cuda_kernels

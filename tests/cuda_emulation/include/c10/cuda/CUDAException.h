// Model of c10/cuda/CUDAException.h for the CPU emulation (tests/cuda_emulation/emulated_runtime.h).
#pragma once
#include "../../../emulated_runtime.h"

#define C10_CUDA_CHECK(EXPR)                                                     \
  do {                                                                           \
    const cudaError_t spinal_emu_error = (EXPR);                                 \
    TORCH_CHECK(spinal_emu_error == cudaSuccess, "CUDA error ", spinal_emu_error); \
  } while (0)

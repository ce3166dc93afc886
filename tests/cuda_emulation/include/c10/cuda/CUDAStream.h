// Model of c10/cuda/CUDAStream.h for the CPU emulation (tests/cuda_emulation/emulated_runtime.h).
#pragma once
#include <c10/core/Device.h>

#include "../../../emulated_runtime.h"

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream;
  operator cudaStream_t() const { return stream; }  // NOLINT: as c10's
};
inline CUDAStream getCurrentCUDAStream(DeviceIndex device = -1) {
  return CUDAStream{emu::current_stream(device < 0 ? emu::current_device : device)};
}
}  // namespace c10::cuda

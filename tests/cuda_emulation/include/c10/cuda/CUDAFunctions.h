// Model of c10/cuda/CUDAFunctions.h for the CPU emulation (tests/cuda_emulation/emulated_runtime.h).
#pragma once
#include <c10/core/Device.h>

#include "../../../emulated_runtime.h"

namespace c10::cuda {
inline DeviceIndex current_device() { return static_cast<DeviceIndex>(emu::current_device); }
}  // namespace c10::cuda

// Opt-in switches that the kernels' launchers read from the environment on every call.
#pragma once

#include <cstdlib>
#include <cstring>

namespace spinal_ops {

// SPINAL_OPS_CUDA_PERSISTENT=1: the persistent CUDA kernels (csrc/cuda/persistent_*.cuh).
inline constexpr const char* kPersistentSwitch = "SPINAL_OPS_CUDA_PERSISTENT";

// Whether the environment variable `name` is set to "1" now.
inline bool switch_on(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "1") == 0;
}

}  // namespace spinal_ops

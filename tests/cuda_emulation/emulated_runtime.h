// The part of the CUDA runtime and of c10/cuda that the host launchers (csrc/cuda/forward.cu,
// backward.cu, launch.cuh) call, modelled on CPU with the launch rules of the hardware.
// The fake devices are GPU targets with their opt-in shared memory per block, an SM count and a
// compute capability (sm_75: no bf16 or TF32 tensor cores, which the op's routing reads);
// a launch the hardware would refuse, or one on another stream than the current one, raises:
//   grid.x in [1, 2^31 - 1], grid.y/z in [1, 65535], 1..1024 threads per block;
//   dynamic smem <= the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize on the device
//   (48 KB until raised), which cudaFuncSetAttribute may raise up to the device's opt-in maximum.
// The kernel then runs through emu::launch (cuda_shim.h), at most SMs x ctas_per_sm() CTAs at once;
// cudaOccupancyMaxActiveBlocksPerMultiprocessor answers from the same ctas_per_sm().
#pragma once

#include <c10/util/Exception.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <driver_types.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "cuda_shim.h"

#define C10_COMPILE_TIME_MAX_GPUS 16

// The runtime's types and enums are the toolkit's (driver_types.h); the functions are modelled
// below and raise with a message where the runtime would return an error code.

namespace emu {

struct Target {
  const char* name;
  int sm_count;
  int smem_optin;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int major, minor;  // compute capability: cudaDevAttrComputeCapabilityMajor / Minor
  // Per SM (the CUDA programming guide's table of compute capabilities, and the occupancy
  // calculator's smem reserved per CTA): shared memory, threads, CTAs.
  int smem_per_sm;       // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  int threads_per_sm;    // cudaDevAttrMaxThreadsPerMultiProcessor
  int ctas_per_sm;       // cudaDevAttrMaxBlocksPerMultiprocessor
  int smem_reserved;     // cudaDevAttrReservedSharedMemoryPerBlock (system use, per CTA)
};
// The fake device with index i is targets[i].
inline const Target targets[] = {
    {"sm_80", 108, 163 * 1024, 8, 0, 164 * 1024, 2048, 32, 1024},   // A100
    {"sm_86", 84, 99 * 1024, 8, 6, 100 * 1024, 1536, 16, 1024},     // RTX 30xx, A10
    {"sm_89", 58, 99 * 1024, 8, 9, 100 * 1024, 1536, 24, 1024},     // L4, RTX 40xx, L40
    {"sm_90", 132, 227 * 1024, 9, 0, 228 * 1024, 2048, 32, 1024},   // H100, H200
    {"sm_120", 170, 99 * 1024, 12, 0, 100 * 1024, 1536, 32, 1024},  // RTX 50xx
    {"sm_75", 40, 64 * 1024, 7, 5, 64 * 1024, 1024, 16, 0},         // T4: fp16 tensor cores, no bf16 or TF32 ones
};
constexpr int kRegistersPerSm = 65536;  // every target above
// SMs of every target when > 0 (the model's tests: a persistent grid smaller than its work).
inline int sm_count_override = 0;
inline int sm_count(const Target& t) { return sm_count_override > 0 ? sm_count_override : t.sm_count; }
// The register budget the model assumes per thread (the launch does not know the kernel's
// ptxas count): 80 for 256-thread CTAs (the tile kernels: ptxas -v reports 63..79,
// backward_kernels.cuh), 168 for 128-thread CTAs (the narrow kernels' cap at 3 CTAs per SM,
// narrow_kernels.cuh), 64 otherwise (the model's own small kernels; the warp-level narrow kernels,
// whose ptxas counts are 38..86 at 32..512 threads, warp_narrow_kernels.cuh).
inline int registers_per_thread(int threads) { return threads == 256 ? 80 : threads == 128 ? 168 : 64; }

// CTAs of `threads` threads and `smem` bytes of dynamic shared memory that one SM of t holds at
// once: the least of its CTA, thread, register (allocated per warp in units of 256) and
// shared-memory limits. `why` gets the numbers.
inline int ctas_per_sm(const Target& t, int threads, int64_t smem, std::string* why = nullptr) {
  const int warps = (threads + 31) / 32;
  const int registers_per_warp = (registers_per_thread(threads) * 32 + 255) / 256 * 256;
  const int by_threads = t.threads_per_sm / threads;
  const int by_registers = kRegistersPerSm / (registers_per_warp * warps);
  const int64_t by_smem = t.smem_per_sm / (smem + t.smem_reserved);
  const int ctas = static_cast<int>(std::min<int64_t>({t.ctas_per_sm, by_threads, by_registers, by_smem}));
  if (why != nullptr) {
    *why = std::to_string(sm_count(t)) + " SMs x " + std::to_string(ctas) + " CTAs/SM: " + std::to_string(threads) +
           " threads, " + std::to_string(registers_per_thread(threads)) + " registers/thread, " + std::to_string(smem) +
           "+" + std::to_string(t.smem_reserved) + " B smem of " + std::to_string(t.smem_per_sm) + " B/SM";
  }
  return ctas;
}
constexpr int kDevices = sizeof(targets) / sizeof(targets[0]);
inline int current_device = 3;
constexpr int kDefaultMaxDynamicSmem = 48 * 1024;

inline const Target& target(int device) {
  TORCH_CHECK(device >= 0 && device < kDevices, "emulated CUDA: no device ", device);
  return targets[device];
}
// Each device's current stream: a distinct non-default handle, so a launch on stream 0 (or on
// another device's stream) is caught.
inline cudaStream_t current_stream(int device) {
  return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(0x5000 + 16 * device));
}
// cudaFuncAttributeMaxDynamicSharedMemorySize per (device, kernel).
inline std::map<std::pair<int, const void*>, int> max_dynamic_smem;
inline int launches = 0;
inline int attribute_sets = 0;  // cudaFuncSetAttribute calls
// Each launch's kernel (by its symbol's name), grid and threads per CTA, in launch order.
struct KernelLaunch {
  std::string kernel;
  int64_t grid, threads;
};
inline std::vector<KernelLaunch> launched_kernels;

// The demangled name of the kernel at `kernel` (from the shared library's dynamic symbols).
inline std::string kernel_symbol(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) == 0 || info.dli_sname == nullptr) return "?";
  int status = 0;
  char* readable = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string result = status == 0 ? readable : info.dli_sname;
  std::free(readable);
  return result;
}

inline std::string demangle(const char* name) {
  int status = 0;
  char* readable = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string result = status == 0 ? readable : name;
  std::free(readable);
  return result;
}

// Overloaded (found by argument-dependent lookup) to plant a seeded bug in a launch's arguments.
template <typename Args>
void inject_fault(Args&) {}

}  // namespace emu

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const emu::Target& t = emu::target(device);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = emu::sm_count(t);
      break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = t.smem_optin;
      break;
    case cudaDevAttrComputeCapabilityMajor:
      *value = t.major;
      break;
    case cudaDevAttrComputeCapabilityMinor:
      *value = t.minor;
      break;
    default:
      TORCH_CHECK(false, "emulated CUDA: device attribute ", attr, " is not modelled");
  }
  return cudaSuccess;
}

// The fields of cudaDeviceProp the model knows (the others zero), as cudaDeviceGetAttribute has them.
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* properties, int device) {
  const emu::Target& t = emu::target(device);
  *properties = cudaDeviceProp{};
  std::snprintf(properties->name, sizeof(properties->name), "emulated %s", t.name);
  properties->multiProcessorCount = emu::sm_count(t);
  properties->sharedMemPerBlockOptin = static_cast<size_t>(t.smem_optin);
  properties->major = t.major;
  properties->minor = t.minor;
  return cudaSuccess;
}

template <typename Args>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Args), cudaFuncAttribute, int value) {
  const emu::Target& t = emu::target(emu::current_device);
  TORCH_CHECK(value >= 0 && value <= t.smem_optin, "emulated CUDA: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, ",
              value, ") exceeds ", t.name, "'s opt-in maximum of ", t.smem_optin, " bytes");
  emu::max_dynamic_smem[{emu::current_device, reinterpret_cast<const void*>(kernel)}] = value;
  ++emu::attribute_sets;
  return cudaSuccess;
}

// The occupancy calculator: CTAs of `block_size` threads and `smem` bytes of dynamic shared memory
// per SM (emu::ctas_per_sm, the register budget included); 0 where smem exceeds the kernel's
// dynamic-smem attribute on the device (48 KB until cudaFuncSetAttribute raises it), as no CTA of
// that launch could start.
template <typename Args>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*kernel)(Args), int block_size,
                                                          size_t smem) {
  const int device = emu::current_device;
  const auto limit = emu::max_dynamic_smem.find({device, reinterpret_cast<const void*>(kernel)});
  const int64_t allowed = limit == emu::max_dynamic_smem.end() ? emu::kDefaultMaxDynamicSmem : limit->second;
  *blocks = static_cast<int64_t>(smem) > allowed
                ? 0
                : emu::ctas_per_sm(emu::target(device), block_size, static_cast<int64_t>(smem));
  return cudaSuccess;
}

template <typename Args>
cudaError_t cudaLaunchKernel(void (*kernel)(Args), dim3 grid, dim3 block, void** args, size_t smem,
                             cudaStream_t stream) {
  const int device = emu::current_device;
  const emu::Target& t = emu::target(device);
  const std::string name = emu::demangle(typeid(Args).name()) + " kernel on " + t.name;
  TORCH_CHECK(grid.x >= 1 && grid.x <= INT32_MAX && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
                  grid.z <= 65535,
              "emulated CUDA: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ") for ", name);
  TORCH_CHECK(block.y == 1 && block.z == 1 && block.x >= 1 && block.x <= 1024, "emulated CUDA: invalid block for ",
              name);
  TORCH_CHECK(stream == emu::current_stream(device), "emulated CUDA: ", name,
              " launched on a stream other than the current stream of device ", device);
  const auto limit = emu::max_dynamic_smem.find({device, reinterpret_cast<const void*>(kernel)});
  const int64_t allowed = limit == emu::max_dynamic_smem.end() ? emu::kDefaultMaxDynamicSmem : limit->second;
  TORCH_CHECK(static_cast<int64_t>(smem) <= allowed, "emulated CUDA: ", name, " launched with ", smem,
              " bytes of dynamic shared memory, its limit on the device is ", allowed);
  Args a = *static_cast<const Args*>(args[0]);
  using emu::inject_fault;
  inject_fault(a);
  ++emu::launches;
  emu::launched_kernels.push_back({emu::kernel_symbol(reinterpret_cast<const void*>(kernel)), grid.x, block.x});
  try {
    std::string residency;
    const int per_sm = emu::ctas_per_sm(t, static_cast<int>(block.x), static_cast<int64_t>(smem), &residency);
    TORCH_CHECK(per_sm > 0, "emulated CUDA: ", name, " does not fit one SM (", residency, ")");
    emu::launch(name.c_str(), grid.x, static_cast<int>(block.x), static_cast<int64_t>(smem), [&] { kernel(a); },
                static_cast<unsigned>(per_sm * emu::sm_count(t)), residency);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, "emulated CUDA: ", e.what());
  }
  return cudaSuccess;
}

// Host side of every native-kernel launch (forward.cu, backward.cu): the dynamic shared-memory
// limit per device and kernel, the grid check and the launch on the current stream.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <mutex>
#include <type_traits>

#include "tile_mma.cuh"

namespace spinal_ops {
namespace cuda_kernels {

// The most dynamic shared memory one block may opt in to on `device` (99 KB on sm_86/89/120).
inline int64_t smem_optin(int device) {
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

// The device's compute capability as 10 * major + minor (75 on a T4, 80 on an A100).
inline int compute_capability(int device) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return 10 * major + minor;
}

// bf16 and TF32 tensor cores, and the 64-row fp16 tiles' kernels, exist from compute capability 8.0
// (tile_mma.cuh: MmaArchRange).
constexpr int kSm80Capability = 80;
// The oldest GPUs the build compiles the kernels for (setup.py's TORCH_CUDA_ARCH_LIST: sm_75, T4).
constexpr int kOldestCapability = 75;

// The dynamic-smem limit of Kernel on `device`, raised once per device to the most any launch of
// it needs (`max_smem_bytes`) within the device's opt-in maximum: raising it to each launch's need
// would let two host threads interleave set/set/launch and launch with the other's, smaller, limit.
template <auto Kernel>
int64_t dynamic_smem_limit(int device, int64_t max_smem_bytes) {
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "spinal_ops: CUDA device ", text(device),
              " out of range");
  static std::once_flag limit_set[C10_COMPILE_TIME_MAX_GPUS];
  static int64_t limit[C10_COMPILE_TIME_MAX_GPUS];
  std::call_once(limit_set[device], [&] {
    const int64_t bytes = std::min(max_smem_bytes, smem_optin(device));
    C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    limit[device] = bytes;
  });
  return limit[device];
}

// Launches Kernel(args) on the current device and stream: `blocks` CTAs of `threads` threads with
// `smem_bytes` of dynamic shared memory, under dynamic_smem_limit(device, max_smem_bytes).
template <auto Kernel, typename Args>
void launch_kernel(int64_t blocks, int64_t smem_bytes, int64_t max_smem_bytes, const Args& args,
                   int threads = kThreads) {
  TORCH_CHECK(blocks > 0 && blocks <= INT32_MAX, "spinal_ops: ", text(blocks), " CTAs do not fit the CUDA grid");
  const int device = c10::cuda::current_device();
  const int64_t limit = dynamic_smem_limit<Kernel>(device, max_smem_bytes);
  TORCH_CHECK(smem_bytes <= limit, "spinal_ops: the tile kernel needs ", text(smem_bytes),
              " bytes of shared memory, device ", text(device), " allows ", text(limit),
              " (use_native_kernels() should have routed the call to the hoisted chain)");
  void* kernel_args[] = {const_cast<Args*>(&args)};
  C10_CUDA_CHECK(cudaLaunchKernel(Kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), kernel_args,
                                  static_cast<size_t>(smem_bytes), c10::cuda::getCurrentCUDAStream()));
}

// CTAs of Kernel (`threads` threads, `smem_bytes` of dynamic shared memory) that the current device
// runs at once: the size of a persistent grid, whose CTAs may wait on each other only if all of
// them run. Raises the kernel's smem limit first, as launch_kernel does, so that the occupancy
// counts the launch's shared memory; raises if not one CTA fits an SM.
template <auto Kernel>
int64_t co_resident_ctas(int threads, int64_t smem_bytes, int64_t max_smem_bytes) {
  const int device = c10::cuda::current_device();
  dynamic_smem_limit<Kernel>(device, max_smem_bytes);
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, threads,
                                                               static_cast<size_t>(smem_bytes)));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  TORCH_CHECK(per_sm > 0, "spinal_ops: a CTA of ", text(threads), " threads and ", text(smem_bytes),
              " bytes of shared memory does not fit one SM of device ", text(device));
  return static_cast<int64_t>(per_sm) * sms;
}

// Launches a persistent kernel of `warps` warps per CTA, each warp looping over 16-row tiles (the
// warp-level narrow kernels): ceil(tiles / warps) CTAs at most, and never more than run at once.
template <auto Kernel, typename Args>
void launch_persistent_warps(int64_t tiles, int64_t warps, int64_t smem_bytes, int64_t max_smem_bytes,
                             const Args& args) {
  const int threads = static_cast<int>(warps) * 32;
  const int64_t resident = co_resident_ctas<Kernel>(threads, smem_bytes, max_smem_bytes);
  launch_kernel<Kernel>(std::min(resident, ceil_div(tiles, warps)), smem_bytes, max_smem_bytes, args, threads);
}

// Calls f(std::bool_constant<dropout.active>{}): each kernel is compiled with its dropout stage
// and without it, so that a call without dropout runs the kernels' code as it is without one
// (registers and spills included) and a call with dropout pays for the masks alone.
template <typename F>
void with_dropout(const Dropout& dropout, F&& f) {
  if (dropout.active) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Dynamic shared memory of the forward and data-gradient kernels at layer width w (the
// weight-gradient kernel needs less).
template <class Mma, typename T>
int64_t tile_smem_bytes(int64_t w) {
  return SmemLayout<Mma, T>(static_cast<int>(round_up(w, kTileK))).total;
}

// The types one launch compiles for: the storage element, the MMA policy of the products
// (forward, backward launch 1) and of backward launch 2 (weight and bias gradients).
template <typename T, class DataMmaT, class GradMmaT>
struct KernelTypes {
  using Element = T;
  using DataMma = DataMmaT;
  using GradMma = GradMmaT;
};

// The one dtype dispatch of the CUDA launches: calls f(KernelTypes<...>{}) for x's dtype, the
// call's TF32 choice and the device's compute capability (compute_capability()). TF32 runs the
// products on TF32 tensor cores and launch 2 in exact fp32: its bias gradients are column sums,
// which eager computes in fp32, and TF32-rounding the summed rows would cost ~1e-3 relative error
// there. Before compute capability 8.0 (sm_75) there are no TF32 or bf16 tensor cores: float32
// runs SimtMma whatever the TF32 choice (exact, so within TF32's tolerance too), fp16 runs
// 32-row tiles (whose shared memory fits 64 KB per block at w = 256), and bf16 never gets here
// (use_native_kernels sends it to the hoisted chain).
template <typename F>
auto with_kernel_types(at::ScalarType dtype, bool allow_tf32, int capability, F&& f) {
  using Tf32Mma = WmmaMma<32, Tf32>;
  const bool sm80 = capability >= kSm80Capability;
  switch (dtype) {
    case at::kFloat:
      if (allow_tf32 && sm80) return f(KernelTypes<float, Tf32Mma, SimtMma<32>>{});
      return f(KernelTypes<float, SimtMma<32>, SimtMma<32>>{});
    case at::kHalf:
      if (!sm80) {
        return f(KernelTypes<at::Half, WmmaMma<kHalfTileMSm75, __half>, WmmaMma<kHalfTileMSm75, __half>>{});
      }
      return f(KernelTypes<at::Half, WmmaMma<kHalfTileM, __half>, WmmaMma<kHalfTileM, __half>>{});
    case at::kBFloat16:
      TORCH_CHECK(sm80, "spinal_ops: the CUDA kernels' bfloat16 tensor-core code needs compute capability 8.0, "
                  "this device has ", text(capability / 10), ".", text(capability % 10),
                  " (use_native_kernels() should have routed the call to the hoisted chain)");
      return f(KernelTypes<at::BFloat16, WmmaMma<kHalfTileM, __nv_bfloat16>, WmmaMma<kHalfTileM, __nv_bfloat16>>{});
    default:
      TORCH_CHECK(false, "spinal_ops: the CUDA kernels take float32, float16 or bfloat16, got ", dtype);
  }
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

// SPINAL_HOST_DEVICE: a function that both host code and CUDA device code call.
#pragma once

#if defined(__CUDACC__)
#define SPINAL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SPINAL_HOST_DEVICE inline
#endif

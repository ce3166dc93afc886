// cuBLAS reads its TF32 switch from ATen's global context; an op's allow_tf32 (read once in the
// forward and passed to the backward too) decides instead, for the duration of one call. The switch
// is touched only when the two differ, i.e. when the user changed the flag between the forward and
// the backward, and only for calls on CUDA tensors (`on_cuda`).
#pragma once

#include <ATen/Context.h>

namespace spinal_ops::chain {

class CublasTf32Scope {
 public:
  explicit CublasTf32Scope(bool allow_tf32, bool on_cuda = true)
      : before_(at::globalContext().allowTF32CuBLAS()), changed_(on_cuda && allow_tf32 != before_) {
    if (changed_) at::globalContext().setAllowTF32CuBLAS(allow_tf32);
  }
  ~CublasTf32Scope() {
    if (changed_) at::globalContext().setAllowTF32CuBLAS(before_);
  }
  CublasTf32Scope(const CublasTf32Scope&) = delete;
  CublasTf32Scope& operator=(const CublasTf32Scope&) = delete;

 private:
  bool before_;
  bool changed_;
};

}  // namespace spinal_ops::chain

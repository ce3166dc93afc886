// Op schemas of the spinal_ops namespace (no Python: the CMake build links this too).
//
// The schemas must match spinal_ops/backends/fused.py (FORWARD_SCHEMA, BACKWARD_SCHEMA).
// Kernels register separately: csrc/cpu/ (CPU) and csrc/cuda/ (CUDA, when built with nvcc);
// the Python module spinal_ops._C is in csrc/python_module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(spinal_ops, m) {
  m.def(
      "fused_forward(Tensor x, Tensor weight_in, Tensor weight_hidden, Tensor? bias, Tensor? weight_out, "
      "Tensor? bias_out, str activation, float negative_slope) -> (Tensor, Tensor)");
  m.def(
      "fused_backward(Tensor grad_out, Tensor x, Tensor pre_activation, Tensor weight_in, Tensor weight_hidden, "
      "Tensor? weight_out, bool has_bias, str activation, float negative_slope) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

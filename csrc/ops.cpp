// Op schemas of the spinal_ops namespace (no Python: the CMake build links this too).
//
// The schemas must match spinal_ops/ops.py (FORWARD_SCHEMA, BACKWARD_SCHEMA; tests/test_ops.py checks).
// Kernels register separately: csrc/cpu/ (CPU) and csrc/cuda/ (CUDA, when built with nvcc; the
// hoisted pair has CUDA kernels only: on CPU the native op runs that chain already);
// the Python module spinal_ops._C is in csrc/python_module.cpp.
#include <torch/library.h>

// Both op pairs share their schemas (string literals, concatenated by the preprocessor).
#define SPINAL_FORWARD_ARGS                                                                                  \
  "(Tensor x, Tensor weight_in, Tensor weight_hidden, Tensor? bias, Tensor? weight_out, Tensor? bias_out, " \
  "str activation, float negative_slope, bool allow_tf32=False, bool keep_pre_activation=True, "              \
  "Tensor? dropout_seed=None, float dropout_p=0.0) -> (Tensor, Tensor)"
#define SPINAL_BACKWARD_ARGS                                                                                   \
  "(Tensor grad_out, Tensor x, Tensor pre_activation, Tensor weight_in, Tensor weight_hidden, Tensor? weight_out, " \
  "bool[6] output_mask, str activation, float negative_slope, bool allow_tf32=False, "                          \
  "Tensor? dropout_seed=None, float dropout_p=0.0) "                                                             \
  "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

// normed_*: a training call with batch norm (and dropout), layer by layer over the whole batch
// (csrc/chain/normed_chain.h, registered there for CPU and CUDA); must match spinal_ops/ops.py's
// NORMED_FORWARD_SCHEMA and NORMED_BACKWARD_SCHEMA.
#define SPINAL_NORMED_FORWARD_ARGS                                                                           \
  "(Tensor x, Tensor weight_in, Tensor weight_hidden, Tensor? bias, Tensor? weight_out, Tensor? bias_out, " \
  "Tensor? norm_weight, Tensor? norm_bias, str activation, float negative_slope, float norm_eps, "          \
  "bool allow_tf32=False, Tensor? dropout_seed=None, float dropout_p=0.0) "                                  \
  "-> (Tensor out, Tensor pre_norm, Tensor batch_mean, Tensor batch_var)"
#define SPINAL_NORMED_BACKWARD_ARGS                                                                            \
  "(Tensor grad_out, Tensor x, Tensor pre_norm, Tensor batch_mean, Tensor batch_var, Tensor weight_in, "      \
  "Tensor weight_hidden, Tensor? weight_out, Tensor? norm_weight, Tensor? norm_bias, bool[8] output_mask, "    \
  "str activation, float negative_slope, float norm_eps, bool allow_tf32=False, Tensor? dropout_seed=None, " \
  "float dropout_p=0.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

// native_*: the CPU op (csrc/cpu/) and the CUDA kernels (csrc/cuda/). hoisted_*: the hoisted ATen
// chain (csrc/chain/hoisted_chain.h) as its own op pair, so that the cuda backend can pick it per call.
TORCH_LIBRARY(spinal_ops, m) {
  m.def("native_forward" SPINAL_FORWARD_ARGS);
  m.def("native_backward" SPINAL_BACKWARD_ARGS);
  m.def("hoisted_forward" SPINAL_FORWARD_ARGS);
  m.def("hoisted_backward" SPINAL_BACKWARD_ARGS);
  m.def("normed_forward" SPINAL_NORMED_FORWARD_ARGS);
  m.def("normed_backward" SPINAL_NORMED_BACKWARD_ARGS);
}

// Op schemas of the spinal_ops namespace and the Python module spinal_ops._C.
//
// The schemas must match spinal_ops/backends/fused.py (FORWARD_SCHEMA, BACKWARD_SCHEMA).
// Kernels register separately: csrc/cpu/ (CPU) and csrc/cuda/ (CUDA, when built with nvcc).
#include <torch/library.h>
#include <Python.h>

TORCH_LIBRARY(spinal_ops, m) {
  m.def(
      "fused_forward(Tensor x, Tensor weight_in, Tensor weight_hidden, Tensor? bias, Tensor? weight_out, "
      "Tensor? bias_out, str activation, float negative_slope) -> (Tensor, Tensor)");
  m.def(
      "fused_backward(Tensor grad_out, Tensor x, Tensor pre_activation, Tensor weight_in, Tensor weight_hidden, "
      "Tensor? weight_out, bool has_bias, str activation, float negative_slope) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

PyObject* cuda_compiled(PyObject*, PyObject*) {
#ifdef SPINAL_OPS_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cuda_compiled", cuda_compiled, METH_NOARGS, "Whether the CUDA kernels were compiled into this build."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "spinal_ops compiled ops (registered with torch.library)", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }

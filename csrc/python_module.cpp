// The Python module spinal_ops._C (built by setup.py only; the CMake build has no Python).
//
// Importing it loads this shared library, whose static initialisers register the op schemas
// (csrc/ops.cpp) and kernels (csrc/cpu/, csrc/cuda/) with the dispatcher.
#include <Python.h>

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

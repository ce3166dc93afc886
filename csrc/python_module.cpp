// The Python module spinal_ops._C (built by setup.py only; the CMake build has no Python).
//
// Importing it loads this shared library, whose static initialisers register the op schemas
// (csrc/ops.cpp) and kernels (csrc/cpu/, csrc/cuda/) with the dispatcher.
#include <Python.h>

#include "cpu/bf16_tile_gemm.h"
#include "cpu/blas.h"
#include "cpu/chain_engine.h"
#include "cpu/narrow_chain.h"
#include "cpu/tile_gemm.h"

namespace {

PyObject* cuda_compiled(PyObject*, PyObject*) {
#ifdef SPINAL_OPS_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* cpu_vector_kernels(PyObject*, PyObject*) {
  if (spinal_ops::cpu::narrow_chain_kernels_run()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyObject* cpu_direct_blas(PyObject*, PyObject*) {
  if (spinal_ops::cpu::has_direct_gemm(c10::kFloat)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyObject* cpu_tile_gemm(PyObject*, PyObject*) {
  // The tiles run on the chain's direct path only (with SPINAL_OPS_DIRECT_BLAS=0 every GEMM is ATen's).
  const char* instructions = spinal_ops::cpu::tile_gemm_instructions();
  if (instructions == nullptr || !spinal_ops::cpu::has_direct_gemm(c10::kFloat)) Py_RETURN_NONE;
  return PyUnicode_FromString(instructions);
}

PyObject* cpu_bf16_gemm(PyObject*, PyObject*) {
  if (spinal_ops::cpu::native_bf16_gemm()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyObject* cpu_bf16_tile_gemm(PyObject*, PyObject*) {
  if (spinal_ops::cpu::native_bf16_gemm() && spinal_ops::cpu::bf16_tile_kernels_run()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef methods[] = {
    {"cuda_compiled", cuda_compiled, METH_NOARGS, "Whether the CUDA kernels were compiled into this build."},
    {"cpu_vector_kernels", cpu_vector_kernels, METH_NOARGS,
     "Whether the CPU op runs narrow float32 layers with its AVX2 kernels on this machine."},
    {"cpu_direct_blas", cpu_direct_blas, METH_NOARGS,
     "Whether the hoisted chain calls PyTorch's BLAS directly on CPU tensors (csrc/cpu/blas.h)."},
    {"cpu_tile_gemm", cpu_tile_gemm, METH_NOARGS,
     "The instruction set of the hoisted chain's register-tiled float32 GEMMs here (csrc/cpu/tile_gemm.h), or None."},
    {"cpu_bf16_gemm", cpu_bf16_gemm, METH_NOARGS,
     "Whether the CPU op runs bfloat16 calls of the hoisted chain on bfloat16 tensors here (csrc/cpu/dtypes.h)."},
    {"cpu_bf16_tile_gemm", cpu_bf16_tile_gemm, METH_NOARGS,
     "Whether the bfloat16 chain's products of up to 2^24 multiply-adds run on AVX512_BF16 register tiles here "
     "(csrc/cpu/bf16_tile_gemm.h)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "spinal_ops compiled ops (registered with torch.library)", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }

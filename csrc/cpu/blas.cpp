// PyTorch's BLAS routines, found in libtorch_cpu (see blas.h).
#include "blas.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string_view>

namespace spinal_ops::cpu {
namespace {

// Fortran BLAS: column-major, every argument by pointer, LP64 (32-bit) integers.
template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                             const int*, const T*, const int*, const T*, T*, const int*);

template <typename T>
FortranGemm<T> load_gemm(const char* name) {
  // SPINAL_OPS_DIRECT_BLAS=0 turns the direct calls off: the chain then makes a view per block
  // and calls ATen, as it does on CUDA (the tests run that path on CPU so).
  const char* setting = std::getenv("SPINAL_OPS_DIRECT_BLAS");
  if (setting != nullptr && std::string_view(setting) == "0") return nullptr;
  // RTLD_NOLOAD: only the libtorch_cpu this process already runs; its handle, so that a BLAS of
  // another library loaded into the process is never picked up.
  void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD);
  return torch_cpu ? reinterpret_cast<FortranGemm<T>>(dlsym(torch_cpu, name)) : nullptr;
}

template <typename T>
FortranGemm<T> fortran_gemm();

template <>
FortranGemm<float> fortran_gemm<float>() {
  static const FortranGemm<float> gemm = load_gemm<float>("sgemm_");
  return gemm;
}

template <>
FortranGemm<double> fortran_gemm<double>() {
  static const FortranGemm<double> gemm = load_gemm<double>("dgemm_");
  return gemm;
}

bool fits_int(int64_t value) { return value <= std::numeric_limits<int>::max(); }

}  // namespace

bool has_direct_gemm(c10::ScalarType dtype) {
  if (dtype == c10::kFloat) return fortran_gemm<float>() != nullptr;
  if (dtype == c10::kDouble) return fortran_gemm<double>() != nullptr;
  return false;
}

template <typename T>
bool direct_gemm(bool a_transposed, bool b_transposed, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const FortranGemm<T> gemm = fortran_gemm<T>();
  if (gemm == nullptr || !fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(lda) || !fits_int(ldb) ||
      !fits_int(ldc)) {
    return false;
  }
  // Row-major c = op(a) op(b) is column-major c^T = op(b)^T op(a)^T: b first, a second, and each
  // row-major matrix read as its column-major transpose.
  const char trans_b = b_transposed ? 'T' : 'N', trans_a = a_transposed ? 'T' : 'N';
  const int rows = static_cast<int>(n), columns = static_cast<int>(m), depth = static_cast<int>(k);
  // BLAS wants leading dimensions >= 1 even for empty matrices.
  const int ld_b = static_cast<int>(std::max<int64_t>(ldb, 1)), ld_a = static_cast<int>(std::max<int64_t>(lda, 1));
  const int ld_c = static_cast<int>(std::max<int64_t>(ldc, 1));
  gemm(&trans_b, &trans_a, &rows, &columns, &depth, &alpha, b, &ld_b, a, &ld_a, &beta, c, &ld_c);
  return true;
}

template bool direct_gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                                 int64_t, float, float*, int64_t);
template bool direct_gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                                  const double*, int64_t, double, double*, int64_t);

}  // namespace spinal_ops::cpu

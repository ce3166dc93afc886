// The hoisted chain (csrc/chain/hoisted_chain.h) on cuBLASLt, with the element-wise work of each
// recurrence step in the matmul's epilogue. Opt-in: SPINAL_OPS_CUDA_LT=1, read per call by the CUDA
// ops (register.cu); it has not run on a GPU, and neither `auto` nor the cost model chooses it.
//
// Why: on aten_engine() each recurrence step is an addmm_ into the layer's strided slot of the
// [B, L*w] buffer and then a separate activation pass, i.e. two launches and two extra passes over
// B*w per layer; at B = 65536 on an H200 that chain runs at ~20 % of a GEMM of the same FLOPs.
//
// What each call does (one cublasLtMatmul; the chain's row-major c = a @ b is cuBLASLt's
// column-major D^T = b^T a^T, so a row-major block is a transposed column-major operand):
//   * gemm (every product of the chain: the window groups' input products, the projection, the
//     backward's dx, dW and dH): C = D = c with beta = 1 to accumulate; the first product of a sum
//     with a bias adds it in the epilogue (CUBLASLT_EPILOGUE_BIAS, beta = 0), as at::addmm_out does.
//   * gemm_activation, the recurrence step z_l = products_l + h_{l-1} R^T, h_l = phi(z_l): C = z_l's
//     slot, beta = 1, D = h_l, the activation in the epilogue:
//       relu: CUBLASLT_EPILOGUE_RELU, where Z need not survive (inference; training that keeps H in
//         place of Z, so D is the slot itself). Training that keeps Z (no projection) falls back:
//         RELU_AUX keeps a bit mask, not Z, and the chain's backward reads Z.
//       gelu_tanh: CUBLASLT_EPILOGUE_GELU (cuBLASLt's GELU is the tanh approximation), and where the
//         training forward keeps Z, CUBLASLT_EPILOGUE_GELU_AUX with the pre-activation written back
//         over z_l's slot (aux = C: each element of C is read before its aux value, computed from
//         it, is stored; cuBLASLt does not document aux aliasing C, which the GPU tests check).
//       everything else (gelu with erf, which the epilogue does not compute; silu, tanh, sigmoid,
//       leaky_relu, identity) falls back to gemm and ATen's activation pass.
//   * gemm_activation_grad, the backward step dz_l = (dH_l + dz_{l+1} R) * phi'(z_l): for gelu_tanh
//     one call with C = D = dz_l's slot, beta = 1 and CUBLASLT_EPILOGUE_DGELU reading z_l (the kept
//     Z) as aux. relu falls back (DRELU needs the forward's bit mask, which the chain does not keep),
//     as do the other activations; so do the bias gradients (a column sum of dZ, ATen's).
// A call returns false, and the chain runs today's calls for it, wherever cuBLASLt cannot take it:
// a block whose strides are not a matrix's (neither stride 1), a column-major output, an empty
// dimension, an aux leading dimension not divisible by 8 (GELU_AUX, DGELU), no algorithm from the
// heuristic for the pointers' alignments, or a matmul that reports an error before it runs.
// Calls with dropout never get here (the chain keeps its separate products and factor passes).
//
// Numerics: float32 computes in fp32, or TF32 where ATen's cuBLAS switch allows it (the op sets it
// from its allow_tf32 for the call, chain/cublas_tf32_scope.h); float16 and bfloat16 compute and
// scale in fp32, and split-K partial sums stay fp32 (reduction in the compute type or none).
//
// Descriptors are initialised in place per call (no allocation); what costs is the heuristic, so
// its answer (the algorithm and its workspace size, or that there is none) is cached per device,
// dtype, compute type, epilogue, transposes, sizes, leading dimensions and pointer alignments. The
// handle is ATen's (at::cuda::getCurrentCUDABlasLtHandle), the stream the current one, the
// workspace, where an algorithm wants one, from PyTorch's caching allocator.
#include "lt_engine.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <unordered_map>

namespace spinal_ops::cuda_kernels {
namespace {

using chain::Block;

// The most workspace an algorithm may ask for (what PyTorch offers cuBLASLt on Hopper); a call
// allocates only what its algorithm reports.
constexpr uint64_t kMaxWorkspaceBytes = uint64_t{32} << 20;
// Cached heuristic answers before the cache starts over (a workload of ever-new shapes).
constexpr size_t kMaxCachedPlans = 4096;

enum CallKind : int { kProduct, kActivationStep, kGradientStep };
std::array<std::atomic<int64_t>, 3> calls_taken{};

bool counted(CallKind kind, bool taken) {
  if (taken) calls_taken[kind].fetch_add(1, std::memory_order_relaxed);
  return taken;
}

void* pointer(const Block& b) {
  return static_cast<char*>(b.base->data_ptr()) + b.offset * static_cast<int64_t>(b.base->element_size());
}

// A block as the column-major matrix cuBLASLt reads: `rows` x `cols` with leading dimension `ld`,
// transposed by cuBLASLt when op is CUBLAS_OP_T.
struct LtMatrix {
  void* data;
  int64_t rows, cols, ld;
  cublasOperation_t op;
};

// An operand of D^T = b^T a^T: a row-major block (col_stride 1) is stored as its transpose, which is
// what the product needs (op N); a column-major one (row_stride 1) is stored as itself (op T).
std::optional<LtMatrix> operand(const Block& b) {
  if (b.col_stride == 1 && b.row_stride >= std::max<int64_t>(b.cols, 1)) {
    return LtMatrix{pointer(b), b.cols, b.rows, b.row_stride, CUBLAS_OP_N};
  }
  if (b.row_stride == 1 && b.col_stride >= std::max<int64_t>(b.rows, 1)) {
    return LtMatrix{pointer(b), b.rows, b.cols, b.col_stride, CUBLAS_OP_T};
  }
  return std::nullopt;
}

// C or D: cuBLASLt writes them untransposed, so only a row-major block (its D^T) fits.
std::optional<LtMatrix> output(const Block& b) {
  if (b.col_stride == 1 && b.row_stride >= std::max<int64_t>(b.cols, 1)) {
    return LtMatrix{pointer(b), b.cols, b.rows, b.row_stride, CUBLAS_OP_N};
  }
  return std::nullopt;
}

bool same_block(const Block& x, const Block& y) {
  return pointer(x) == pointer(y) && x.rows == y.rows && x.cols == y.cols && x.row_stride == y.row_stride &&
         x.col_stride == y.col_stride;
}

// The largest power of two (at most 256, cuBLASLt's default assumption) dividing the address: the
// heuristic must only offer algorithms that work with the pointers a strided slot has.
int64_t alignment(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  int64_t bytes = 1;
  while (bytes < 256 && address % (2 * bytes) == 0) bytes *= 2;
  return bytes;
}

std::optional<cudaDataType_t> lt_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: return std::nullopt;
  }
}

struct Epilogue {
  cublasLtEpilogue_t kind = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // CUBLASLT_EPILOGUE_BIAS: D's dtype, one value per output column
  void* aux = nullptr;         // the GELU input matrix (GELU_AUX writes it, DGELU reads it)
  int64_t aux_ld = 0;
};

// Sets `epilogue` to `kind` with z as its GELU input matrix; false where z cannot be one (cuBLASLt
// wants its leading dimension divisible by 8).
bool with_gelu_input(Epilogue& epilogue, cublasLtEpilogue_t kind, const Block& z) {
  if (z.col_stride != 1 || z.row_stride % 8 != 0) return false;
  epilogue = {kind, nullptr, pointer(z), z.row_stride};
  return true;
}

template <typename T>
bool set(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const T& value) {
  return cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)) == CUBLAS_STATUS_SUCCESS;
}

template <typename T>
bool set(cublasLtMatmulPreference_t preference, cublasLtMatmulPreferenceAttributes_t attribute, const T& value) {
  return cublasLtMatmulPreferenceSetAttribute(preference, attribute, &value, sizeof(value)) == CUBLAS_STATUS_SUCCESS;
}

// Everything the heuristic's answer depends on.
using PlanKey = std::array<int64_t, 21>;
struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    size_t hash = 0;
    for (const int64_t value : key) hash = hash * 1000003u ^ std::hash<int64_t>{}(value);
    return hash;
  }
};

std::mutex plans_mutex;
std::unordered_map<PlanKey, std::optional<cublasLtMatmulHeuristicResult_t>, PlanKeyHash> plans;

// The algorithm for this call, or none (cuBLASLt has none for these layouts and alignments).
std::optional<cublasLtMatmulHeuristicResult_t> plan(const PlanKey& key, cublasLtHandle_t handle,
                                                    cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                                                    cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                                    cublasLtMatrixLayout_t d, const int64_t* alignments) {
  {
    const std::lock_guard<std::mutex> lock(plans_mutex);
    const auto found = plans.find(key);
    if (found != plans.end()) return found->second;
  }
  std::optional<cublasLtMatmulHeuristicResult_t> chosen;
  cublasLtMatmulPreferenceOpaque_t preference;
  // Split-K partial sums in the compute type (fp32) or none: never rounded to a half type between splits.
  const uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  bool ready = cublasLtMatmulPreferenceInit(&preference) == CUBLAS_STATUS_SUCCESS &&
               set(&preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, kMaxWorkspaceBytes) &&
               set(&preference, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reductions);
  const cublasLtMatmulPreferenceAttributes_t alignment_attributes[] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4 && ready; ++i) {
    ready = set(&preference, alignment_attributes[i], static_cast<uint32_t>(alignments[i]));
  }
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  if (ready && cublasLtMatmulAlgoGetHeuristic(handle, desc, a, b, c, d, &preference, 1, &result, &count) ==
                   CUBLAS_STATUS_SUCCESS &&
      count > 0 && result.state == CUBLAS_STATUS_SUCCESS) {
    chosen = result;
  }
  const std::lock_guard<std::mutex> lock(plans_mutex);
  if (plans.size() >= kMaxCachedPlans) plans.clear();
  plans.emplace(key, chosen);
  return chosen;
}

// d = epilogue(a @ b + beta * c) in the chain's row-major terms (c may be d itself: in place); false,
// having done nothing, where cuBLASLt cannot take the call.
bool lt_matmul(const Block& d, const Block& c, float beta, const Block& a, const Block& b, const Epilogue& epilogue) {
  const at::ScalarType dtype = d.base->scalar_type();
  const auto type = lt_type(dtype);
  if (!type || a.base->scalar_type() != dtype || b.base->scalar_type() != dtype || c.base->scalar_type() != dtype) {
    return false;
  }
  if (a.rows == 0 || a.cols == 0 || b.cols == 0) return false;  // ATen's call fills or skips an empty product
  const auto lt_a = operand(b), lt_b = operand(a);  // D^T = b^T a^T
  const auto lt_c = output(c), lt_d = output(d);
  if (!lt_a || !lt_b || !lt_c || !lt_d) return false;
  if (lt_c->data == lt_d->data && lt_c->ld != lt_d->ld) return false;  // in place needs one layout

  const bool tf32 = dtype == at::kFloat && at::globalContext().allowTF32CuBLAS();
  const cublasComputeType_t compute = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  cublasLtMatmulDescOpaque_t desc;
  if (cublasLtMatmulDescInit(&desc, compute, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS ||
      !set(&desc, CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(lt_a->op)) ||
      !set(&desc, CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(lt_b->op)) ||
      !set(&desc, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(epilogue.kind))) {
    return false;
  }
  if (epilogue.bias != nullptr && !set(&desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, epilogue.bias)) return false;
  if (epilogue.aux != nullptr && (!set(&desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, epilogue.aux) ||
                                  !set(&desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, epilogue.aux_ld))) {
    return false;
  }
  cublasLtMatrixLayoutOpaque_t layout_a, layout_b, layout_c, layout_d;
  const auto init = [&](cublasLtMatrixLayoutOpaque_t& layout, const LtMatrix& m) {
    return cublasLtMatrixLayoutInit(&layout, *type, static_cast<uint64_t>(m.rows), static_cast<uint64_t>(m.cols),
                                    m.ld) == CUBLAS_STATUS_SUCCESS;
  };
  if (!init(layout_a, *lt_a) || !init(layout_b, *lt_b) || !init(layout_c, *lt_c) || !init(layout_d, *lt_d)) {
    return false;
  }

  const int64_t alignments[] = {alignment(lt_a->data), alignment(lt_b->data), alignment(lt_c->data),
                                alignment(lt_d->data)};
  const PlanKey key = {d.base->get_device(),       static_cast<int64_t>(*type), static_cast<int64_t>(compute),
                       epilogue.kind,              lt_a->op,                    lt_b->op,
                       lt_d->rows,                 lt_d->cols,                  a.cols,
                       lt_a->ld,                   lt_b->ld,                    lt_c->ld,
                       lt_d->ld,                   epilogue.aux_ld,             alignments[0],
                       alignments[1],              alignments[2],               alignments[3],
                       epilogue.bias ? alignment(epilogue.bias) : 0,
                       epilogue.aux ? alignment(epilogue.aux) : 0,
                       lt_c->data == lt_d->data};
  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const auto chosen = plan(key, handle, &desc, &layout_a, &layout_b, &layout_c, &layout_d, alignments);
  if (!chosen) return false;

  at::Tensor workspace;
  if (chosen->workspaceSize > 0) {
    workspace = at::empty({static_cast<int64_t>(chosen->workspaceSize)}, d.base->options().dtype(at::kByte));
  }
  const float alpha = 1.0f;
  return cublasLtMatmul(handle, &desc, &alpha, lt_a->data, &layout_a, lt_b->data, &layout_b, &beta, lt_c->data,
                        &layout_c, lt_d->data, &layout_d, &chosen->algo,
                        workspace.defined() ? workspace.data_ptr() : nullptr, chosen->workspaceSize,
                        c10::cuda::getCurrentCUDAStream().stream()) == CUBLAS_STATUS_SUCCESS;
}

bool lt_gemm(const Block& c, bool accumulate, const std::optional<Block>& bias, const Block& a, const Block& b) {
  Epilogue epilogue;
  if (!accumulate && bias) {
    if (bias->col_stride != 1 || bias->base->scalar_type() != c.base->scalar_type()) return false;
    epilogue.kind = CUBLASLT_EPILOGUE_BIAS;
    epilogue.bias = pointer(*bias);
  }
  return counted(kProduct, lt_matmul(c, c, accumulate ? 1.0f : 0.0f, a, b, epilogue));
}

bool lt_gemm_activation(const Block& h, const Block& z, bool keep_z, const Block& a, const Block& b, Activation act,
                        double /*negative_slope*/) {
  Epilogue epilogue;
  if (act == Activation::ReLU && !keep_z) {
    epilogue.kind = CUBLASLT_EPILOGUE_RELU;
  } else if (act == Activation::GELUTanh && !keep_z) {
    epilogue.kind = CUBLASLT_EPILOGUE_GELU;
  } else if (act == Activation::GELUTanh) {
    // Z written back over z's slot while h goes to its own.
    if (same_block(h, z) || !with_gelu_input(epilogue, CUBLASLT_EPILOGUE_GELU_AUX, z)) return false;
  } else {
    return false;
  }
  return counted(kActivationStep, lt_matmul(h, z, 1.0f, a, b, epilogue));
}

bool lt_gemm_activation_grad(const Block& dz, const Block& z, const Block& a, const Block& b, Activation act,
                             double /*negative_slope*/) {
  Epilogue epilogue;
  if (act != Activation::GELUTanh || !with_gelu_input(epilogue, CUBLASLT_EPILOGUE_DGELU, z)) return false;
  return counted(kGradientStep, lt_matmul(dz, dz, 1.0f, a, b, epilogue));
}

}  // namespace

bool lt_engine_requested() {
  const char* value = std::getenv("SPINAL_OPS_CUDA_LT");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

const chain::GemmEngine& lt_engine() {
  static const chain::GemmEngine engine = [] {
    chain::GemmEngine lt = chain::aten_engine();
    lt.gemm = lt_gemm;
    lt.gemm_activation = lt_gemm_activation;
    lt.gemm_activation_grad = lt_gemm_activation_grad;
    return lt;
  }();
  return engine;
}

std::array<int64_t, 3> lt_engine_calls() {
  return {calls_taken[kProduct].load(), calls_taken[kActivationStep].load(), calls_taken[kGradientStep].load()};
}

}  // namespace spinal_ops::cuda_kernels

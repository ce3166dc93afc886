// The CUDA op's host launchers (csrc/cuda/forward.cu, backward.cu) and kernels run on CPU
// through cuda_shim.h and emulated_runtime.h, as torch ops spinal_emu::forward / backward with
// the schemas of native_forward / native_backward plus the accumulator policy and the fake device
// (a GPU target, emulated_runtime.h). Policies: "simt", "tf32", "wmma" (the tile kernels,
// which the call must route to), "persistent_simt", "persistent_tf32", "persistent_wmma" (the
// persistent forward and backward launch 1 at any width, launch 2 the tile one),
// "narrow" (the narrow kernels for the forward and backward launch 1; launch 2 with the dtype's
// tiled policy: simt or wmma), "warp_narrow" (the warp-level narrow forward and backward launch 1,
// warp_narrow_kernels.cuh; launch 2 the dtype's tiled one), "aten" (the hoisted chain on ATen's
// engine, csrc/chain/hoisted_chain.cpp, as register.cu runs it), "auto" (the op's own routing:
// use_native_kernels, narrow_kernels_fit, use_warp_narrow_forward / use_warp_narrow_backward
// under SPINAL_OPS_CUDA_WARP_NARROW=1, and the backward's use_persistent_kernels under
// SPINAL_OPS_CUDA_PERSISTENT=1). Every CPU allocation made during a call is poisoned.
// The trailing dropout_seed and dropout_p are the op pairs' (contract §1, "Masks").
// Built by tests/test_cuda_emulation.py; never part of the package.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include "cuda_shim.h"
#include "emulated_runtime.h"
#include "sync_kernels.h"
// clang-format off: the shim and the runtime come before the kernels
#include "../../csrc/cuda/backward_kernels.cuh"
#include "../../csrc/cuda/persistent_backward.cuh"
// clang-format on

namespace spinal_ops {
namespace cuda_kernels {

alignas(128) unsigned char smem[232 * 1024];  // the kernels' `extern __shared__` buffer

// Seeded bug: launch 1 does not zero launch 2's split-K tile counters.
inline bool drop_counter_reset = false;
template <typename T>
void inject_fault(DataGradArgs<T>& args) {
  if (drop_counter_reset) args.num_counters = 0;
}
template <typename T>
void inject_fault(PersistentGradArgs<T>& args) {
  inject_fault(static_cast<DataGradArgs<T>&>(args));
}

}  // namespace cuda_kernels
}  // namespace spinal_ops

#include "../../csrc/cuda/backward.cu"
#include "../../csrc/cuda/backward_outputs.h"
#include "../../csrc/cuda/forward.cu"
#include "../../csrc/cuda/persistent_backward.cu"
#include "../../csrc/cuda/persistent_forward.cu"
// host-only ATen code: the hoisted chain (run on ATen's engine, as register.cu runs it)
#include "../../csrc/chain/dropout_factors.cpp"
#include "../../csrc/chain/hoisted_chain.cpp"
#include "../../csrc/chain/matrix_block.cpp"
#include "../../csrc/common/spinal_shape.cpp"

namespace spinal_ops {
namespace cuda_kernels {
namespace {

const bool smem_registered = [] {
  emu::smem_base = smem;
  emu::smem_capacity = sizeof(smem);
  return true;
}();

// Fills every CPU allocation with 0xFF bytes (NaN in each float format, -1 as int): an output or
// workspace element the kernels fail to write, or a counter they fail to zero, shows up.
class PoisonAllocator final : public c10::Allocator {
 public:
  explicit PoisonAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr data = base_->allocate(n);
    if (n > 0) std::memset(data.get(), 0xFF, n);
    return data;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base_->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

 private:
  c10::Allocator* base_;
};

constexpr uint8_t kAllocatorPriority = 200;

// One emulated call: the fake device, the TF32 setting of the policy ("auto" keeps the global
// one), poisoned allocations.
class Session {
 public:
  Session(c10::string_view policy, int64_t device)
      : tf32_before_(at::globalContext().allowTF32CuBLAS()), base_(c10::GetCPUAllocator()), poison_(base_) {
    emu::target(static_cast<int>(device));
    emu::current_device = static_cast<int>(device);
    if (policy != "auto") at::globalContext().setAllowTF32CuBLAS(policy == "tf32" || policy == "persistent_tf32");
    c10::SetCPUAllocator(&poison_, kAllocatorPriority);
  }
  ~Session() {
    c10::SetCPUAllocator(base_, kAllocatorPriority);
    at::globalContext().setAllowTF32CuBLAS(tf32_before_);
  }

 private:
  bool tf32_before_;
  c10::Allocator* base_;
  PoisonAllocator poison_;
};

bool is_persistent(c10::string_view policy) { return policy.substr(0, 11) == "persistent_"; }

// The persistent policy's accumulator fits the dtype (the kernel's own is the dtype's, launch.cuh).
void check_persistent_policy(const at::Tensor& x, c10::string_view policy, int64_t device) {
  const bool fp32 = x.scalar_type() == at::kFloat;
  TORCH_CHECK(fp32 ? policy == "persistent_simt" || policy == "persistent_tf32" : policy == "persistent_wmma",
              "policy ", policy, " does not fit ", x.scalar_type());
  TORCH_CHECK(persistent_forward_fits(x.scalar_type(), policy == "persistent_tf32", static_cast<int>(device)),
              "the persistent forward does not run ", x.scalar_type(), " on ", emu::target(device).name);
}

// Whether the call runs the native kernels: the op's routing for "auto", forced otherwise.
bool native_kernels(const SpinalShape& shape, const at::Tensor& x, c10::string_view policy, int64_t device) {
  const bool routed = use_native_kernels(shape, x.scalar_type(), at::globalContext().allowTF32CuBLAS(), static_cast<int>(device));
  if (policy == "auto") return routed;
  if (policy == "aten") return false;
  if (policy == "narrow") {
    TORCH_CHECK(narrow_kernels_fit(shape), "w = ", shape.layer_width, ", M = ", shape.out_features,
                " does not fit the narrow kernels");
  } else if (policy == "warp_narrow") {
    TORCH_CHECK(warp_narrow_forward_fits(shape, x.scalar_type(), static_cast<int>(device)), "w = ",
                shape.layer_width, ", M = ", shape.out_features, " in ", x.scalar_type(),
                " does not fit the warp-level narrow forward on ", emu::target(device).name);
  } else {
    const bool fp32 = x.scalar_type() == at::kFloat;
    TORCH_CHECK(fp32 ? policy == "simt" || policy == "tf32" : policy == "wmma", "policy ", policy, " does not fit ",
                x.scalar_type());
  }
  TORCH_CHECK(routed, "w = ", shape.layer_width, " is routed to the hoisted chain on ", emu::target(device).name,
              " (", x.scalar_type(), ", policy ", policy, ")");
  return true;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight_in,
                                           const at::Tensor& weight_hidden, const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& weight_out,
                                           const std::optional<at::Tensor>& bias_out, c10::string_view activation,
                                           double negative_slope, c10::string_view policy, int64_t device,
                                           bool keep_pre_activation, const std::optional<at::Tensor>& dropout_seed,
                                           double dropout_p) {
  const SpinalShape shape = check_spinal_shape(x, weight_in, weight_hidden, bias, weight_out, bias_out);
  const Activation act = parse_activation(activation);
  const Dropout dropout = chain::make_dropout(dropout_seed, dropout_p, shape);
  const Session session(policy, device);
  // The opt-in forwards have no dropout stage (register.cu and forward.cu never send them one).
  TORCH_CHECK(!dropout.active || !(is_persistent(policy) || policy == "warp_narrow"), "spinal_emu: policy ", policy,
              " has no dropout stage");
  if (is_persistent(policy)) {  // as register.cu with SPINAL_OPS_CUDA_PERSISTENT=1
    check_persistent_policy(x, policy, device);
    at::Tensor out = at::empty({shape.batch, shape.output_width()}, x.options());
    at::Tensor pre_activation = at::empty({keep_pre_activation ? shape.batch : 0, shape.hidden()}, x.options());
    if (shape.batch > 0) {
      launch_persistent_forward(shape, x.contiguous(), weight_in.contiguous(), weight_hidden.contiguous(), bias,
                                weight_out, bias_out, act, static_cast<float>(negative_slope),
                                at::globalContext().allowTF32CuBLAS(), out, pre_activation);
    }
    return {out, pre_activation};
  }
  // As register.cu: outputs from at::empty (poisoned here), nothing launched for an empty batch,
  // no Z for the narrow forward unless it is kept.
  const bool narrow = policy == "narrow" || policy == "auto";  // the tiled policies test the tiled kernels
  const bool warp_narrow = policy == "warp_narrow";
  at::Tensor out = at::empty({shape.batch, shape.output_width()}, x.options());
  const bool z_written = keep_pre_activation || !(warp_narrow || (narrow && narrow_kernels_fit(shape)));
  at::Tensor pre_activation = at::empty({z_written ? shape.batch : 0, shape.hidden()}, x.options());
  if (shape.batch == 0) return {out, pre_activation};
  if (!native_kernels(shape, x, policy, device)) {
    return chain::hoisted_forward(chain::aten_engine(), shape, x.contiguous(), weight_in.contiguous(),
                                  weight_hidden.contiguous(), bias, weight_out, bias_out, act, negative_slope,
                                  /*keep_pre_activation=*/true, dropout);
  }
  if (warp_narrow) {
    launch_warp_narrow_forward(shape, x.contiguous(), weight_in.contiguous(), weight_hidden.contiguous(), bias,
                               weight_out, bias_out, act, static_cast<float>(negative_slope), out, pre_activation);
    return {out, pre_activation};
  }
  launch_native_forward(shape, x.contiguous(), weight_in.contiguous(), weight_hidden.contiguous(), bias, weight_out,
                       bias_out, act, static_cast<float>(negative_slope), at::globalContext().allowTF32CuBLAS(), out,
                       pre_activation, dropout, narrow);
  return {out, pre_activation};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre_activation,
                                 const at::Tensor& weight_in, const at::Tensor& weight_hidden,
                                 const std::optional<at::Tensor>& weight_out, bool has_bias,
                                 c10::string_view activation, double negative_slope, c10::string_view policy,
                                 int64_t device, const std::optional<at::Tensor>& dropout_seed, double dropout_p) {
  SpinalShape shape = check_spinal_shape(x, weight_in, weight_hidden, std::nullopt, weight_out, std::nullopt);
  shape.has_bias = has_bias;
  shape.has_bias_out = has_bias && weight_out.has_value();
  const Activation act = parse_activation(activation);
  const Dropout dropout = chain::make_dropout(dropout_seed, dropout_p, shape);
  const Session session(policy, device);
  // As register.cu (poisoned here).
  const BackwardOutputs grads = allocate_backward_outputs(shape, x, weight_in, weight_hidden, weight_out);
  const bool tf32 = at::globalContext().allowTF32CuBLAS();
  if (is_persistent(policy)) {  // as register.cu with SPINAL_OPS_CUDA_PERSISTENT=1
    TORCH_CHECK(!dropout.active, "spinal_emu: policy ", policy, " has no dropout stage");
    check_persistent_policy(x, policy, device);
    if (shape.batch > 0) {
      launch_persistent_backward(shape, grad_out.contiguous(), x.contiguous(), pre_activation.contiguous(),
                                 weight_in.contiguous(), weight_hidden.contiguous(), weight_out, act,
                                 static_cast<float>(negative_slope), tf32, grads);
    }
    return {grads.grad_x, grads.grad_weight_in, grads.grad_weight_hidden, grads.grad_bias, grads.grad_weight_out,
            grads.grad_bias_out};
  }
  const bool persistent_routed =
      policy == "auto" && use_persistent_kernels(dropout, x.scalar_type(), tf32, static_cast<int>(device));
  if (shape.batch > 0 && !persistent_routed && !native_kernels(shape, x, policy, device)) {
    const chain::GradMask mask = {true, true, true, has_bias, weight_out.has_value(), shape.has_bias_out};
    const auto hoisted =
        chain::hoisted_backward(chain::aten_engine(), shape, grad_out.contiguous(), x.contiguous(),
                                pre_activation.contiguous(), weight_in.contiguous(), weight_hidden.contiguous(),
                                weight_out, act, negative_slope, mask, dropout);
    return {hoisted.begin(), hoisted.end()};
  }
  if (shape.batch > 0 && policy == "warp_narrow") {  // as backward.cu with SPINAL_OPS_CUDA_WARP_NARROW=1
    TORCH_CHECK(!dropout.active, "spinal_emu: policy warp_narrow has no dropout stage");
    launch_warp_narrow_backward(shape, grad_out.contiguous(), x.contiguous(), pre_activation.contiguous(),
                                weight_in.contiguous(), weight_hidden.contiguous(), weight_out, act,
                                static_cast<float>(negative_slope), grads);
  } else if (shape.batch > 0) {
    launch_native_backward(shape, grad_out.contiguous(), x.contiguous(), pre_activation.contiguous(),
                          weight_in.contiguous(), weight_hidden.contiguous(), weight_out, act,
                          static_cast<float>(negative_slope), tf32, grads, dropout, policy == "narrow" || policy == "auto");
  }
  return {grads.grad_x, grads.grad_weight_in, grads.grad_weight_hidden, grads.grad_bias, grads.grad_weight_out,
          grads.grad_bias_out};
}

int64_t width_limit(at::ScalarType dtype, bool allow_tf32, int64_t device) {
  emu::target(static_cast<int>(device));
  return tile_kernel_width_limit(dtype, allow_tf32, static_cast<int>(device));
}

std::string refusal(at::ScalarType dtype, int64_t device) {
  emu::target(static_cast<int>(device));
  return native_kernels_refusal(dtype, static_cast<int>(device));
}

// seed: CTA order and fragment element orders; removed_barrier: the "file:line" of a
// __syncthreads that does nothing ("": none); drop_counter_reset: launch 1 leaves the split-K
// counters as they are. Also forgets the barrier sites reached so far.
void configure(int64_t seed, c10::string_view removed_barrier, bool counter_reset_dropped) {
  emu::seed = static_cast<uint64_t>(seed);
  emu::removed_barrier = std::string(removed_barrier);
  emu::barrier_sites.clear();
  drop_counter_reset = counter_reset_dropped;
}

int64_t launches() { return emu::launches; }
// The kernels launched since the last call, in launch order: their names, grids and threads per CTA
// (and forgets them).
std::tuple<std::vector<std::string>, std::vector<int64_t>, std::vector<int64_t>> launched_kernels() {
  std::vector<std::string> names;
  std::vector<int64_t> grids, threads;
  for (const emu::KernelLaunch& launch : std::exchange(emu::launched_kernels, {})) {
    names.push_back(launch.kernel);
    grids.push_back(launch.grid);
    threads.push_back(launch.threads);
  }
  return {names, grids, threads};
}
int64_t attribute_sets() { return emu::attribute_sets; }
std::vector<std::string> barrier_sites() { return {emu::barrier_sites.begin(), emu::barrier_sites.end()}; }

// ---- seeded bugs in small kernels built from tile_mma.cuh's pieces ---------------------------

template <typename Kernel>
std::string caught(int64_t smem_bytes, Kernel kernel) {
  try {
    emu::launch("seeded-bug kernel", 1, kThreads, smem_bytes, kernel);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

using HalfMma = WmmaMma<64, __half>;
using HalfViews = SmemViews<HalfMma, at::Half>;

// Stages A [kTileM][kTileK] (`rows` of them filled) and B [kTileN][kTileK] with leading dimension
// ld, then runs the tensor-core MMA over them.
void stage_and_multiply(int rows, int ld) {
  const HalfViews sm(smem, 0);
  fill_tile(sm.a_stage, ld, rows, kTileK, [](int, int) { return at::Half(1.f); });
  fill_tile(sm.b_stage, ld, kTileN, kTileK, [](int, int) { return at::Half(1.f); });
  __syncthreads();
  HalfMma acc;
  acc.zero();
  acc.mma<Layout::Row, Layout::Col>(sm.a_stage, ld, sm.b_stage, ld, kTileK);
}

// The model's message for the seeded bug `name` ("" if it caught nothing).
std::string seeded_bug(c10::string_view name) {
  const int64_t bytes = SmemLayout<HalfMma, at::Half>(0).total;
  const int ld = SmemLayout<HalfMma, at::Half>::staged_ld(kTileK);
  if (name == "unwritten_smem") {  // a tail bug: one row of A is never staged
    return caught(bytes, [&] { stage_and_multiply(HalfMma::kTileM - 1, ld); });
  }
  if (name == "misaligned_ldm") {  // kTileK + 4 halfs = 72 bytes, not a multiple of 16
    return caught(bytes, [&] { stage_and_multiply(HalfMma::kTileM, kTileK + 4); });
  }
  if (name == "fragment_order") {  // reads a fragment as if lane l held elements 8l..8l+7 row-major
    std::vector<float> seen(256, NAN);
    std::string error = caught(bytes, [&] {
      const SmemPtr<at::Half> tile = reinterpret_cast<at::Half*>(smem);
      fill_tile(tile, 16, 16, 16, [](int r, int c) { return at::Half(static_cast<float>(16 * r + c)); });
      __syncthreads();
      if (threadIdx.x >= 32) return;
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> f;
      nvcuda::wmma::load_matrix_sync(f, smem_cast<const __half>(tile), 16);
      for (int i = 0; i < f.num_elements; ++i) seen[threadIdx.x * f.num_elements + i] = f.x[i];
    });
    for (int e = 0; e < 256 && error.empty(); ++e) {
      if (seen[e] != static_cast<float>(e)) error = "element " + std::to_string(e) + " of the tile read wrong";
    }
    return error;
  }
  TORCH_CHECK(false, "unknown seeded bug ", name);
}

// ---- inter-CTA synchronisation: sync_kernels.h --------------------------------------------

// [message ("" if the run passed), most CTAs that ran at once] of sync kernel `name` with `grid` CTAs.
std::tuple<std::string, int64_t> sync_kernel(c10::string_view name, int64_t device, int64_t grid) {
  emu::target(static_cast<int>(device));
  const int before = emu::current_device;
  int64_t most = 0;
  std::string message = emu_tests::run_sync_kernel(std::string(name), static_cast<int>(device), grid, &most);
  emu::current_device = before;
  return {message, most};
}

// ---- the persistent forward with a seeded scheduling bug ------------------------------------

// Seeded bug: every CTA of the grid must arrive before any takes a unit (a grid-wide wait without a
// cooperative launch). Deadlocks once the grid exceeds the CTAs that are co-resident.
inline int grid_arrived = 0;

template <class Mma, typename T>
__global__ void persistent_after_grid_wait_kernel(const PersistentArgs<T> p) {
  if (threadIdx.x == 0) {
    atomicAdd(&grid_arrived, 1);
    while (atomicAdd(&grid_arrived, 0) < static_cast<int>(gridDim.x)) __nanosleep(100);
  }
  __syncthreads();
  persistent_forward<Mma, T>(p);
}

// [message ("" if the run passed), output] of the float32 SIMT persistent forward behind a grid-wide
// wait on `device`, on at most `max_ctas` CTAs (0: the co-resident CTAs, as the launcher sizes it).
std::tuple<std::string, at::Tensor> persistent_grid_wait(const at::Tensor& x, const at::Tensor& weight_in,
                                                         const at::Tensor& weight_hidden,
                                                         const std::optional<at::Tensor>& weight_out,
                                                         int64_t device, int64_t max_ctas) {
  const SpinalShape shape = check_spinal_shape(x, weight_in, weight_hidden, std::nullopt, weight_out, std::nullopt);
  const Session session("persistent_simt", device);
  using Mma = SimtMma<32>;
  constexpr auto kernel = persistent_after_grid_wait_kernel<Mma, float>;
  at::Tensor out = at::empty({shape.batch, shape.output_width()}, x.options());
  grid_arrived = 0;
  try {
    const int64_t smem = persistent_smem_bytes<Mma, float>();
    const int64_t ctas = max_ctas > 0 ? max_ctas : co_resident_ctas<kernel>(kThreads, smem, smem);
    launch_persistent<Mma, float, kernel>(shape, x, weight_in, weight_hidden, std::nullopt, weight_out, std::nullopt,
                                          Activation::ReLU, 0.f, out, at::empty({0}, x.options()), ctas);
  } catch (const std::exception& e) {
    return {e.what(), out};
  }
  return {"", out};
}

// CTAs per SM the model lets run at once on `device` (emulated_runtime.h: ctas_per_sm).
int64_t ctas_per_sm(int64_t device, int64_t threads, int64_t smem) {
  return emu::ctas_per_sm(emu::target(static_cast<int>(device)), static_cast<int>(threads), smem);
}

// The last launch: grid, the CTAs allowed at once, the most that ran at once, CTA switches, threads per CTA.
std::vector<int64_t> last_launch() {
  const emu::LaunchRecord& r = emu::last_launch;
  return {r.grid, r.resident_limit, r.max_resident, r.switches, r.threads};
}

void set_spin_budget(int64_t budget) { emu::spin_budget = budget; }

// Every target's SM count (0: each its own), e.g. to make a persistent grid smaller than its work.
void set_sm_count(int64_t sms) { emu::sm_count_override = static_cast<int>(sms); }

}  // namespace
}  // namespace cuda_kernels
}  // namespace spinal_ops

TORCH_LIBRARY(spinal_emu, m) {
  m.def("forward(Tensor x, Tensor weight_in, Tensor weight_hidden, Tensor? bias, Tensor? weight_out, "
        "Tensor? bias_out, str activation, float negative_slope, str policy, int device, bool keep_pre_activation, "
        "Tensor? dropout_seed=None, float dropout_p=0.0) -> (Tensor, Tensor)",
        &spinal_ops::cuda_kernels::forward);
  m.def("backward(Tensor grad_out, Tensor x, Tensor pre_activation, Tensor weight_in, Tensor weight_hidden, "
        "Tensor? weight_out, bool has_bias, str activation, float negative_slope, str policy, int device, "
        "Tensor? dropout_seed=None, float dropout_p=0.0) -> Tensor[]",
        &spinal_ops::cuda_kernels::backward);
  m.def("tile_kernel_width_limit", &spinal_ops::cuda_kernels::width_limit);
  m.def("native_kernels_refusal", &spinal_ops::cuda_kernels::refusal);
  m.def("configure", &spinal_ops::cuda_kernels::configure);
  m.def("launches", &spinal_ops::cuda_kernels::launches);
  m.def("launched_kernels", &spinal_ops::cuda_kernels::launched_kernels);
  m.def("attribute_sets", &spinal_ops::cuda_kernels::attribute_sets);
  m.def("barrier_sites", &spinal_ops::cuda_kernels::barrier_sites);
  m.def("seeded_bug", &spinal_ops::cuda_kernels::seeded_bug);
  m.def("sync_kernel", &spinal_ops::cuda_kernels::sync_kernel);
  m.def("ctas_per_sm", &spinal_ops::cuda_kernels::ctas_per_sm);
  m.def("last_launch", &spinal_ops::cuda_kernels::last_launch);
  m.def("set_spin_budget", &spinal_ops::cuda_kernels::set_spin_budget);
  m.def("persistent_grid_wait", &spinal_ops::cuda_kernels::persistent_grid_wait);
  m.def("set_sm_count", &spinal_ops::cuda_kernels::set_sm_count);
}

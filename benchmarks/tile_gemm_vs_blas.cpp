// Times a sequence of float32 products on the chain's register-tiled kernel (csrc/cpu/tile_gemm.h)
// and on PyTorch's BLAS called as the chain's CPU engine calls it (csrc/cpu/blas.h,
// csrc/cpu/chain_engine.cpp), on the same buffers.
// Built by benchmarks/tile_gemm_vs_blas.py with torch.utils.cpp_extension.load.
#include <torch/extension.h>

#include <chrono>
#include <vector>

#include "cpu/blas.h"
#include "cpu/tile_gemm.h"

namespace {

// One product c[m, n] (+)= op(a) @ op(b): a stored [k, m] when a_transposed, b stored [n, k] when
// b_transposed, c overwritten or accumulated.
struct Product {
  bool a_transposed, b_transposed, accumulate;
  int64_t m, n, k;
  at::Tensor a, b, c;
};

class Sequence {
 public:
  // products: (a_transposed, b_transposed, accumulate, m, n, k) each.
  explicit Sequence(const std::vector<std::tuple<bool, bool, bool, int64_t, int64_t, int64_t>>& products) {
    for (const auto& [at_, bt, acc, m, n, k] : products) {
      products_.push_back({at_, bt, acc, m, n, k, at::randn({at_ ? k : m, at_ ? m : k}),
                           at::randn({bt ? n : k, bt ? k : n}), at::randn({m, n})});
    }
  }

  // Runs the sequence `repeats` times on the tile kernel or BLAS; returns seconds per sequence.
  double time(int64_t repeats, bool tiles) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t r = 0; r < repeats; ++r) {
      for (Product& p : products_) run(p, tiles, p.c);
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / repeats;
  }

  // The largest difference between the two kernels' results of one product (overwriting ones
  // compared on zeroed c, accumulating ones on equal c).
  double max_difference() {
    double worst = 0;
    for (Product& p : products_) {
      at::Tensor by_tiles = p.c.clone(), by_blas = p.c.clone();
      run(p, true, by_tiles);
      run(p, false, by_blas);
      worst = std::max(worst, (by_tiles - by_blas).abs().max().item<double>());
    }
    return worst;
  }

 private:
  static void run(const Product& p, bool tiles, at::Tensor& c) {
    const float* a = p.a.data_ptr<float>();
    const float* b = p.b.data_ptr<float>();
    const int64_t lda = p.a.size(1), ldb = p.b.size(1);
    if (tiles) {
      const spinal_ops::cpu::MatrixOperand a_operand{a, p.a_transposed ? 1 : lda, p.a_transposed ? lda : 1};
      const spinal_ops::cpu::MatrixOperand b_operand{b, p.b_transposed ? 1 : ldb, p.b_transposed ? ldb : 1};
      TORCH_CHECK(spinal_ops::cpu::tile_gemm(p.m, p.n, p.k, a_operand, b_operand, c.data_ptr<float>(), p.n,
                                             p.accumulate, nullptr),
                  "the tile kernel does not run here");
    } else {
      TORCH_CHECK(spinal_ops::cpu::direct_gemm<float>(p.a_transposed, p.b_transposed, p.m, p.n, p.k, 1.f, a, lda, b,
                                                      ldb, p.accumulate ? 1.f : 0.f, c.data_ptr<float>(), p.n),
                  "PyTorch's BLAS is not callable here");
    }
  }

  std::vector<Product> products_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Sequence>(m, "Sequence")
      .def(pybind11::init<const std::vector<std::tuple<bool, bool, bool, int64_t, int64_t, int64_t>>&>())
      .def("time", &Sequence::time)
      .def("max_difference", &Sequence::max_difference);
  m.def("op_runs_tiles", &spinal_ops::cpu::tile_gemm_fits, "Whether the op runs a product of these sizes on the tiles");
  m.def("instructions", [] {
    const char* name = spinal_ops::cpu::tile_gemm_instructions();
    return std::string(name ? name : "");
  });
}

// ctest: the CPU kernels of spinal_ops::native_forward / native_backward, called through the
// dispatcher, against a naive loop implementation of contract §1 written independently of them
// (its own column formula (l*s + j) mod N, its own activations and derivatives); and the CPU's
// vectorised dropout words (chain::fill_factors) against the scalar Philox of common/philox.h.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../../csrc/chain/dropout_factors.h"

namespace {

using OptTensor = std::optional<at::Tensor>;
using ForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const OptTensor&, const OptTensor&, const OptTensor&,
                                                      c10::string_view, double, bool, bool, const OptTensor&,
                                                      double);
using BackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
    std::array<bool, 6>, c10::string_view, double, bool, const OptTensor&, double);

struct Case {
  const char* name;
  int64_t batch, in_features, layer_width, num_layers, split_size, out_features;  // out_features 0: y = H
  bool bias;
  const char* activation;  // relu, leaky_relu or tanh
};

constexpr double kSlope = 0.1;

double phi(const std::string& act, double z) {
  if (act == "relu") return z > 0 ? z : 0.0;
  if (act == "leaky_relu") return z > 0 ? z : kSlope * z;
  return std::tanh(z);
}

double phi_grad(const std::string& act, double z) {
  if (act == "relu") return z > 0 ? 1.0 : 0.0;
  if (act == "leaky_relu") return z > 0 ? 1.0 : kSlope;
  return 1.0 - std::tanh(z) * std::tanh(z);
}

struct Tensors {
  at::Tensor x, weight_in, weight_hidden, grad_out;
  OptTensor bias, weight_out, bias_out;
};

// out, then the gradients in native_backward's order (absent ones are empty [0]), then Z.
std::vector<at::Tensor> naive(const Case& c, const Tensors& t) {
  const int64_t B = c.batch, N = c.in_features, w = c.layer_width, L = c.num_layers, s = c.split_size;
  const int64_t M = c.out_features, hidden = L * w;
  const std::string act = c.activation;
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = t.x.accessor<double, 2>();
  auto a = t.weight_in.accessor<double, 3>();
  auto r = t.weight_hidden.accessor<double, 3>();
  auto g = t.grad_out.accessor<double, 2>();
  auto column = [&](int64_t layer, int64_t j) { return (layer * s + j) % N; };

  at::Tensor z_t = at::zeros({B, hidden}, opts), h_t = at::zeros({B, hidden}, opts);
  auto z = z_t.accessor<double, 2>();
  auto h = h_t.accessor<double, 2>();
  for (int64_t row = 0; row < B; ++row)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t u = 0; u < w; ++u) {
        double acc = c.bias ? t.bias->accessor<double, 2>()[l][u] : 0.0;
        for (int64_t j = 0; j < s; ++j) acc += a[l][u][j] * x[row][column(l, j)];
        if (l > 0)
          for (int64_t v = 0; v < w; ++v) acc += r[l - 1][u][v] * h[row][(l - 1) * w + v];
        z[row][l * w + u] = acc;
        h[row][l * w + u] = phi(act, acc);
      }

  at::Tensor out_t = h_t.clone(), grad_h_t = t.grad_out.clone();
  at::Tensor grad_w_out_t = at::zeros({0}, opts), grad_b_out_t = at::zeros({0}, opts);
  if (M > 0) {
    auto wo = t.weight_out->accessor<double, 2>();
    out_t = at::zeros({B, M}, opts);
    grad_h_t = at::zeros({B, hidden}, opts);
    grad_w_out_t = at::zeros({M, hidden}, opts);
    auto out = out_t.accessor<double, 2>();
    auto grad_h = grad_h_t.accessor<double, 2>();
    auto grad_w_out = grad_w_out_t.accessor<double, 2>();
    for (int64_t row = 0; row < B; ++row)
      for (int64_t m = 0; m < M; ++m) {
        out[row][m] = c.bias ? t.bias_out->accessor<double, 1>()[m] : 0.0;
        for (int64_t k = 0; k < hidden; ++k) {
          out[row][m] += wo[m][k] * h[row][k];
          grad_h[row][k] += g[row][m] * wo[m][k];
          grad_w_out[m][k] += g[row][m] * h[row][k];
        }
      }
    if (c.bias) grad_b_out_t = t.grad_out.sum(0);
  }

  at::Tensor grad_z_t = at::zeros({B, hidden}, opts), grad_x_t = at::zeros({B, N}, opts);
  at::Tensor grad_a_t = at::zeros_like(t.weight_in), grad_r_t = at::zeros_like(t.weight_hidden);
  auto grad_h = grad_h_t.accessor<double, 2>();
  auto grad_z = grad_z_t.accessor<double, 2>();
  auto grad_x = grad_x_t.accessor<double, 2>();
  auto grad_a = grad_a_t.accessor<double, 3>();
  auto grad_r = grad_r_t.accessor<double, 3>();
  for (int64_t l = L - 1; l >= 0; --l)
    for (int64_t row = 0; row < B; ++row)
      for (int64_t u = 0; u < w; ++u) {
        double dh = grad_h[row][l * w + u];
        if (l + 1 < L)
          for (int64_t v = 0; v < w; ++v) dh += grad_z[row][(l + 1) * w + v] * r[l][v][u];
        const double dz = dh * phi_grad(act, z[row][l * w + u]);
        grad_z[row][l * w + u] = dz;
        for (int64_t j = 0; j < s; ++j) {
          grad_a[l][u][j] += dz * x[row][column(l, j)];
          grad_x[row][column(l, j)] += dz * a[l][u][j];
        }
        if (l > 0)
          for (int64_t v = 0; v < w; ++v) grad_r[l - 1][u][v] += dz * h[row][(l - 1) * w + v];
      }
  at::Tensor grad_bias_t = c.bias ? grad_z_t.sum(0).view({L, w}) : at::zeros({0}, opts);
  return {out_t, grad_x_t, grad_a_t, grad_r_t, grad_bias_t, grad_w_out_t, grad_b_out_t, z_t};
}

// Whether `kept` [B, L*w] holds every layer's z_l (naive Z, layer order) in one of its w-column
// slots: the slots' order belongs to the op pair (the chain's window groups), and these narrow
// cases keep Z, not H.
bool holds_every_layer(const at::Tensor& kept, const at::Tensor& z, const Case& c, double rtol, double atol) {
  const int64_t w = c.layer_width, L = c.num_layers;
  for (int64_t layer = 0; layer < L; ++layer) {
    bool found = false;
    for (int64_t slot = 0; slot < L && !found; ++slot) {
      found = at::allclose(kept.narrow(1, slot * w, w).to(at::kDouble), z.narrow(1, layer * w, w), rtol, atol);
    }
    if (!found) return false;
  }
  return true;
}

Tensors random_tensors(const Case& c) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const int64_t L = c.num_layers, w = c.layer_width, M = c.out_features;
  Tensors t;
  t.x = at::randn({c.batch, c.in_features}, opts);
  t.weight_in = at::randn({L, w, c.split_size}, opts) * 0.5;
  t.weight_hidden = at::randn({L - 1, w, w}, opts) * 0.5;
  t.grad_out = at::randn({c.batch, M > 0 ? M : L * w}, opts);
  if (c.bias) t.bias = at::randn({L, w}, opts);
  if (M > 0) t.weight_out = at::randn({M, L * w}, opts) * 0.5;
  if (M > 0 && c.bias) t.bias_out = at::randn({M}, opts);
  return t;
}

OptTensor cast(const OptTensor& t, at::ScalarType dtype) {
  return t ? OptTensor(t->to(dtype)) : std::nullopt;
}

// Runs both ops in `dtype` and compares every result with the naive float64 loops.
bool check(const Case& c, at::ScalarType dtype, double rtol, double atol) {
  static const auto forward = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("spinal_ops::native_forward", "")
                                  .typed<ForwardFn>();
  static const auto backward = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("spinal_ops::native_backward", "")
                                   .typed<BackwardFn>();
  const Tensors t = random_tensors(c);
  const std::vector<at::Tensor> expected = naive(c, t);

  const at::Tensor x = t.x.to(dtype), weight_in = t.weight_in.to(dtype), weight_hidden = t.weight_hidden.to(dtype);
  const OptTensor weight_out = cast(t.weight_out, dtype);
  auto [out, pre_activation] = forward.call(x, weight_in, weight_hidden, cast(t.bias, dtype), weight_out,
                                            cast(t.bias_out, dtype), c.activation, kSlope, /*allow_tf32=*/false,
                                            /*keep_pre_activation=*/true, /*dropout_seed=*/std::nullopt,
                                            /*dropout_p=*/0.0);
  // Every gradient that exists: x, weight_in, weight_hidden, bias, weight_out, bias_out.
  const std::array<bool, 6> mask = {true, true, true, c.bias, weight_out.has_value(), c.bias && weight_out};
  auto [gx, ga, gr, gb, gwo, gbo] = backward.call(t.grad_out.to(dtype), x, pre_activation, weight_in, weight_hidden,
                                                   weight_out, mask, c.activation, kSlope, /*allow_tf32=*/false,
                                                   /*dropout_seed=*/std::nullopt, /*dropout_p=*/0.0);
  const std::vector<at::Tensor> got = {out, gx, ga, gr, gb, gwo, gbo};
  const char* names[] = {"out", "grad_x", "grad_weight_in", "grad_weight_hidden",
                         "grad_bias", "grad_weight_out", "grad_bias_out"};
  // The kept tensor's column order belongs to the op pair: it is checked slot by slot, and through
  // the gradients the backward computes from it.
  bool ok = pre_activation.sizes() == at::IntArrayRef({c.batch, c.num_layers * c.layer_width}) &&
            holds_every_layer(pre_activation, expected.back(), c, rtol, atol);
  if (!ok) std::printf("FAIL %s: the kept tensor does not hold every layer's z_l\n", c.name);
  for (size_t i = 0; i < got.size(); ++i) {
    const bool same_shape = got[i].sizes() == expected[i].sizes();
    const bool close = same_shape && got[i].scalar_type() == dtype &&
                       at::allclose(got[i].to(at::kDouble), expected[i], rtol, atol);
    if (!close) {
      std::printf("FAIL %s (%s): %s differs from the naive loops (shape %s vs %s)\n", c.name,
                  c10::toString(dtype), names[i], c10::str(got[i].sizes()).c_str(),
                  c10::str(expected[i].sizes()).c_str());
      ok = false;
    }
  }
  std::printf("%s %s (%s)\n", ok ? "ok  " : "FAIL", c.name, c10::toString(dtype));
  return ok;
}

// chain::fill_factors (Philox on 8 or 16 counters per vector where the CPU has AVX2 or AVX-512)
// gives Dropout::factor's scalar result for every site of runs of 1..70 sites, at rows whose
// counters cross 2^32 (the counter's high word) and far beyond, in float and double.
bool check_dropout_factors() {
  const spinal_ops::Dropout dropout = spinal_ops::Dropout::make(0x0123456789ABCDEFull, 0.37, 5, 3, 4, true);
  const int64_t sites = dropout.sites_per_row();
  const int64_t rows[] = {0, 1, (int64_t{1} << 32) / sites, (int64_t{1} << 32) / sites + 1, int64_t{1} << 40};
  std::vector<float> factors(80);
  std::vector<double> exact(80);
  for (int64_t row : rows) {
    for (int64_t first_site : {0, 3, 17}) {
      for (int64_t count = 1; count <= 70; ++count) {
        spinal_ops::chain::fill_factors(dropout, row, first_site, count, factors.data());
        spinal_ops::chain::fill_factors(dropout, row, first_site, count, exact.data());
        for (int64_t j = 0; j < count; ++j) {
          const float expected = dropout.factor(row, first_site + j);
          if (factors[j] != expected || (exact[j] != 0.0) != (expected != 0.0f) ||
              (exact[j] != 0.0 && exact[j] != 1.0 / (1.0 - 0.37))) {
            std::printf("FAIL dropout factors: row %lld, site %lld: %g / %g, expected %g\n",
                        static_cast<long long>(row), static_cast<long long>(first_site + j), factors[j], exact[j],
                        expected);
            return false;
          }
        }
      }
    }
  }
  std::printf("ok   dropout factors\n");
  return true;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const Case cases[] = {
      // N = 7, s = 4: layer 1 reads columns 4, 5, 6, 0 (wrapped window, two GEMMs).
      {"wrapped_window_tanh", 5, 7, 4, 3, 4, 3, true, "tanh"},
      // N = 8, s = 3: layer 2 reads 6, 7, 0; no output projection, no bias.
      {"wrapped_no_projection_relu", 4, 8, 3, 4, 3, 0, false, "relu"},
      {"one_layer_leaky_relu", 3, 5, 2, 1, 5, 2, true, "leaky_relu"},
      {"width_one_relu", 6, 9, 1, 5, 3, 2, true, "relu"},
      {"empty_batch", 0, 7, 4, 3, 4, 3, true, "tanh"},
  };
  bool ok = check_dropout_factors();
  try {
    for (const Case& c : cases) {
      ok = check(c, at::kDouble, 1e-10, 1e-12) && ok;
      ok = check(c, at::kFloat, 1e-4, 1e-5) && ok;
    }
  } catch (const std::exception& error) {
    std::printf("FAIL: %s\n", error.what());
    return 1;
  }
  return ok ? 0 : 1;
}

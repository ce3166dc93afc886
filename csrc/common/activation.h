// Activations of contract §1 and their derivatives, shared by the CPU and CUDA kernels.
// Computed in float (or double) whatever the storage dtype: half types are upcast first.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <string_view>
#include <type_traits>

#include "host_device.h"


namespace spinal_ops {

// Host code picks the float/double overloads from <cmath>; device code gets CUDA's.
using std::erf;
using std::exp;
using std::tanh;

enum class Activation : int { ReLU, LeakyReLU, GELU, GELUTanh, SiLU, Tanh, Sigmoid, Identity };

inline Activation parse_activation(std::string_view name) {
  if (name == "relu") return Activation::ReLU;
  if (name == "leaky_relu") return Activation::LeakyReLU;
  if (name == "gelu") return Activation::GELU;
  if (name == "gelu_tanh") return Activation::GELUTanh;
  if (name == "silu") return Activation::SiLU;
  if (name == "tanh") return Activation::Tanh;
  if (name == "sigmoid") return Activation::Sigmoid;
  if (name == "identity") return Activation::Identity;
  TORCH_CHECK(false, "spinal_ops: unknown activation '", std::string(name),
              "'; expected relu, leaky_relu, gelu, gelu_tanh, silu, tanh, sigmoid or identity");
}

// phi(z)
template <typename T>
SPINAL_HOST_DEVICE T activate(Activation act, T z, T negative_slope) {
  switch (act) {
    case Activation::ReLU:
      return z > T(0) ? z : (z == z ? T(0) : z);  // keep NaN as torch.relu does
    case Activation::LeakyReLU:
      return z > T(0) ? z : z * negative_slope;
    case Activation::GELU:
      return T(0.5) * z * (T(1) + erf(z * T(0.70710678118654752440)));
    case Activation::GELUTanh: {
      const T inner = T(0.79788456080286535588) * (z + T(0.044715) * z * z * z);
      return T(0.5) * z * (T(1) + tanh(inner));
    }
    case Activation::SiLU:
      return z / (T(1) + exp(-z));
    case Activation::Tanh:
      return tanh(z);
    case Activation::Sigmoid:
      return T(1) / (T(1) + exp(-z));
    case Activation::Identity:
    default:
      return z;
  }
}

// phi'(z), matching the gradients PyTorch's autograd gives for the same functions.
template <typename T>
SPINAL_HOST_DEVICE T activate_grad(Activation act, T z, T negative_slope) {
  switch (act) {
    case Activation::ReLU:
      return z <= T(0) ? T(0) : T(1);  // NaN passes the gradient, as torch.relu's backward does
    case Activation::LeakyReLU:
      return z > T(0) ? T(1) : negative_slope;
    case Activation::GELU: {
      const T cdf = T(0.5) * (T(1) + erf(z * T(0.70710678118654752440)));
      const T pdf = exp(T(-0.5) * z * z) * T(0.39894228040143267794);
      return cdf + z * pdf;
    }
    case Activation::GELUTanh: {
      const T k = T(0.79788456080286535588);
      const T inner = k * (z + T(0.044715) * z * z * z);
      const T t = tanh(inner);
      const T dinner = k * (T(1) + T(3) * T(0.044715) * z * z);
      return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * dinner;
    }
    case Activation::SiLU: {
      const T sig = T(1) / (T(1) + exp(-z));
      return sig * (T(1) + z * (T(1) - sig));
    }
    case Activation::Tanh: {
      const T t = tanh(z);
      return T(1) - t * t;
    }
    case Activation::Sigmoid: {
      const T sig = T(1) / (T(1) + exp(-z));
      return sig * (T(1) - sig);
    }
    case Activation::Identity:
    default:
      return T(1);
  }
}

// Calls f with the activation as a compile-time constant, so that phi inlines into the loops.
template <typename F>
void with_activation(Activation act, F&& f) {
  using A = Activation;
  switch (act) {
    case A::ReLU: return f(std::integral_constant<A, A::ReLU>{});
    case A::LeakyReLU: return f(std::integral_constant<A, A::LeakyReLU>{});
    case A::GELU: return f(std::integral_constant<A, A::GELU>{});
    case A::GELUTanh: return f(std::integral_constant<A, A::GELUTanh>{});
    case A::SiLU: return f(std::integral_constant<A, A::SiLU>{});
    case A::Tanh: return f(std::integral_constant<A, A::Tanh>{});
    case A::Sigmoid: return f(std::integral_constant<A, A::Sigmoid>{});
    case A::Identity: return f(std::integral_constant<A, A::Identity>{});
  }
}

}  // namespace spinal_ops

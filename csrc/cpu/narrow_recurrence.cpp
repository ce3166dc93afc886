// Narrow-layer recurrence loops of the CPU chain (scheme in narrow_recurrence.h).
#include "narrow_recurrence.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../chain/dropout_factors.h"
#include "../common/message_text.h"

namespace spinal_ops::cpu {
namespace {

template <typename T, Activation kAct>
void forward_rows(const at::Tensor& products, const std::vector<int64_t>& slot_offsets, const at::Tensor& weight_hidden,
                  T negative_slope, const at::Tensor& pre_activation, const at::Tensor& hidden,
                  const std::vector<int64_t>& hidden_offsets, const Dropout& dropout, int64_t first_row) {
  const int64_t rows = products.size(0), num_layers = static_cast<int64_t>(slot_offsets.size());
  const int64_t w = weight_hidden.size(-1);
  // R_l^T, so that z[0:w] += h[k] * R^T[k, 0:w] runs along contiguous memory (vectorised).
  const at::Tensor recurrent_t = weight_hidden.transpose(1, 2).contiguous();
  const T* recurrent = recurrent_t.const_data_ptr<T>();
  const T* product_data = products.const_data_ptr<T>();
  T* hidden_data = hidden.mutable_data_ptr<T>();
  T* z_data = pre_activation.defined() ? pre_activation.mutable_data_ptr<T>() : nullptr;
  const int64_t product_stride = products.stride(0), hidden_stride = hidden.stride(0);
  const int64_t z_stride = z_data ? pre_activation.stride(0) : 0;

  const bool drops = dropout.active;
  at::parallel_for(0, rows, kNarrowRowGrain, [&](int64_t begin, int64_t end) {
    T previous[kNarrowRecurrenceMaxWidth];
    T z[kNarrowRecurrenceMaxWidth];
    T factors[kNarrowRecurrenceMaxWidth];  // of h_{l-1} as layer l's input (dropout)
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t layer = 0; layer < num_layers; ++layer) {
        const T* p = product_data + row * product_stride + slot_offsets[layer];
        for (int64_t j = 0; j < w; ++j) z[j] = p[j];
        if (layer > 0 && drops) {
          chain::fill_factors(dropout, first_row + row, dropout.hidden_site(layer), w, factors);
          for (int64_t k = 0; k < w; ++k) previous[k] *= factors[k];
        }
        if (layer > 0) {
          const T* r = recurrent + (layer - 1) * w * w;
          for (int64_t k = 0; k < w; ++k) {
            const T h = previous[k];
            for (int64_t j = 0; j < w; ++j) z[j] += h * r[k * w + j];
          }
        }
        if (z_data) {
          T* z_row = z_data + row * z_stride + slot_offsets[layer];
          for (int64_t j = 0; j < w; ++j) z_row[j] = z[j];
        }
        T* h = hidden_data + row * hidden_stride + hidden_offsets[layer];
        for (int64_t j = 0; j < w; ++j) previous[j] = h[j] = activate(kAct, z[j], negative_slope);
      }
    }
  });
}

template <typename T, Activation kAct>
void backward_rows(const at::Tensor& grad_z, const std::vector<int64_t>& slot_offsets,
                   const at::Tensor& pre_activation, const at::Tensor& weight_hidden, T negative_slope,
                   const at::Tensor& grad_weight_hidden, const Dropout& dropout, int64_t first_row) {
  const int64_t rows = grad_z.size(0), num_layers = static_cast<int64_t>(slot_offsets.size());
  const int64_t w = weight_hidden.size(-1);
  const T* recurrent = weight_hidden.const_data_ptr<T>();
  const T* z_data = pre_activation.const_data_ptr<T>();
  T* grad_data = grad_z.mutable_data_ptr<T>();
  const int64_t grad_stride = grad_z.stride(0), z_stride = pre_activation.stride(0);
  const bool want_dr = grad_weight_hidden.defined() && num_layers > 1;
  const int64_t dr_size = (num_layers - 1) * w * w;
  const int64_t chunk_rows = backward_chunk_rows(rows), chunks = (rows + chunk_rows - 1) / chunk_rows;
  std::vector<T> partials(want_dr ? chunks * dr_size : 0, T(0));

  const bool drops = dropout.active;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    T next[kNarrowRecurrenceMaxWidth];    // dz_{l+1}
    T h_prev[kNarrowRecurrenceMaxWidth];  // h_{l-1} = phi(z_{l-1}), for dR_{l-1} += dz_l^T h_{l-1}
    // Dropout: the factors of h_{l-1} as layer l's input (this layer's), and of h_l as layer
    // l+1's (the layer above's, computed on its iteration); dz_{l+1} @ R_{l+1} before they scale it.
    T factors[kNarrowRecurrenceMaxWidth], factors_above[kNarrowRecurrenceMaxWidth];
    T product[kNarrowRecurrenceMaxWidth];
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      T* dr = want_dr ? partials.data() + chunk * dr_size : nullptr;
      for (int64_t row = chunk * chunk_rows; row < std::min(rows, (chunk + 1) * chunk_rows); ++row) {
        for (int64_t layer = num_layers - 1; layer >= 0; --layer) {
          T* dz = grad_data + row * grad_stride + slot_offsets[layer];
          const T* z = z_data + row * z_stride + slot_offsets[layer];
          if (layer < num_layers - 1 && drops) {
            const T* r = recurrent + layer * w * w;  // dz_l += m_{l+1} * (dz_{l+1} @ R_{l+1})
            for (int64_t j = 0; j < w; ++j) product[j] = T(0);
            for (int64_t k = 0; k < w; ++k) {
              const T g = next[k];
              for (int64_t j = 0; j < w; ++j) product[j] += g * r[k * w + j];
            }
            for (int64_t j = 0; j < w; ++j) dz[j] += product[j] * factors_above[j];
          } else if (layer < num_layers - 1) {
            const T* r = recurrent + layer * w * w;  // R_{l+1} = weight_hidden[l]: dz_l += dz_{l+1} @ R_{l+1}
            for (int64_t k = 0; k < w; ++k) {
              const T g = next[k];
              for (int64_t j = 0; j < w; ++j) dz[j] += g * r[k * w + j];
            }
          }
          for (int64_t j = 0; j < w; ++j) next[j] = dz[j] *= activate_grad(kAct, z[j], negative_slope);
          if (drops && layer > 0) {
            chain::fill_factors(dropout, first_row + row, dropout.hidden_site(layer), w, factors);
          }
          if (dr && layer > 0) {
            const T* z_prev = z_data + row * z_stride + slot_offsets[layer - 1];
            for (int64_t k = 0; k < w; ++k) h_prev[k] = activate(kAct, z_prev[k], negative_slope);
            if (drops) {
              for (int64_t k = 0; k < w; ++k) h_prev[k] *= factors[k];
            }
            T* d = dr + (layer - 1) * w * w;
            for (int64_t j = 0; j < w; ++j) {
              const T g = next[j];
              for (int64_t k = 0; k < w; ++k) d[j * w + k] += g * h_prev[k];
            }
          }
          if (drops && layer > 0) std::copy(factors, factors + w, factors_above);
        }
      }
    }
  });
  if (want_dr) {
    T* out = grad_weight_hidden.mutable_data_ptr<T>();
    std::fill(out, out + dr_size, T(0));  // no chunks at all for an empty batch
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const T* part = partials.data() + chunk * dr_size;
      for (int64_t i = 0; i < dr_size; ++i) out[i] += part[i];
    }
  }
}

void check_narrow(const at::Tensor& weight_hidden, const std::vector<int64_t>& slot_offsets) {
  TORCH_CHECK(weight_hidden.size(-1) <= kNarrowRecurrenceMaxWidth, "spinal_ops: narrow recurrence needs w <= ",
              text(kNarrowRecurrenceMaxWidth));
  TORCH_CHECK(weight_hidden.is_contiguous() && weight_hidden.size(0) + 1 == static_cast<int64_t>(slot_offsets.size()),
              "spinal_ops: narrow recurrence needs contiguous [L-1, w, w] weights");
}

}  // namespace

void narrow_forward_recurrence(const at::Tensor& products, const std::vector<int64_t>& slot_offsets,
                               const at::Tensor& weight_hidden, Activation act, double negative_slope,
                               const at::Tensor& pre_activation, const at::Tensor& hidden,
                               const std::vector<int64_t>& hidden_offsets, const Dropout& dropout,
                               int64_t first_row) {
  check_narrow(weight_hidden, slot_offsets);
  AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "narrow_forward_recurrence", [&] {
    with_activation(act, [&](auto kAct) {
      forward_rows<scalar_t, decltype(kAct)::value>(products, slot_offsets, weight_hidden,
                                                    static_cast<scalar_t>(negative_slope), pre_activation, hidden,
                                                    hidden_offsets, dropout, first_row);
    });
  });
}

void narrow_backward_recurrence(const at::Tensor& grad_z, const std::vector<int64_t>& slot_offsets,
                                const at::Tensor& pre_activation, const at::Tensor& weight_hidden, Activation act,
                                double negative_slope, const at::Tensor& grad_weight_hidden, const Dropout& dropout,
                                int64_t first_row) {
  check_narrow(weight_hidden, slot_offsets);
  TORCH_CHECK(!grad_weight_hidden.defined() ||
                  (grad_weight_hidden.is_contiguous() && grad_weight_hidden.sizes() == weight_hidden.sizes()),
              "spinal_ops: narrow recurrence needs a contiguous grad_weight_hidden shaped like weight_hidden");
  AT_DISPATCH_FLOATING_TYPES(grad_z.scalar_type(), "narrow_backward_recurrence", [&] {
    with_activation(act, [&](auto kAct) {
      backward_rows<scalar_t, decltype(kAct)::value>(grad_z, slot_offsets, pre_activation, weight_hidden,
                                                     static_cast<scalar_t>(negative_slope), grad_weight_hidden, dropout,
                                                     first_row);
    });
  });
}

}  // namespace spinal_ops::cpu

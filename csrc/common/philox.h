// Dropout masks from Philox4x32-10 (contract §1, "Masks"; spinal_ops/dropout.py is the same
// generator in tensor ops, and the Triton kernels use tl.philox). A mask element is a pure function
// of (seed, counter), so a kernel computes it where it needs it, forward and backward alike, and
// no mask is stored.
//
// key = (seed mod 2^32, seed div 2^32); counter = (c mod 2^32, c div 2^32, 0, 0); the element is
// kept iff the first output word is >= floor(p * 2^32), and then scaled by 1 / (1 - p).
// Sites of one row (D of them), in this order: layer 0's s window columns; for l >= 1 layer l's s
// window columns then the w columns of h_{l-1}; then, with an output projection, the L*w columns
// of H. Site j of row b has counter b * D + j.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace spinal_ops {

// First output word of Philox4x32-10 for the 64-bit key `seed` and the counter (c, 0) (c 64-bit).
SPINAL_HOST_DEVICE uint32_t philox_first_word(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t product_a = uint64_t{0xD2511F53u} * c0;
    const uint64_t product_b = uint64_t{0xCD9E8D57u} * c2;
    const uint32_t high_a = static_cast<uint32_t>(product_a >> 32), low_a = static_cast<uint32_t>(product_a);
    const uint32_t high_b = static_cast<uint32_t>(product_b >> 32), low_b = static_cast<uint32_t>(product_b);
    c0 = high_b ^ c1 ^ k0;
    c1 = low_b;
    c2 = high_a ^ c3 ^ k1;
    c3 = low_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// One training call's dropout: the seed, the keep rule and the site layout of a row.
struct Dropout {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // floor(p * 2^32): a word below it drops the element
  float scale = 1.0f;      // 1 / (1 - p), the factor of a kept element
  double exact_scale = 1.0;  // the same in double: float64 tensors' factor (float's would cost them 1e-8)
  bool active = false;     // p > 0 and a seed given; otherwise every factor is 1
  int64_t split_size = 0;  // s
  int64_t layer_width = 0; // w
  int64_t num_layers = 0;  // L
  bool has_projection = false;

  static Dropout make(uint64_t seed, double p, int64_t split_size, int64_t layer_width, int64_t num_layers,
                      bool has_projection) {
    Dropout d;
    d.seed = seed;
    d.active = p > 0.0;
    d.threshold = static_cast<uint32_t>(p * 4294967296.0);
    d.exact_scale = 1.0 / (1.0 - p);
    d.scale = static_cast<float>(d.exact_scale);
    d.split_size = split_size;
    d.layer_width = layer_width;
    d.num_layers = num_layers;
    d.has_projection = has_projection;
    return d;
  }

  // First site of layer l's window (its s columns), of h_{l-1} as layer l's input (l >= 1), and of
  // H as the projection's input.
  SPINAL_HOST_DEVICE int64_t window_site(int64_t layer) const {
    return layer * split_size + (layer > 0 ? (layer - 1) * layer_width : 0);
  }
  SPINAL_HOST_DEVICE int64_t hidden_site(int64_t layer) const { return window_site(layer) + split_size; }
  SPINAL_HOST_DEVICE int64_t projection_site() const { return window_site(num_layers); }
  SPINAL_HOST_DEVICE int64_t sites_per_row() const {
    return projection_site() + (has_projection ? num_layers * layer_width : 0);
  }
  SPINAL_HOST_DEVICE uint64_t counter(int64_t row, int64_t site) const {
    return static_cast<uint64_t>(row) * static_cast<uint64_t>(sites_per_row()) + static_cast<uint64_t>(site);
  }
  // Whether site `site` of row `row` is kept (always, when inactive).
  SPINAL_HOST_DEVICE bool keeps(int64_t row, int64_t site) const {
    return !active || philox_first_word(seed, counter(row, site)) >= threshold;
  }
  // The factor of site `site` of row `row`: 0 (dropped) or `scale` (kept); 1 when inactive.
  SPINAL_HOST_DEVICE float factor(int64_t row, int64_t site) const {
    if (!active) return 1.0f;
    return keeps(row, site) ? scale : 0.0f;
  }
};

}  // namespace spinal_ops

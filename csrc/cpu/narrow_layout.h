// Column layout shared by the narrow-chain kernels (narrow_chain.h): layers grouped by the
// input window they read, each group's columns side by side and rounded up to a whole vector.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "../common/spinal_shape.h"
#include "avx2_tiles.h"

namespace spinal_ops::cpu {

// Layers first, first+period, ... read the window starting at column (first*s) mod N (period =
// N / gcd(N, s), as in csrc/chain/hoisted_chain.cpp): their input products are one panel product.
struct WindowGroup {
  int64_t first_layer;
  int64_t num_layers;
  int64_t columns;      // num_layers * w rounded up to a multiple of kLanes
  int64_t tile_column;  // first column of the group in a group-major row of all the groups' columns
  int64_t start;        // first input column of the window
  int64_t head;         // window columns before it wraps past N-1
};

struct NarrowLayout {
  int64_t period = 0;
  std::vector<WindowGroup> groups;
  std::vector<int64_t> layer_column;  // column of layer l in a group-major row
  int64_t columns = 0;                // width of a group-major row (sum of the groups' columns)

  explicit NarrowLayout(const SpinalShape& shape) {
    const int64_t n = shape.in_features, w = shape.layer_width, num_layers = shape.num_layers;
    period = n / std::gcd(n, shape.split_size);
    layer_column.resize(num_layers);
    for (int64_t g = 0; g < std::min(period, num_layers); ++g) {
      WindowGroup group{g, (num_layers - g + period - 1) / period, 0, columns, shape.window_start(g),
                        shape.window_head(g)};
      group.columns = round_up(group.num_layers * w, kLanes);
      for (int64_t j = 0; j < group.num_layers; ++j) layer_column[g + j * period] = columns + j * w;
      columns += group.columns;
      groups.push_back(group);
    }
  }
  int64_t layer(const WindowGroup& group, int64_t j) const { return group.first_layer + j * period; }
};

}  // namespace spinal_ops::cpu

// Numbers and shapes for error messages, as strings made with std::to_string.
//
// TORCH_CHECK streams its message arguments into a std::ostringstream. In this library built on
// an H100 machine (Ubuntu's g++ 13, torch 2.11), every check whose message streamed an integer
// crashed the process instead of raising (SIGSEGV in ostream::_M_insert<long>, which the debugger
// placed inside the extension); checks that streamed only strings raised as they should. So every
// number in a message of ours goes through text().
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace spinal_ops {

inline std::string text(int64_t value) { return std::to_string(value); }

// "[2, 5, 5]"
inline std::string text(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

}  // namespace spinal_ops

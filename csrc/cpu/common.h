// Helpers shared by the C++ CPU kernel files (csrc/cpu/<family>.cpp): how much work one
// at::parallel_for task gets.
#pragma once

#include "../tensor_utils.h"

#include <algorithm>

namespace rlhf_kernels {
namespace cpu {

// Elements per task of an elementwise loop.
constexpr int64_t kElemGrain = 32768;

// Rows per task of a loop over the rows of a [B, T] tensor (about 4096 elements a task).
inline int64_t row_grain(int64_t T) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)); }

}  // namespace cpu
}  // namespace rlhf_kernels

// Helpers shared by the C++ CPU kernel files (csrc/cpu/<family>.cpp): argument checks that name the
// argument (direct torch.ops.rlhf_kernels.* calls skip the Python API's checks), how work is split
// over threads, and large outputs allocated so that their first touch is cheap.
#pragma once

#include "../tensor_utils.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rlhf_kernels {
namespace cpu {

// Elements per task of an elementwise loop.
constexpr int64_t kElemGrain = 32768;

// Rows per task of a loop over the rows of a [B, T] tensor (about 4096 elements a task).
inline int64_t row_grain(int64_t T) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)); }

// ------------------------------------------------------------------------------------------------
// Argument checks.  Every message starts with rlhf_kernels::<op> and names the argument.

inline bool is_float_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble;
}

// A floating CPU tensor (fp32, bf16, fp16 or fp64).
inline void check_float_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "rlhf_kernels::", op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "rlhf_kernels::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), "rlhf_kernels::", op, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

// check_float_cpu, and the same shape as `like` (named like_name).
inline void check_float_like(const Tensor& t, const Tensor& like, const char* op, const char* name,
                             const char* like_name) {
  check_float_cpu(t, op, name);
  TORCH_CHECK(t.sizes() == like.sizes(), "rlhf_kernels::", op, ": ", name, " has shape ", t.sizes(), " but ",
              like_name, " has shape ", like.sizes());
}

// A mask on the CPU with the shape of `like`: bool, or any numeric dtype (nonzero = valid).
inline void check_mask(const Tensor& m, const Tensor& like, const char* op, const char* like_name) {
  TORCH_CHECK(m.defined() && m.device().is_cpu(), "rlhf_kernels::", op, ": mask must be a CPU tensor");
  TORCH_CHECK(!at::isComplexType(m.scalar_type()), "rlhf_kernels::", op, ": mask must be bool or real, got ",
              m.scalar_type());
  TORCH_CHECK(m.sizes() == like.sizes(), "rlhf_kernels::", op, ": mask has shape ", m.sizes(), " but ", like_name,
              " has shape ", like.sizes());
}

// A contiguous tensor to read: t itself when it already is (no copy).
inline Tensor contig(const Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// The mask as contiguous bytes (1 = valid): the mask itself when it is a contiguous bool tensor.
inline Tensor mask_bytes(const Tensor& m) {
  return m.scalar_type() == at::kBool ? contig(m) : m.ne(0).contiguous();
}

// ------------------------------------------------------------------------------------------------
// Threads.

// Runs fn(begin, end) over [0, n) in blocks of `block`, handed out to the intra-op threads from a
// shared counter (dynamic scheduling).  at::parallel_for splits a range statically, one equal part
// per thread, so a thread that is preempted (a loaded machine) or slower holds everyone up; here the
// other threads take its remaining blocks.
template <typename F>
void parallel_blocks(int64_t n, int64_t block, const F& fn) {
  if (n <= 0) return;
  block = std::max<int64_t>(block, 1);
  const int64_t n_blocks = (n + block - 1) / block;
  const int64_t workers = std::min<int64_t>(n_blocks, at::get_num_threads());
  if (workers <= 1 || at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(1, std::memory_order_relaxed); b < n_blocks;
         b = next.fetch_add(1, std::memory_order_relaxed))
      fn(b * block, std::min(n, (b + 1) * block));
  });
}

// ------------------------------------------------------------------------------------------------
// Memory.

// at::empty for a large output that the kernel then writes in full: on Linux, the 2 MiB-aligned
// interior of the buffer is advised MADV_HUGEPAGE, so that the first touch of each 2 MiB takes one
// page fault instead of 512.  Fresh pages are what makes a large output slow (each 4 KiB fault
// zeroes a page and, under virtualisation, exits to the host), and page faults of one process
// scale badly across threads.  A hint only: where transparent huge pages are off it does nothing.
inline Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  Tensor t = at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = t.nbytes();
  if (bytes >= 4 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + bytes) & ~(kHuge - 1);
    if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace cpu
}  // namespace rlhf_kernels

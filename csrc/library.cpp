// The rlhf_kernels operator library itself: what the binary was built for, and the names of the
// enums the kernels take as integers.  Each op family declares its own schemas in a
// TORCH_LIBRARY_FRAGMENT beside its CPU kernels (csrc/cpu/<family>.cpp) and registers its CPU and
// CUDA implementations there and in csrc/cuda/<family>_glue.cpp; fake (meta) implementations and
// autograd are registered from Python (rlhf_kernels/_extension_ops/<family>.py) with torch.library.
#include "cpu/vec.h"
#include "rlhf_kernels/math.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

#if defined(RLHF_KERNELS_WITH_CUDA)
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

namespace rlhf_kernels {
namespace {

// What this binary was built for; the loader compares it with the running torch.
std::string build_info() {
  std::ostringstream s;
#if defined(RLHF_KERNELS_TORCH_MAJOR)
  s << "torch=" << RLHF_KERNELS_TORCH_MAJOR << "." << RLHF_KERNELS_TORCH_MINOR << "." << RLHF_KERNELS_TORCH_PATCH;
#else
  s << "torch=unknown";
#endif
#if defined(RLHF_KERNELS_WITH_CUDA)
  s << ";cuda=" << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10;
#else
  s << ";cuda=none";
#endif
#if defined(__clang__)
  s << ";compiler=clang " << __clang_major__ << "." << __clang_minor__;
#elif defined(__GNUC__)
  s << ";compiler=gcc " << __GNUC__ << "." << __GNUC_MINOR__;
#elif defined(_MSC_VER)
  s << ";compiler=msvc " << _MSC_VER;
#endif
  s << ";cxx11_abi=" << _GLIBCXX_USE_CXX11_ABI;
  return s.str();
}

template <size_t N>
std::vector<std::string> names(const char* const (&table)[N]) {
  return std::vector<std::string>(table, table + N);
}

// The names of an enum of rlhf_kernels/math.h in the order of its integer codes; Python passes
// the index of a name in its own tuple, and tests/test_extension.py checks the two orders agree.
std::vector<std::string> enum_names(const std::string& which) {
  if (which == "kl_estimator") return names(kKlEstimatorNames);
  if (which == "agg") return names(kAggNames);
  if (which == "dpo_loss_type") return names(kDpoLossNames);
  TORCH_CHECK(false, "rlhf_kernels::enum_names: unknown enum '", which, "'");
}

// The SIMD instruction set the CPU kernels' elementwise loops run with here (cpu/vec.h cpu_isa()).
std::string cpu_isa_name() {
  switch (cpu::cpu_isa()) {
    case 2: return "avx512";
    case 1: return "avx2";
    default: return "base";
  }
}

}  // namespace
}  // namespace rlhf_kernels

TORCH_LIBRARY(rlhf_kernels, m) {
  m.def("cpu_isa() -> str", &rlhf_kernels::cpu_isa_name);
  m.def("build_info() -> str", &rlhf_kernels::build_info);
  m.def("enum_names(str which) -> str[]", &rlhf_kernels::enum_names);
}

// SIMD helpers of the C++ CPU kernels: portable vectors through GCC/Clang vector extensions
// (4 fp32 lanes on baseline x86-64 / aarch64, 8 lanes in the AVX2+FMA copies of the loops, which are
// picked at run time), a branch-free polynomial exp, and chunked reading of fp32 / bf16 / fp16 /
// fp64 inputs into fp32 (converted in a small stack buffer, never a full-size copy).  No
// -ffast-math: every formula is written out.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace rlhf_kernels {
namespace cpu {

// exp(x) for x <= 0 (all our arguments are shifted by the row max), 0 below -87.3.
// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 split in two parts (Cody-Waite),
// exp(r) by a degree-6 polynomial on |r| <= ln2 / 2 (relative error ~1e-7).  Rounding uses the
// 1.5 * 2^23 trick so it vectorizes without SSE4.1's roundps.
inline float exp_nonpos(float x) {
  const float xc = std::max(x, -87.3f);
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

// Portable SIMD through GCC/Clang vector extensions, templated on the vector type: 4 fp32 lanes
// (SSE2 on baseline x86-64, NEON on aarch64) and, on x86-64, an 8-lane copy of the row loops compiled
// for AVX2+FMA and (for the loops of RK_ISA_DISPATCH_AVX512) a 16-lane copy for AVX-512, picked at run time
// (cpu_isa()).  No -ffast-math.  Other compilers take the scalar loops.
#if defined(__GNUC__) || defined(__clang__)
#define RK_VEC 1
#define RK_INLINE inline __attribute__((always_inline))
typedef float vf4 __attribute__((vector_size(16)));
#if defined(__x86_64__)
#define RK_AVX2 1
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // the 8-lane helpers are always inlined: no ABI boundary
#endif
#endif

template <typename VF>
constexpr int64_t lanes() { return sizeof(VF) / sizeof(float); }
template <typename VF>
RK_INLINE VF vbroadcast(float x) { return VF{} + x; }
template <typename VF>
RK_INLINE VF vload(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename VF>
RK_INLINE void vstore(float* p, VF v) { std::memcpy(p, &v, sizeof(v)); }
template <typename VF>
RK_INLINE VF vmax(VF a, VF b) { return a > b ? a : b; }

// exp_nonpos on a vector (same polynomial and constants).
template <typename VF>
RK_INLINE VF vexp_nonpos(VF x) {
  using VI = decltype(x < x);
  const VF lo = vbroadcast<VF>(-87.3f);
  const VF xc = x < lo ? lo : x;
  const VF magic = vbroadcast<VF>(12582912.0f);
  const VF n = (xc * 1.44269504088896341f + magic) - magic;
  const VF r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  VF p = vbroadcast<VF>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  VF scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? vbroadcast<VF>(0.0f) : p * scale;
}

template <typename VF>
RK_INLINE float hsum(VF v) {
  float a[lanes<VF>()];
  std::memcpy(a, &v, sizeof(a));
  float s = 0.0f;
  for (int j = 0; j < lanes<VF>(); ++j) s += a[j];
  return s;
}
template <typename VF>
RK_INLINE float hmax(VF v) {
  float a[lanes<VF>()];
  std::memcpy(a, &v, sizeof(a));
  float m = a[0];
  for (int j = 1; j < lanes<VF>(); ++j) m = std::max(m, a[j]);
  return m;
}

// exp(x) for any x: exp_nonpos's polynomial on x clamped to [-87.3, 88.7]; 0 below, +inf above
// 88.7228 (where expf overflows), NaN stays NaN.
template <typename VF>
RK_INLINE VF vexp(VF x) {
  using VI = decltype(x < x);
  const VF lo = vbroadcast<VF>(-87.3f), hi = vbroadcast<VF>(88.7f);
  VF xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const VF magic = vbroadcast<VF>(12582912.0f);
  const VF n = (xc * 1.44269504088896341f + magic) - magic;
  const VF r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  VF p = vbroadcast<VF>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n in two factors so n = 128 (x near 88.7) does not overflow the exponent field
  const VI n1 = __builtin_convertvector(n, VI) >> 1;
  const VI n2 = __builtin_convertvector(n, VI) - n1;
  const VI b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
  VF s1, s2;
  std::memcpy(&s1, &b1, sizeof(s1));
  std::memcpy(&s2, &b2, sizeof(s2));
  VF y = p * s1 * s2;
  y = x < lo ? vbroadcast<VF>(0.0f) : y;
  y = x > vbroadcast<VF>(88.7228f) ? vbroadcast<VF>(INFINITY) : y;
  return x != x ? x : y;
}

// log1p(u) for u in [0, 1]: 2 atanh(s), s = u / (2 + u) <= 1/3, by its odd series to s^17
// (relative error < 1e-8; no cancellation for small u).
template <typename VF>
RK_INLINE VF vlog1p_unit(VF u) {
  const VF s = u / (u + 2.0f);
  const VF s2 = s * s;
  VF p = vbroadcast<VF>(1.0f / 17.0f);
  p = p * s2 + 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

template <typename VF>
RK_INLINE VF vmin(VF a, VF b) { return a < b ? a : b; }
template <typename VF>
RK_INLINE VF vabs(VF a) { return a < 0.0f ? -a : a; }
// 1.0f where the int mask (from a comparison) is set, else 0.0f.
template <typename VF, typename VI>
RK_INLINE VF vselect1(VI m) { return m ? vbroadcast<VF>(1.0f) : vbroadcast<VF>(0.0f); }

// Loads n <= lanes bytes of a bool mask as a 0/1 float vector (1 where nonzero).
template <typename VF>
RK_INLINE VF vload_mask(const uint8_t* m) {
  constexpr int W = lanes<VF>();
  float a[W];
  for (int j = 0; j < W; ++j) a[j] = m[j] ? 1.0f : 0.0f;
  return vload<VF>(a);
}
#else
#define RK_INLINE inline
struct vf4 {};
#endif


// The instruction set the loops run with: 2 = AVX-512 (F, DQ, BW, VL), 1 = AVX2 + FMA, 0 = the
// baseline (SSE2 / NEON), the best the CPU has, or lower when the environment variable
// RLHF_KERNELS_CPU_ISA says base or avx2 (the tests run every copy that way).  Read once.
inline int cpu_isa() {
  static const int isa = [] {
    int best = 0;
#if defined(RK_AVX2)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
    if (best == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      best = 2;
#endif
    const char* env = std::getenv("RLHF_KERNELS_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "base") == 0) best = 0;
    if (env != nullptr && std::strcmp(env, "avx2") == 0 && best > 1) best = 1;
    return best;
  }();
  return isa;
}
inline bool cpu_has_avx2() { return cpu_isa() >= 1; }

// ISA copies of a loop over [begin, end): NAME##_range<VF>(args, begin, end) must be an RK_INLINE
// template.  RK_ISA_DISPATCH defines NAME(args, begin, end), which runs the AVX2+FMA copy (8 lanes)
// where cpu_isa() allows (x86-64 with GCC/Clang), else the baseline copy; RK_ISA_DISPATCH_AVX512 adds
// an AVX-512 copy (16 lanes) before those.  Measured per loop (tests/test_cpu_isa.py covers each copy):
// kl and dpo run about 2-3x faster with AVX-512; the PPO losses ran 2-4x slower (GCC 12 turns their
// many compare-and-select steps into mask-register round trips), so they keep AVX2.
#if defined(RK_AVX2)
#define RK_ISA_COPY_AVX2_BASE(NAME, ARGS)                                                        \
  __attribute__((target("avx2,fma"))) inline void NAME##_avx2(const ARGS& a, int64_t b, int64_t e) { \
    NAME##_range<vf8>(a, b, e);                                                                   \
  }                                                                                               \
  inline void NAME##_base(const ARGS& a, int64_t b, int64_t e) { NAME##_range<vf4>(a, b, e); }
#define RK_ISA_DISPATCH(NAME, ARGS)                                                              \
  RK_ISA_COPY_AVX2_BASE(NAME, ARGS)                                                               \
  inline void NAME(const ARGS& a, int64_t b, int64_t e) {                                         \
    if (cpu_isa() >= 1) NAME##_avx2(a, b, e); else NAME##_base(a, b, e);                          \
  }
#define RK_ISA_DISPATCH_AVX512(NAME, ARGS)                                                       \
  RK_ISA_COPY_AVX2_BASE(NAME, ARGS)                                                               \
  __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))) inline void NAME##_avx512( \
      const ARGS& a, int64_t b, int64_t e) {                                                      \
    NAME##_range<vf16>(a, b, e);                                                                  \
  }                                                                                               \
  inline void NAME(const ARGS& a, int64_t b, int64_t e) {                                         \
    switch (cpu_isa()) {                                                                          \
      case 2: return NAME##_avx512(a, b, e);                                                      \
      case 1: return NAME##_avx2(a, b, e);                                                        \
      default: return NAME##_base(a, b, e);                                                       \
    }                                                                                             \
  }
#else
#define RK_ISA_DISPATCH(NAME, ARGS) \
  inline void NAME(const ARGS& a, int64_t b, int64_t e) { NAME##_range<vf4>(a, b, e); }
#define RK_ISA_DISPATCH_AVX512(NAME, ARGS) RK_ISA_DISPATCH(NAME, ARGS)
#endif

// ------------------------------------------------------------------------------------------------
// Chunked fp32 views of inputs and outputs of any floating dtype.

constexpr int64_t kVecChunk = 256;  // elements per chunk: each stream's buffer is 1 KB

// An input of any floating dtype, contiguous; chunk() returns fp32 values [off, off + n): the
// tensor's own memory when it is fp32, else buf filled by converting.
struct SrcF {
  const void* p;
  at::ScalarType st;
  explicit SrcF(const at::Tensor& t) : p(t.data_ptr()), st(t.scalar_type()) {}
  const float* chunk(int64_t off, int64_t n, float* buf) const {
    switch (st) {
      case at::kFloat: return static_cast<const float*>(p) + off;
      case at::kBFloat16: convert(static_cast<const c10::BFloat16*>(p) + off, n, buf); return buf;
      case at::kHalf: convert(static_cast<const c10::Half*>(p) + off, n, buf); return buf;
      default: convert(static_cast<const double*>(p) + off, n, buf); return buf;
    }
  }
  template <typename T>
  static void convert(const T* q, int64_t n, float* buf) {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(q[i]);
  }
};

// An output of any floating dtype, contiguous: at(off, buf) is where to write fp32 values
// [off, off + n) (the output itself when fp32), and flush() converts buf into it otherwise.
struct DstF {
  void* p;
  at::ScalarType st;
  explicit DstF(at::Tensor& t) : p(t.data_ptr()), st(t.scalar_type()) {}
  float* at(int64_t off, float* buf) const { return st == at::kFloat ? static_cast<float*>(p) + off : buf; }
  void flush(int64_t off, int64_t n, const float* buf) const {
    switch (st) {
      case at::kFloat: return;
      case at::kBFloat16: convert(buf, n, static_cast<c10::BFloat16*>(p) + off); return;
      case at::kHalf: convert(buf, n, static_cast<c10::Half*>(p) + off); return;
      default: convert(buf, n, static_cast<double*>(p) + off); return;
    }
  }
  template <typename T>
  static void convert(const float* buf, int64_t n, T* q) {
    for (int64_t i = 0; i < n; ++i) q[i] = static_cast<T>(buf[i]);
  }
};

}  // namespace cpu
}  // namespace rlhf_kernels

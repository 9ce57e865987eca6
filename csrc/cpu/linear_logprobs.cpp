// C++ CPU linear_token_logprobs: per-token log-probs straight from hidden states, the LM head fused
// with the log-softmax so the [N, V] logits never exist.  Also the schemas of the linear_logprobs
// family.
//
// Forward: the rows with a label are gathered once as fp32 [M, H] (ignored rows are never projected);
// the vocabulary is cut into tiles of kVocabTile entries and the rows into tiles so that one fp32
// logits tile holds about kTileElems values.  For each (vocabulary tile, row tile) the tile comes from
// one fp32 GEMM (at::mm_out into a reused buffer; bf16/fp16 inputs are converted to fp32 first, so
// products accumulate in fp32), then a fused row fold, parallel over rows, adds the bias, applies
// scale / soft-cap / temperature and folds the tile into per-row running statistics (online
// log-sum-exp with the entropy sum, mean logit, first-index argmax).  Extra memory: O(M * H) for the
// gathered rows, O(N) statistics, one tile.
//
// Backward recomputes each tile, turns it in place into dL/dy (fused, parallel over rows), and
// accumulates grad_hidden += g_y @ W_tile, grad_weight_tile += g_y^T @ h, grad_bias_tile += sum_rows g_y
// in fp32 with plain GEMMs (at::addmm_), vocabulary tiles outside and row tiles inside: a fixed order,
// so the same bits every run.
#include "common.h"
#include "rlhf_kernels/math.h"
#include "vec.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace rlhf_kernels {
namespace cpu {
namespace {

constexpr int64_t kVocabTile = 4096;      // vocabulary entries per tile (16 KB of fp32 per row)
constexpr int64_t kTileElems = 1 << 20;   // fp32 logits per tile (4 MB)

// The logit transform z = g(y) and its derivative: z = y * a without a soft-cap (a = scale / T);
// with a soft-cap c, z = (c / T) tanh(y * scale / c) and dz/dy = (scale / T) (1 - tanh^2).
struct Transform {
  bool capped;
  float a;        // scale / T (no cap) or scale / c (cap)
  float cap_t;    // c / T
  float slope;    // scale / T
};

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2 |x|) <= 1: no overflow, absolute error ~1e-7.
inline float tanh_f(float x) {
  const float e = exp_nonpos(-2.0f * std::fabs(x));
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}

// SIMD: the vector types, loads, exp and reductions of vec.h; tanh on a vector here.
#ifdef RK_VEC
template <typename VF>
RK_INLINE VF vtanh(VF x) {
  const VF ax = x < 0.0f ? -x : x;
  const VF e = vexp_nonpos<VF>(ax * -2.0f);
  const VF t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}
#endif

// z[j] = g(y[j] + b[j]) in place over one row of a tile; returns max_j z[j].
template <typename VF>
RK_INLINE float transform_max(float* y, const float* b, int64_t n, const Transform& tf) {
  int64_t j = 0;
  float m = -INFINITY;
#ifdef RK_VEC
  constexpr int64_t W = lanes<VF>();
  VF vm = vbroadcast<VF>(-INFINITY);
  const VF a = vbroadcast<VF>(tf.a), cap_t = vbroadcast<VF>(tf.cap_t);
  for (; j + W <= n; j += W) {
    VF v = vload<VF>(y + j);
    if (b) v += vload<VF>(b + j);
    v = tf.capped ? cap_t * vtanh<VF>(v * a) : v * a;
    vstore(y + j, v);
    vm = vmax(vm, v);
  }
  m = hmax(vm);
#endif
  for (; j < n; ++j) {
    float v = y[j] + (b ? b[j] : 0.0f);
    v = tf.capped ? tf.cap_t * tanh_f(v * tf.a) : v * tf.a;
    y[j] = v;
    m = std::max(m, v);
  }
  return m;
}

// s += sum exp(z - m), u += sum exp(z - m) (z - m), zs += sum z over one row (m finite).  -inf
// entries give e = 0 and, with z - m clamped at -88, e * (z - m) = 0 rather than NaN.
template <typename VF>
RK_INLINE void row_sums(const float* z, int64_t n, float m, float& s, float& u, float& zs) {
  int64_t j = 0;
  float cs = 0.0f, cu = 0.0f, cz = 0.0f;
#ifdef RK_VEC
  constexpr int64_t W = lanes<VF>();
  const VF vm = vbroadcast<VF>(m), floor88 = vbroadcast<VF>(-88.0f);
  VF vs = vbroadcast<VF>(0.0f), vu = vs, vz = vs;
  for (; j + W <= n; j += W) {
    const VF x = vload<VF>(z + j);
    const VF d = x - vm;
    const VF e = vexp_nonpos<VF>(d);
    vs += e;
    vu += e * vmax(d, floor88);
    vz += x;
  }
  cs = hsum(vs);
  cu = hsum(vu);
  cz = hsum(vz);
#endif
  for (; j < n; ++j) {
    const float d = z[j] - m;
    const float e = exp_nonpos(d);
    cs += e;
    cu += e * std::max(d, -88.0f);
    cz += z[j];
  }
  s += cs;
  u += cu;
  zs += cz;
}

// In place over one row: y -> dL/dy = (g_lp (onehot - p) - g_ent p (log p + H)) dz/dy, where
// p = exp(z - lse), without the onehot term (the caller adds it at the label column).
template <typename VF>
RK_INLINE void grad_row(float* y, const float* b, int64_t n, const Transform& tf, float lse, float h, float gl,
                           float ge) {
  int64_t j = 0;
#ifdef RK_VEC
  constexpr int64_t W = lanes<VF>();
  const VF a = vbroadcast<VF>(tf.a), cap_t = vbroadcast<VF>(tf.cap_t), vl = vbroadcast<VF>(lse), zero = vbroadcast<VF>(0.0f);
  const VF floor88 = vbroadcast<VF>(-88.0f);
  for (; j + W <= n; j += W) {
    VF v = vload<VF>(y + j);
    if (b) v += vload<VF>(b + j);
    VF z, dz = vbroadcast<VF>(tf.slope);
    if (tf.capped) {
      const VF t = vtanh<VF>(v * a);
      z = cap_t * t;
      dz = dz * (1.0f - t * t);
    } else {
      z = v * a;
    }
    VF logp = z - vl;
    logp = logp > zero ? zero : logp;
    const VF p = vexp_nonpos<VF>(logp);
    vstore(y + j, -p * (gl + ge * (vmax(logp, floor88) + h)) * dz);
  }
#endif
  for (; j < n; ++j) {
    const float v = y[j] + (b ? b[j] : 0.0f);
    float z, dz = tf.slope;
    if (tf.capped) {
      const float t = tanh_f(v * tf.a);
      z = tf.cap_t * t;
      dz *= 1.0f - t * t;
    } else {
      z = v * tf.a;
    }
    const float logp = std::min(z - lse, 0.0f);
    const float p = exp_nonpos(logp);
    y[j] = -p * (gl + ge * (std::max(logp, -88.0f) + h)) * dz;
  }
}

// Running statistics of one valid row over the vocabulary tiles seen so far.
struct RowStat {
  LseState lse;      // max m, sum exp(z - m), sum exp(z - m) (z - m)
  float z_sum;       // sum of z
  float z_label;     // z at the label
  float best;        // max of z ...
  int64_t best_idx;  // ... and its first index
};

// One tile of rows: y [rows, n] (row stride n) for vocabulary entries [v0, v0 + n).
struct TileArgs {
  float* y;
  const float* bias;  // bias + v0, or null
  int64_t rows, n, v0;
  const int64_t* labels;  // the tile's rows' labels
  Transform tf;
  // forward
  RowStat* stats;
  bool extras;
  // backward
  const float *lse, *ent, *g_lp, *g_ent;
};

template <typename VF>
RK_INLINE void fold_rows(const TileArgs& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    float* z = a.y + r * a.n;
    RowStat& st = a.stats[r];
    const float cm = transform_max<VF>(z, a.bias, a.n, a.tf);
    if (a.extras && cm > st.best) {  // strictly larger: an earlier tile keeps a tie (first index wins)
      int64_t j = 0;
      while (j < a.n && !(z[j] == cm)) ++j;
      st.best = cm;
      st.best_idx = a.v0 + j;
    }
    if (cm > st.lse.m) lse_rescale(st.lse, cm);
    if (st.lse.m != -INFINITY)
      row_sums<VF>(z, a.n, st.lse.m, st.lse.s, st.lse.u, st.z_sum);
    else
      st.z_sum = -INFINITY;  // every z so far is -inf (a -inf bias)
    const int64_t col = a.labels[r] - a.v0;
    if (col >= 0 && col < a.n) st.z_label = z[col];
  }
}

template <typename VF>
RK_INLINE void grad_rows(const TileArgs& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    float* y = a.y + r * a.n;
    const float gl = a.g_lp[r], ge = a.g_ent ? a.g_ent[r] : 0.0f;
    const float h = a.g_ent ? a.ent[r] : 0.0f;
    const int64_t col = a.labels[r] - a.v0;
    // The label column in fp32 from y itself, before the row is overwritten.
    float label_grad = 0.0f;
    if (col >= 0 && col < a.n) {
      const float v = y[col] + (a.bias ? a.bias[col] : 0.0f);
      float z, dz = a.tf.slope;
      if (a.tf.capped) {
        const float t = tanh_f(v * a.tf.a);
        z = a.tf.cap_t * t;
        dz *= 1.0f - t * t;
      } else {
        z = v * a.tf.a;
      }
      const float logp = std::min(z - a.lse[r], 0.0f);
      const float p = exp_nonpos(logp);
      label_grad = (gl - p * (gl + ge * (std::max(logp, -88.0f) + h))) * dz;
    }
    grad_row<VF>(y, a.bias, a.n, a.tf, a.lse[r], h, gl, ge);
    if (col >= 0 && col < a.n) y[col] = label_grad;
  }
}

template <typename VF>
void tile_rows(const TileArgs& a, int64_t b, int64_t e, bool backward) {
  if (backward)
    grad_rows<VF>(a, b, e);
  else
    fold_rows<VF>(a, b, e);
}
#ifdef RK_AVX2
__attribute__((target("avx2,fma"))) void tile_rows_avx2(const TileArgs& a, int64_t b, int64_t e, bool backward) {
  tile_rows<vf8>(a, b, e, backward);
}
#endif

void run_tile(const TileArgs& a, bool backward) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.n, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t b, int64_t e) {
#ifdef RK_AVX2
    if (cpu_has_avx2()) return tile_rows_avx2(a, b, e, backward);
#endif
    tile_rows<vf4>(a, b, e, backward);
  });
}

// ---------------------------------------------------------------------------------------------
// Tensor-level plumbing shared by forward and backward.

Transform make_transform(double logit_scale, double softcap, double temperature) {
  Transform tf;
  tf.capped = softcap != 0.0;
  tf.slope = static_cast<float>(logit_scale / temperature);
  tf.a = tf.capped ? static_cast<float>(logit_scale / softcap) : tf.slope;
  tf.cap_t = static_cast<float>(softcap / temperature);
  return tf;
}

void check_inputs(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& labels,
                  double temperature, int64_t ignore_index) {
  const char* op = "rlhf_kernels::linear_token_logprobs";
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be [N, H], got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), op, ": weight must be [V, H] with H = ",
              hidden.size(1), ", got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight must have hidden's dtype");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [V], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), op, ": bias must have hidden's dtype");
  }
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0) && labels.scalar_type() == at::kLong, op,
              ": labels must be int64 [N]");
  TORCH_CHECK(temperature > 0.0, op, ": temperature must be > 0");
  // The public API validates labels; the op checks again (O(N)) since it indexes with them.
  const Tensor l = labels.contiguous();
  const int64_t* p = l.data_ptr<int64_t>();
  const int64_t vocab = weight.size(0);
  for (int64_t i = 0; i < l.numel(); ++i)
    TORCH_CHECK(p[i] == ignore_index || (p[i] >= 0 && p[i] < vocab), op, ": label ", p[i], " at row ", i,
                " is outside [0, ", vocab, ") and is not ignore_index=", ignore_index);
}

// The rows with a label: their indices (int64 [M]) and labels.
struct ValidRows {
  Tensor index;  // int64 [M]
  std::vector<int64_t> labels;
  int64_t count() const { return static_cast<int64_t>(labels.size()); }
};

ValidRows valid_rows(const Tensor& labels, int64_t ignore_index) {
  const Tensor l = labels.contiguous();
  const int64_t* p = l.data_ptr<int64_t>();
  std::vector<int64_t> idx;
  ValidRows out;
  for (int64_t i = 0; i < l.numel(); ++i) {
    if (p[i] == ignore_index) continue;
    idx.push_back(i);
    out.labels.push_back(p[i]);
  }
  out.index = at::empty({static_cast<int64_t>(idx.size())}, labels.options().dtype(at::kLong));
  if (!idx.empty()) std::memcpy(out.index.data_ptr<int64_t>(), idx.data(), idx.size() * sizeof(int64_t));
  return out;
}

// The valid rows of hidden as fp32 [M, H] (hidden itself when nothing needs gathering or converting).
Tensor gather_rows_f32(const Tensor& hidden, const ValidRows& rows) {
  if (rows.count() == hidden.size(0)) return hidden.to(at::kFloat).contiguous();
  return at::index_select(hidden, 0, rows.index).to(at::kFloat).contiguous();
}

// Tile shape for M valid rows and V vocabulary entries.
struct TileShape {
  int64_t rows, cols;
};
TileShape tile_shape(int64_t m, int64_t vocab) {
  const int64_t cols = std::max<int64_t>(1, std::min(vocab, kVocabTile));
  const int64_t rows = std::max<int64_t>(1, std::min(m, kTileElems / cols));
  return {rows, cols};
}

// Rows [v0, v0 + n) of the head in fp32: a view of weight when it is fp32, else converted into buf.
Tensor head_tile_f32(const Tensor& weight, Tensor& buf, int64_t v0, int64_t n) {
  const Tensor w = weight.narrow(0, v0, n);
  if (weight.scalar_type() == at::kFloat) return w;
  Tensor dst = buf.narrow(0, 0, n);
  dst.copy_(w);
  return dst;
}

// A contiguous [rows, n] fp32 view at the start of a flat buffer.
Tensor tile_view(const Tensor& flat, int64_t rows, int64_t n) { return flat.narrow(0, 0, rows * n).view({rows, n}); }

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_token_logprobs_fwd(
    const Tensor& hidden_in, const Tensor& weight_in, const std::optional<Tensor>& bias_in, const Tensor& labels,
    double logit_scale, double softcap, double temperature, int64_t ignore_index, bool with_entropy,
    bool with_extras) {
  check_inputs(hidden_in, weight_in, bias_in, labels, temperature, ignore_index);
  const int64_t n = hidden_in.size(0), vocab = weight_in.size(0);
  const auto f32 = hidden_in.options().dtype(at::kFloat);
  Tensor lp = at::zeros({n}, f32), lse = at::zeros({n}, f32);
  Tensor ent = at::zeros({with_entropy ? n : 0}, f32);
  Tensor mean = at::zeros({with_extras ? n : 0}, f32);
  Tensor top1 = at::zeros({with_extras ? n : 0}, hidden_in.options().dtype(at::kBool));
  const ValidRows rows = valid_rows(labels, ignore_index);
  const int64_t m = rows.count();
  if (m == 0) return {lp, lse, ent, mean, top1};

  const Tensor weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  const Tensor hv = gather_rows_f32(hidden_in, rows);
  Tensor bias32;
  if (bias_in.has_value() && bias_in->defined()) bias32 = bias_in->to(at::kFloat).contiguous();
  const TileShape ts = tile_shape(m, vocab);
  Tensor buf = at::empty({ts.rows * ts.cols}, f32);
  Tensor wbuf = weight.scalar_type() == at::kFloat ? Tensor() : at::empty({ts.cols, weight.size(1)}, f32);
  const Transform tf = make_transform(logit_scale, softcap, temperature);

  std::vector<RowStat> stats(m);
  for (RowStat& st : stats) {
    st.lse = lse_init();
    st.z_sum = 0.0f;
    st.z_label = 0.0f;
    st.best = -INFINITY;
    st.best_idx = 0;
  }
  for (int64_t v0 = 0; v0 < vocab; v0 += ts.cols) {
    const int64_t nv = std::min(ts.cols, vocab - v0);
    const Tensor w = head_tile_f32(weight, wbuf, v0, nv);
    for (int64_t t0 = 0; t0 < m; t0 += ts.rows) {
      const int64_t nt = std::min(ts.rows, m - t0);
      Tensor tile = tile_view(buf, nt, nv);
      at::mm_out(tile, hv.narrow(0, t0, nt), w.t());
      TileArgs a{};
      a.y = tile.data_ptr<float>();
      a.bias = bias32.defined() ? bias32.data_ptr<float>() + v0 : nullptr;
      a.rows = nt;
      a.n = nv;
      a.v0 = v0;
      a.labels = rows.labels.data() + t0;
      a.tf = tf;
      a.stats = stats.data() + t0;
      a.extras = with_extras;
      run_tile(a, /*backward=*/false);
    }
  }
  const int64_t* idx = rows.index.data_ptr<int64_t>();
  float* lp_p = lp.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  float* ent_p = with_entropy ? ent.data_ptr<float>() : nullptr;
  float* mean_p = with_extras ? mean.data_ptr<float>() : nullptr;
  bool* top_p = with_extras ? top1.data_ptr<bool>() : nullptr;
  const float inv_v = 1.0f / static_cast<float>(vocab);
  at::parallel_for(0, m, kElemGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const RowStat& st = stats[i];
      const int64_t row = idx[i];
      const float l = lse_value(st.lse);
      lse_p[row] = l;
      lp_p[row] = st.z_label - l;
      if (ent_p) ent_p[row] = lse_entropy(st.lse);
      if (mean_p) {
        mean_p[row] = st.z_sum * inv_v;
        top_p[row] = st.best_idx == rows.labels[i];
      }
    }
  });
  return {lp, lse, ent, mean, top1};
}

std::tuple<Tensor, Tensor, Tensor> linear_token_logprobs_bwd(
    const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy, const Tensor& hidden_in,
    const Tensor& weight_in, const std::optional<Tensor>& bias_in, const Tensor& labels, const Tensor& lse,
    const Tensor& entropy, double logit_scale, double softcap, double temperature, int64_t ignore_index,
    std::array<bool, 3> output_mask) {
  check_inputs(hidden_in, weight_in, bias_in, labels, temperature, ignore_index);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const bool need_h = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && has_bias;
  const int64_t n = hidden_in.size(0), width = hidden_in.size(1), vocab = weight_in.size(0);
  const auto f32 = hidden_in.options().dtype(at::kFloat);
  Tensor grad_h = need_h ? at::zeros({n, width}, hidden_in.options()) : at::empty({0}, hidden_in.options());
  Tensor grad_w = need_w ? at::zeros({vocab, width}, weight_in.options()) : at::empty({0}, weight_in.options());
  Tensor grad_b = need_b ? at::zeros({vocab}, bias_in->options()) : at::empty({0}, hidden_in.options());
  const ValidRows rows = valid_rows(labels, ignore_index);
  const int64_t m = rows.count();
  if (m == 0 || !(need_h || need_w || need_b)) return {grad_h, grad_w, grad_b};
  TORCH_CHECK(grad_logprobs.numel() == n && lse.numel() == n,
              "rlhf_kernels::linear_token_logprobs_bwd: grad_logprobs and lse must be [N]");
  const bool with_ent = grad_entropy.has_value() && grad_entropy->defined();
  TORCH_CHECK(!with_ent || (grad_entropy->numel() == n && entropy.numel() == n),
              "rlhf_kernels::linear_token_logprobs_bwd: grad_entropy and entropy must be [N]");

  // Per-row inputs of the valid rows (the upstream gradients of ignored rows are never read).
  const Tensor g_lp = at::index_select(grad_logprobs.to(at::kFloat), 0, rows.index).contiguous();
  const Tensor row_lse = at::index_select(lse.to(at::kFloat), 0, rows.index).contiguous();
  Tensor g_ent, row_ent;
  if (with_ent) {
    g_ent = at::index_select(grad_entropy->to(at::kFloat), 0, rows.index).contiguous();
    row_ent = at::index_select(entropy.to(at::kFloat), 0, rows.index).contiguous();
  }

  const Tensor weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  const Tensor hv = gather_rows_f32(hidden_in, rows);
  Tensor bias32;
  if (has_bias) bias32 = bias_in->to(at::kFloat).contiguous();
  const TileShape ts = tile_shape(m, vocab);
  Tensor buf = at::empty({ts.rows * ts.cols}, f32);
  const bool w_f32 = weight.scalar_type() == at::kFloat;
  Tensor wbuf = w_f32 ? Tensor() : at::empty({ts.cols, width}, f32);
  // fp32 accumulators: the hidden gradient of the valid rows (grad_h itself when it is fp32 and every
  // row is valid), one vocabulary tile of the weight gradient (a view of grad_w when it is fp32).
  const bool direct_h = need_h && hidden_in.scalar_type() == at::kFloat && m == n;
  Tensor gh32 = direct_h ? grad_h : (need_h ? at::zeros({m, width}, f32) : Tensor());
  Tensor gwbuf = (need_w && !w_f32) ? at::empty({ts.cols, width}, f32) : Tensor();
  Tensor gb32 = need_b ? at::zeros({vocab}, f32) : Tensor();
  Tensor col_sum = need_b ? at::empty({ts.cols}, f32) : Tensor();
  const Transform tf = make_transform(logit_scale, softcap, temperature);

  for (int64_t v0 = 0; v0 < vocab; v0 += ts.cols) {
    const int64_t nv = std::min(ts.cols, vocab - v0);
    const Tensor w = head_tile_f32(weight, wbuf, v0, nv);
    Tensor gw;
    if (need_w) {
      gw = w_f32 ? grad_w.narrow(0, v0, nv) : gwbuf.narrow(0, 0, nv);
      if (!w_f32) gw.zero_();
    }
    for (int64_t t0 = 0; t0 < m; t0 += ts.rows) {
      const int64_t nt = std::min(ts.rows, m - t0);
      Tensor tile = tile_view(buf, nt, nv);
      const Tensor h = hv.narrow(0, t0, nt);
      at::mm_out(tile, h, w.t());
      TileArgs a{};
      a.y = tile.data_ptr<float>();
      a.bias = has_bias ? bias32.data_ptr<float>() + v0 : nullptr;
      a.rows = nt;
      a.n = nv;
      a.v0 = v0;
      a.labels = rows.labels.data() + t0;
      a.tf = tf;
      a.lse = row_lse.data_ptr<float>() + t0;
      a.g_lp = g_lp.data_ptr<float>() + t0;
      a.ent = with_ent ? row_ent.data_ptr<float>() + t0 : nullptr;
      a.g_ent = with_ent ? g_ent.data_ptr<float>() + t0 : nullptr;
      run_tile(a, /*backward=*/true);  // tile := dL/dy
      if (need_h) {
        Tensor gh = gh32.narrow(0, t0, nt);
        gh.addmm_(tile, w);
      }
      if (need_w) gw.addmm_(tile.t(), h);
      if (need_b) {
        Tensor cs = col_sum.narrow(0, 0, nv);
        at::sum_out(cs, tile, {0});
        gb32.narrow(0, v0, nv).add_(cs);
      }
    }
    if (need_w && !w_f32) grad_w.narrow(0, v0, nv).copy_(gw);
  }
  if (need_h && !direct_h) grad_h.index_copy_(0, rows.index, gh32.to(hidden_in.scalar_type()));
  if (need_b) grad_b.copy_(gb32);
  return {grad_h, grad_w, grad_b};
}

}  // namespace cpu
}  // namespace rlhf_kernels

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("linear_token_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float logit_scale, "
        "float softcap, float temperature, int ignore_index, bool with_entropy, bool with_extras) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_token_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
        "Tensor? bias, Tensor labels, Tensor lse, Tensor entropy, float logit_scale, float softcap, "
        "float temperature, int ignore_index, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("linear_token_logprobs_fwd", &rlhf_kernels::cpu::linear_token_logprobs_fwd);
  m.impl("linear_token_logprobs_bwd", &rlhf_kernels::cpu::linear_token_logprobs_bwd);
}

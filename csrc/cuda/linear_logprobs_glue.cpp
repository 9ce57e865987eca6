// CUDA glue of linear_token_logprobs: checks the tensors (device, dtype, shape), guards their device,
// runs the tile loop (cuBLAS GEMMs through ATen, then the kernels of csrc/cuda/linear_logprobs.cu on
// the same stream) and registers the CUDA implementations.  Compiled only in CUDA builds.
//
// The tile loop mirrors csrc/cpu/linear_logprobs.cpp: the valid rows (label != ignore_index) are
// gathered once as hv [M, H] in hidden's dtype (ignored rows are never projected); the vocabulary is
// cut into tiles of C entries and each tile of logits y [M, C] = hv @ W[v0:v0+C]^T is one GEMM into a
// reused fp32 buffer.  bf16/fp16 operands go through ATen's mm with out_dtype=float (aten::mm.dtype_out:
// cuBLAS with fp32 accumulation AND an fp32 result), so a logit is never rounded to bf16/fp16; fp32
// operands use plain mm (under PyTorch's fp32 matmul precision setting: TF32 only if the user allows it).
// One tile holds all M rows: C = clamp(2^26 / max(M, H), 256, 8192) rounded down to a multiple of 128,
// so the fp32 tile (and, in the backward, an fp32 [C, H] weight-gradient tile) is at most 256 MiB
// (unless M or H exceeds 2^18, where C = 256 sets it) and the GEMMs stay large.  Vocabulary tiles run in increasing order: a fixed order, the same bits every run.
//
// Forward: after each tile's GEMM the fold kernel folds it into per-row statistics (device memory,
// O(M)); after the last tile a finish kernel writes the outputs to the valid rows (ignored rows keep
// the zeros allocated here).
//
// Backward: each tile is recomputed, and the gradient kernel turns it into dL/dy.  Then
//   grad_hidden[valid] += dL/dy @ W_tile      (an fp32 [M, H] accumulator across vocabulary tiles)
//   grad_weight[tile]   = dL/dy^T @ hv         (one GEMM over all M rows, fp32 result, then cast)
//   grad_bias[tile]     = column sums of dL/dy (fp32)
// For bf16/fp16 inputs the gradient kernel also writes dL/dy rounded to the input dtype, the operand
// of the two gradient GEMMs (tensor cores, fp32 accumulation and result), as Liger's and TRL's fused
// losses do: the products of a bf16 model's backward are bf16 x bf16 anyway; what stays fp32 is
// every accumulation (within the GEMM, across vocabulary tiles, the bias sums).  cuBLAS via ATen
// cannot add a bf16 x bf16 product into an fp32 matrix (addmm.dtype_out wants self in the operands'
// dtype), so the hidden gradient of each tile goes through an fp32 scratch of at most 256 MiB (row
// chunks) and is added to the accumulator.  Only the gradients asked for by output_mask are computed.
//
// Host syncs: one per call, at::nonzero, which brings the number M of valid rows to the host (it sizes
// the gathered rows, the tiles and the grids).  Labels are not range-checked on the host (the public
// API checks them on CPU tensors, or on GPU under RLHF_KERNELS_DEBUG=1); on the device a label outside
// [0, V) matches no column and is never used as an index: its log-prob is NaN, as token_logprobs.
#include "glue.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>

namespace rlhf_kernels {
namespace cuda_launch {

// Defined in csrc/cuda/linear_logprobs.cu.  A tile is y [rows, cols] fp32 contiguous (row stride
// cols) for the vocabulary entries [v0, v0 + cols); bias points at bias[v0] (fp32) or is null; labels
// are the rows' labels (int64 [rows]); rows < 2^31 (one block per row).
// stats: fp32 [6, rows] and best_index: int64 [rows], the running statistics, kept between the calls
// of one forward (first = true on the first vocabulary tile: they are started, not read).
int linear_token_logprobs_forward(const float* tile, int64_t rows, int64_t cols, int64_t v0, const float* bias,
                                  const int64_t* labels, double logit_scale, double softcap, double temperature,
                                  bool first, float* stats, int64_t* best_index, void* stream);
// After the last tile: output row row_index[i] (i when row_index is null) of logprobs and lse (fp32
// [N]) and, when given, of entropy, mean_logit and is_top1 (mean_logit and is_top1 together).
int linear_token_logprobs_forward_finish(const float* stats, const int64_t* best_index, int64_t rows, int64_t vocab,
                                         const int64_t* labels, const int64_t* row_index, float* logprobs, float* lse,
                                         float* entropy, float* mean_logit, bool* is_top1, void* stream);
// dL/dy of one tile: written in place into the fp32 tile when keep_f32, and into low (same layout, dtype
// low_dtype: kBF16 or kF16) when low is not null.  lse, g_logprobs (and entropy, g_entropy, both null
// or both given) are the rows' fp32 values.
int linear_token_logprobs_backward(float* tile, void* low, int low_dtype, int64_t rows, int64_t cols, int64_t v0,
                                   const float* bias, const int64_t* labels, const float* lse, const float* entropy,
                                   const float* g_logprobs, const float* g_entropy, double logit_scale, double softcap,
                                   double temperature, bool keep_f32, void* stream);

}  // namespace cuda_launch

namespace cuda {

using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

namespace {

constexpr int64_t kTileBytes = int64_t{1} << 28;  // fp32 logits tile (and fp32 scratch) at most 256 MiB
constexpr int64_t kMinCols = 256, kMaxCols = 8192, kColAlign = 128;
constexpr int64_t kStats = 6;  // fp32 statistics per row (see linear_logprobs.cu)
constexpr int64_t kMaxRows = (int64_t{1} << 31) - 1;  // one block per valid row

bool given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Vocabulary entries per tile for M valid rows of width H.
int64_t tile_cols(int64_t m, int64_t width, int64_t vocab) {
  const int64_t fit = kTileBytes / int64_t{4} / std::max<int64_t>({m, width, 1});
  const int64_t cols = std::clamp(fit, kMinCols, kMaxCols) / kColAlign * kColAlign;
  return std::max<int64_t>(1, std::min(cols, vocab));
}

void check_inputs(const Args& a, const char* op, const Tensor& hidden, const Tensor& weight,
                  const std::optional<Tensor>& bias, const Tensor& labels, double logit_scale, double softcap,
                  double temperature) {
  a.dims("hidden", hidden, 2);
  a.floating("hidden", hidden, /*f64_ok=*/false);
  a.dims("weight", weight, 2);
  TORCH_CHECK(weight.size(1) == hidden.size(1), "rlhf_kernels::", op, ": weight must be [V, H] with H = hidden.size(1) = ",
              hidden.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "rlhf_kernels::", op, ": weight must have hidden's dtype ",
              hidden.scalar_type(), ", got ", weight.scalar_type());
  if (given(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "rlhf_kernels::", op, ": bias must be [V] with V = ",
                "weight.size(0) = ", weight.size(0), ", got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), "rlhf_kernels::", op, ": bias must have hidden's dtype ",
                hidden.scalar_type(), ", got ", bias->scalar_type());
  }
  a.integral("labels", labels);
  a.numel("labels", labels, hidden.size(0));
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, "rlhf_kernels::", op,
              ": temperature must be a finite positive number, got ", temperature);
  TORCH_CHECK(std::isfinite(logit_scale), "rlhf_kernels::", op, ": logit_scale must be finite, got ", logit_scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "rlhf_kernels::", op,
              ": softcap must be finite and >= 0 (0 = no soft-cap), got ", softcap);
}

// The rows with a label: their positions and labels (int64 [M]).
struct ValidRows {
  Tensor index;   // undefined when every row is valid (the identity)
  Tensor labels;  // int64 [M], contiguous
  int64_t count = 0;
};

ValidRows valid_rows(const char* op, const Tensor& labels_in, int64_t ignore_index, int64_t vocab) {
  const Tensor labels = labels_in.to(at::kLong).contiguous();
  ValidRows rows;
  // The op's one host sync: nonzero() brings the number of valid rows to the host.
  Tensor index = at::nonzero(labels.ne(ignore_index)).squeeze(1);
  rows.count = index.size(0);
  TORCH_CHECK(rows.count <= kMaxRows, "rlhf_kernels::", op, ": at most 2^31 - 1 rows with a label, got ", rows.count);
  TORCH_CHECK(rows.count == 0 || vocab > 0, "rlhf_kernels::", op, ": weight has no rows (V = 0) but ", rows.count,
              " labels are not ignore_index=", ignore_index);
  if (rows.count == labels.size(0)) {
    rows.labels = labels;
  } else {
    rows.index = index.contiguous();
    rows.labels = at::index_select(labels, 0, rows.index);
  }
  return rows;
}

// The valid rows of t (dim 0), contiguous: t itself (or a contiguous copy) when every row is valid.
Tensor gather(const Tensor& t, const ValidRows& rows) {
  return rows.index.defined() ? at::index_select(t, 0, rows.index) : t.contiguous();
}

const int64_t* index_ptr(const ValidRows& rows) {
  return rows.index.defined() ? rows.index.data_ptr<int64_t>() : nullptr;
}

// out (fp32) = a @ b: fp32 operands with plain mm; bf16/fp16 operands with fp32 accumulation and result.
void mm_f32(Tensor& out, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat)
    at::mm_out(out, a, b);
  else
    at::mm_out(out, a, b, at::kFloat);
}

// A contiguous [rows, cols] view at the start of a flat buffer.
Tensor tile_view(const Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

}  // namespace

Tensor5 linear_token_logprobs_fwd(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                                  const Tensor& labels, double logit_scale, double softcap, double temperature,
                                  int64_t ignore_index, bool with_entropy, bool with_extras) {
  Args a("linear_token_logprobs_fwd", {{"hidden", &hidden}, {"weight", &weight}, {"labels", &labels}});
  a.optional("bias", bias);
  const char* op = "linear_token_logprobs_fwd";
  check_inputs(a, op, hidden, weight, bias, labels, logit_scale, softcap, temperature);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const auto fopt = hidden.options().dtype(at::kFloat);
  Tensor lp = at::zeros({n}, fopt), lse = at::zeros({n}, fopt);
  Tensor ent = at::zeros({with_entropy ? n : 0}, fopt);
  Tensor mean = at::zeros({with_extras ? n : 0}, fopt);
  Tensor top1 = at::zeros({with_extras ? n : 0}, hidden.options().dtype(at::kBool));
  if (n == 0) return {lp, lse, ent, mean, top1};
  const ValidRows rows = valid_rows(op, labels, ignore_index, vocab);
  const int64_t m = rows.count;
  if (m == 0) return {lp, lse, ent, mean, top1};

  const Tensor hv = gather(hidden, rows);  // [M, H], hidden's dtype
  const Tensor bias32 = given(bias) ? f32(*bias) : Tensor();
  const int64_t cols = tile_cols(m, hidden.size(1), vocab);
  Tensor buf = at::empty({m * cols}, fopt);
  Tensor stats = at::empty({kStats * m}, fopt);
  Tensor best = at::empty({m}, hidden.options().dtype(at::kLong));
  void* stream = a.stream();
  for (int64_t v0 = 0; v0 < vocab; v0 += cols) {
    const int64_t nv = std::min(cols, vocab - v0);
    Tensor y = tile_view(buf, m, nv);
    mm_f32(y, hv, weight.narrow(0, v0, nv).t());
    check(L::linear_token_logprobs_forward(y.data_ptr<float>(), m, nv, v0,
                                           bias32.defined() ? bias32.data_ptr<float>() + v0 : nullptr,
                                           rows.labels.data_ptr<int64_t>(), logit_scale, softcap, temperature,
                                           /*first=*/v0 == 0, stats.data_ptr<float>(), best.data_ptr<int64_t>(), stream),
          op);
  }
  check(L::linear_token_logprobs_forward_finish(stats.data_ptr<float>(), best.data_ptr<int64_t>(), m, vocab,
                                                rows.labels.data_ptr<int64_t>(), index_ptr(rows), fp(lp), fp(lse),
                                                with_entropy ? fp(ent) : nullptr, with_extras ? fp(mean) : nullptr,
                                                with_extras ? top1.data_ptr<bool>() : nullptr, stream),
        op);
  return {lp, lse, ent, mean, top1};
}

Tensor3 linear_token_logprobs_bwd(const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                                  const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                                  const Tensor& labels, const Tensor& lse, const Tensor& entropy, double logit_scale,
                                  double softcap, double temperature, int64_t ignore_index,
                                  std::array<bool, 3> output_mask) {
  Args a("linear_token_logprobs_bwd", {{"hidden", &hidden}, {"weight", &weight}, {"labels", &labels},
                                       {"grad_logprobs", &grad_logprobs}, {"lse", &lse}, {"entropy", &entropy}});
  a.optional("grad_entropy", grad_entropy);
  a.optional("bias", bias);
  const char* op = "linear_token_logprobs_bwd";
  check_inputs(a, op, hidden, weight, bias, labels, logit_scale, softcap, temperature);
  const int64_t n = hidden.size(0), width = hidden.size(1), vocab = weight.size(0);
  a.floating("grad_logprobs", grad_logprobs);
  a.numel("grad_logprobs", grad_logprobs, n);
  a.floating("lse", lse);
  a.numel("lse", lse, n);
  const bool with_ent = given(grad_entropy);
  if (with_ent) {
    a.floating("grad_entropy", *grad_entropy);
    a.numel("grad_entropy", *grad_entropy, n);
    a.floating("entropy", entropy);
    a.numel("entropy", entropy, n);
  }
  const bool has_bias = given(bias);
  const bool need_h = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && has_bias;
  // A gradient not asked for is an empty tensor, as the CPU op.
  Tensor grad_h = at::empty({0}, hidden.options());
  Tensor grad_w = at::empty({0}, weight.options());
  Tensor grad_b = at::empty({0}, hidden.options());
  if (!(need_h || need_w || need_b)) return {grad_h, grad_w, grad_b};
  const ValidRows rows = valid_rows(op, labels, ignore_index, vocab);
  const int64_t m = rows.count;
  if (m == 0) {  // nothing is projected: zero gradients
    if (need_h) grad_h = at::zeros({n, width}, hidden.options());
    if (need_w) grad_w = at::zeros({vocab, width}, weight.options());
    if (need_b) grad_b = at::zeros({vocab}, bias->options());
    return {grad_h, grad_w, grad_b};
  }

  // bf16/fp16: the gradient GEMMs take dL/dy rounded to the input dtype (fp32 accumulation and result).
  const bool low = hidden.scalar_type() != at::kFloat;
  const auto fopt = hidden.options().dtype(at::kFloat);
  const Tensor hv = gather(hidden, rows);  // [M, H], hidden's dtype
  // Per-row inputs of the valid rows (the upstream gradients of ignored rows are never read).
  const Tensor g_lp = f32(gather(grad_logprobs, rows));
  const Tensor row_lse = f32(gather(lse, rows));
  Tensor g_ent, row_ent;
  if (with_ent) {
    g_ent = f32(gather(*grad_entropy, rows));
    row_ent = f32(gather(entropy, rows));
  }
  const Tensor bias32 = has_bias ? f32(*bias) : Tensor();
  const int64_t cols = tile_cols(m, width, vocab);
  Tensor buf = at::empty({m * cols}, fopt);
  Tensor buf_low = low && (need_h || need_w) ? at::empty({m * cols}, hidden.options()) : Tensor();
  // The fp32 dL/dy is the GEMM operand for fp32 inputs; for bf16/fp16 only the bias sums read it.
  const bool keep_f32 = !low || need_b;

  // fp32 accumulators and scratch: the hidden gradient of the valid rows (grad_h itself when it is fp32
  // and every row is valid), its per-tile product for bf16/fp16 (row chunks, at most kTileBytes), one
  // tile of the weight gradient for bf16/fp16, the bias gradient.
  const bool direct_h = need_h && !low && m == n;
  if (need_h) grad_h = direct_h ? at::empty({n, width}, hidden.options()) : Tensor();
  Tensor gh32 = direct_h ? grad_h : (need_h ? at::empty({m, width}, fopt) : Tensor());
  const int64_t chunk = std::clamp<int64_t>(kTileBytes / int64_t{4} / std::max<int64_t>(width, 1), 1, m);
  Tensor gh_scratch = need_h && low ? at::empty({chunk, width}, fopt) : Tensor();
  if (need_w) grad_w = at::empty({vocab, width}, weight.options());
  Tensor gw_scratch = need_w && low ? at::empty({cols, width}, fopt) : Tensor();
  if (need_b) grad_b = at::empty({vocab}, bias->options());
  Tensor gb32 = need_b ? (bias->scalar_type() == at::kFloat ? grad_b : at::empty({vocab}, fopt)) : Tensor();

  void* stream = a.stream();
  for (int64_t v0 = 0; v0 < vocab; v0 += cols) {
    const int64_t nv = std::min(cols, vocab - v0);
    const Tensor w = weight.narrow(0, v0, nv);  // [nv, H]
    Tensor y = tile_view(buf, m, nv);
    mm_f32(y, hv, w.t());
    Tensor y_low = buf_low.defined() ? tile_view(buf_low, m, nv) : Tensor();
    check(L::linear_token_logprobs_backward(y.data_ptr<float>(), y_low.defined() ? y_low.data_ptr() : nullptr,
                                            dtype_code(hidden), m, nv, v0,
                                            has_bias ? bias32.data_ptr<float>() + v0 : nullptr,
                                            rows.labels.data_ptr<int64_t>(), row_lse.data_ptr<float>(),
                                            with_ent ? row_ent.data_ptr<float>() : nullptr, g_lp.data_ptr<float>(),
                                            with_ent ? g_ent.data_ptr<float>() : nullptr, logit_scale, softcap,
                                            temperature, keep_f32, stream),
          op);
    const Tensor& g = low ? y_low : y;  // dL/dy, the GEMM operand
    if (need_h) {
      if (v0 == 0) {
        mm_f32(gh32, g, w);
      } else if (!low) {
        gh32.addmm_(g, w);
      } else {
        for (int64_t r0 = 0; r0 < m; r0 += chunk) {
          const int64_t nr = std::min(chunk, m - r0);
          Tensor part = gh_scratch.narrow(0, 0, nr);
          mm_f32(part, g.narrow(0, r0, nr), w);
          gh32.narrow(0, r0, nr).add_(part);
        }
      }
    }
    if (need_w) {
      Tensor gw = grad_w.narrow(0, v0, nv);
      if (!low) {
        mm_f32(gw, g.t(), hv);
      } else {
        Tensor part = gw_scratch.narrow(0, 0, nv);
        mm_f32(part, g.t(), hv);
        gw.copy_(part);
      }
    }
    if (need_b) {
      Tensor cs = gb32.narrow(0, v0, nv);
      at::sum_out(cs, y, {0});
    }
  }
  if (need_h && !direct_h) {
    const Tensor gh = gh32.to(hidden.scalar_type());
    if (rows.index.defined()) {
      grad_h = at::zeros({n, width}, hidden.options());
      grad_h.index_copy_(0, rows.index, gh);
    } else {
      grad_h = gh;
    }
  }
  if (need_b && !gb32.is_same(grad_b)) grad_b.copy_(gb32);
  return {grad_h, grad_w, grad_b};
}

}  // namespace cuda
}  // namespace rlhf_kernels

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("linear_token_logprobs_fwd", &rlhf_kernels::cuda::linear_token_logprobs_fwd);
  m.impl("linear_token_logprobs_bwd", &rlhf_kernels::cuda::linear_token_logprobs_bwd);
}

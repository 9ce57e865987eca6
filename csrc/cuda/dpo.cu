// CUDA dpo_loss: elementwise grid-stride kernels over the losses of rlhf_kernels/math.h.
#include <cuda_runtime.h>

#include "rlhf_kernels/cuda_launch.h"
#include "rlhf_kernels/cuda_utils.cuh"
#include "rlhf_kernels/math.h"

namespace rlhf_kernels {
namespace {

using namespace cuda_utils;

__global__ void dpo_fwd_kernel(const float* __restrict__ pc, const float* __restrict__ pr, const float* __restrict__ rc,
                               const float* __restrict__ rr, int64_t n, float beta, int type, float ls,
                               float* __restrict__ losses, float* __restrict__ cr, float* __restrict__ rj) {
  RK_GRID_STRIDE(i, n) {
    const float chosen = pc[i] - rc[i], rejected = pr[i] - rr[i];
    losses[i] = dpo_pair(chosen - rejected, beta, type, ls).loss;
    cr[i] = beta * chosen;
    rj[i] = beta * rejected;
  }
}

__global__ void dpo_bwd_kernel(const float* __restrict__ g, const float* __restrict__ pc, const float* __restrict__ pr,
                               const float* __restrict__ rc, const float* __restrict__ rr, int64_t n, float beta,
                               int type, float ls, float* __restrict__ gpc, float* __restrict__ gpr,
                               float* __restrict__ grc, float* __restrict__ grr) {
  RK_GRID_STRIDE(i, n) {
    const float d = g[i] * dpo_pair((pc[i] - rc[i]) - (pr[i] - rr[i]), beta, type, ls).d_h;
    gpc[i] = d; gpr[i] = -d; grc[i] = -d; grr[i] = d;
  }
}

}  // namespace

namespace cuda_launch {

int dpo_loss_forward(const float* pc, const float* pr, const float* rc, const float* rr, int64_t n, float beta, int type,
                     float ls, float* losses, float* cr, float* rj, void* stream) {
  if (n == 0) return 0;
  dpo_fwd_kernel<<<grid_for(n), kThreads, 0, RK_STREAM>>>(pc, pr, rc, rr, n, beta, type, ls, losses, cr, rj);
  return last_error();
}

int dpo_loss_backward(const float* g, const float* pc, const float* pr, const float* rc, const float* rr, int64_t n, float beta,
                      int type, float ls, float* gpc, float* gpr, float* grc, float* grr, void* stream) {
  if (n == 0) return 0;
  dpo_bwd_kernel<<<grid_for(n), kThreads, 0, RK_STREAM>>>(g, pc, pr, rc, rr, n, beta, type, ls, gpc, gpr, grc, grr);
  return last_error();
}

}  // namespace cuda_launch
}  // namespace rlhf_kernels

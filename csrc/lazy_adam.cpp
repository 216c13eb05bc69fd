// Adam on a few rows of a large table, in place, on CPU (the lazy Adam of the bag-of-words table).
//
//   xmc::lazy_adam_rows(weight [R,w], exp_avg [R,w], exp_avg_sq [R,w], row_steps [R] int64, ids [u] int64,
//                       grads [u,w], lr, beta1, beta2, eps) -> ()
//     for each distinct id in ids (with its gradient row): step = ++row_steps[id], then torch's Adam
//     arithmetic (the fused kernel's) on row id of weight and its moments with that row's own step.
//
// Why: a step of the bag touches a few thousand of the table's rows. Gathering them into buffers, one
// fused Adam call and scattering them back streams each of the three tables' rows through memory
// twice more than the update itself; measured as a fifth of a training step of the BoW recipe on two
// ranks. Here each row is read and written once, rows spread over the intra-op threads (ids are
// distinct, so no two threads touch one row).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "cpu_common.h"

namespace {

using at::Tensor;

// The step's constants, rounded to float from double as torch's fused Adam does (1 - beta2 taken in
// float32 would differ from torch's by 1.3e-5 relative at beta2 = 0.999).
XMC_CLONES void adam_row(float* w, float* m, float* v, const float* g, int64_t n, float one_minus_beta1,
                         float beta2, float one_minus_beta2, float step_size, float bias_correction2_sqrt,
                         float eps) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float gj = g[j];
    const float mj = m[j] + one_minus_beta1 * (gj - m[j]);  // lerp, as torch's fused Adam
    const float vj = beta2 * v[j] + one_minus_beta2 * (gj * gj);
    m[j] = mj;
    v[j] = vj;
    w[j] -= step_size * mj / (std::sqrt(vj) / bias_correction2_sqrt + eps);
  }
}

void lazy_adam_rows(const Tensor& weight, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& row_steps,
                    const Tensor& ids, const Tensor& grads, double lr, double beta1, double beta2, double eps) {
  const int64_t R = weight.size(0), w = weight.dim() == 2 ? weight.size(1) : -1, u = ids.numel();
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "weight must be a contiguous float32 [R, w] table");
  for (const Tensor* t : {&exp_avg, &exp_avg_sq})
    TORCH_CHECK(t->sizes() == weight.sizes() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "the moments must be contiguous float32 tables shaped like weight");
  TORCH_CHECK(row_steps.numel() == R && row_steps.scalar_type() == at::kLong && row_steps.is_contiguous(),
              "row_steps must be int64 [", R, "]");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "ids must be int64 [u]");
  TORCH_CHECK(grads.dim() == 2 && grads.size(0) == u && grads.size(1) == w && grads.scalar_type() == at::kFloat,
              "grads must be float32 [", u, ", ", w, "], got ", grads.sizes());
  for (const Tensor* t : {&weight, &exp_avg, &exp_avg_sq, &row_steps, &ids, &grads})
    TORCH_CHECK(t->device().is_cpu(), "lazy_adam_rows runs on CPU tensors");
  const Tensor g = grads.contiguous(), idx = ids.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < u; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < R, "row id ", ip[i], " outside [0, ", R, ")");
  int64_t* steps = row_steps.data_ptr<int64_t>();
  float *wp = weight.data_ptr<float>(), *mp = exp_avg.data_ptr<float>(), *vp = exp_avg_sq.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  at::parallel_for(0, u, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = ip[i];
      const double step = static_cast<double>(++steps[r]);
      const double bias_correction1 = 1.0 - std::pow(beta1, step);
      const double bias_correction2 = 1.0 - std::pow(beta2, step);
      adam_row(wp + r * w, mp + r * w, vp + r * w, gp + i * w, w, static_cast<float>(1.0 - beta1),
               static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(lr / bias_correction1),
               static_cast<float>(std::sqrt(bias_correction2)), static_cast<float>(eps));
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xmc, m) {
  m.def(
      "lazy_adam_rows(Tensor(a!) weight, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) row_steps, "
      "Tensor ids, Tensor grads, float lr, float beta1, float beta2, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(xmc, CPU, m) { m.impl("lazy_adam_rows", &lazy_adam_rows); }

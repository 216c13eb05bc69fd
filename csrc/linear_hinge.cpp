// A linear layer followed by the squared hinge loss over its outputs, by chunks of outputs (labels), on
// CPU, with a sparse gradient.
//
//   xmc::linear_hinge_forward(x [N,k], weight [C,k], bias [C]?, target_indptr [N+1], target_cols, chunk)
//     -> (row_loss [N], offsets [nchunks+1], grad_rows [nnz], grad_cols [nnz], grad_vals [nnz])
//     z = x W^T + b; row_loss[n] = sum over labels c of max(0, 1 - s z[n,c])^2 with s = +1 for the
//     targets of row n (target_cols[target_indptr[n] .. target_indptr[n+1]), distinct, ascending) and
//     -1 otherwise. The gradient d row_loss[n] / d z[n,c] = -2 s max(0, 1 - s z) is nonzero only where
//     the margin is violated; those entries come out as triplets (int32 row, int32 label, float32
//     value), grouped by chunk (chunk i's entries are offsets[i] .. offsets[i+1]).
//   xmc::linear_hinge_backward(offsets, grad_rows, grad_cols, grad_vals, scale [N], x, weight, with_bias,
//                              chunk)
//     -> (grad_x [N,k], grad_weight [C,k], grad_bias [C] (empty without bias)) of
//     sum_n scale[n] row_loss[n].
//
// Why: a trained classifier puts almost every non-target logit below -1, where the squared hinge is
// flat (measured on the Debian package set: 1-3% of the entries violate the margin after the first
// few dozen steps). The dense path multiplies two [N, C] x [C, k] products by a gradient that is ~98%
// zeros, and streams the [N, C] logits and their gradient through memory several times. Here the
// logits of a chunk are made and read while they are in cache and never stored; the backward costs
// O(nnz k) instead of O(N C k). The forward product is what remains (a third of the dense step's
// arithmetic).
//
// Chunks are spread over the intra-op threads; the ATen product inside runs single-threaded there.
// In the backward each chunk owns its rows of grad_weight (no races); grad_x is accumulated per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_common.h"

namespace {

using at::Tensor;

struct Entries {  // one chunk's violated entries
  std::vector<int32_t> rows, cols;
  std::vector<float> vals;
};

// Squared hinge of one row of a chunk: row[j] = z (bias added here), targets at local positions
// tgt[0..nt) (ascending, inside the chunk). Returns the row's loss; appends the violated entries.
XMC_CLONES double hinge_row(float* row, const float* bias, int64_t cc, const int64_t* tgt, int64_t nt,
                            int32_t n, int32_t c0, Entries& out) {
  double loss = 0.0;
  for (int64_t t = 0; t < nt; ++t) {  // targets first, then hidden from the non-target pass
    const int64_t j = tgt[t];
    const float z = row[j] + (bias != nullptr ? bias[j] : 0.0f);
    const float m = 1.0f - z;
    if (m > 0.0f) {
      loss += static_cast<double>(m) * m;
      out.rows.push_back(n);
      out.cols.push_back(c0 + static_cast<int32_t>(j));
      out.vals.push_back(-2.0f * m);
    }
    row[j] = -INFINITY;
  }
  float sum = 0.0f;
  if (bias != nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cc; ++j) {
      row[j] += bias[j] + 1.0f;
      const float v = row[j] > 0.0f ? row[j] : 0.0f;
      sum += v * v;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cc; ++j) {
      row[j] += 1.0f;
      const float v = row[j] > 0.0f ? row[j] : 0.0f;
      sum += v * v;
    }
  }
  for (int64_t j = 0; j < cc; ++j) {
    if (row[j] > 0.0f) {
      out.rows.push_back(n);
      out.cols.push_back(c0 + static_cast<int32_t>(j));
      out.vals.push_back(2.0f * row[j]);
    }
  }
  return loss + sum;
}

// row += s * v over k floats.
XMC_CLONES void axpy(float* row, float s, const float* v, int64_t k) {
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) row[i] += s * v[i];
}

int64_t num_chunks(int64_t C, int64_t chunk) { return (C + chunk - 1) / chunk; }

void check_inputs(const Tensor& x, const Tensor& weight, int64_t chunk) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "x [N, k] and weight [C, k] must be 2-D, got ", x.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1), " features but weight has ", weight.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "x and weight must be float32, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "x and weight must be CPU tensors");
  TORCH_CHECK(chunk >= 1, "chunk must be >= 1, got ", chunk);
  TORCH_CHECK(weight.size(0) < INT32_MAX && x.size(0) < INT32_MAX, "N and C must fit int32");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward(const Tensor& x_in, const Tensor& weight_in,
                                                           const std::optional<Tensor>& bias_in,
                                                           const Tensor& target_indptr_in,
                                                           const Tensor& target_cols_in, int64_t chunk) {
  check_inputs(x_in, weight_in, chunk);
  // detached: the ATen calls below must not meet autograd (the Python Function owns the graph)
  const Tensor x = x_in.detach().contiguous(), weight = weight_in.detach().contiguous();
  const int64_t N = x.size(0), C = weight.size(0), nchunks = num_chunks(C, chunk);
  Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == C, "bias must be [", C, "], got ", bias_in->sizes());
    bias = bias_in->detach().to(at::kFloat).contiguous();
  }
  const Tensor indptr = target_indptr_in.to(at::kLong).contiguous();
  const Tensor cols = target_cols_in.to(at::kLong).contiguous();
  TORCH_CHECK(indptr.dim() == 1 && indptr.numel() == N + 1, "target_indptr must be [", N + 1, "], got ",
              indptr.sizes());
  const int64_t* ip = indptr.data_ptr<int64_t>();
  const int64_t* tc = cols.data_ptr<int64_t>();
  TORCH_CHECK(ip[0] == 0 && ip[N] == cols.numel(), "target_indptr does not describe target_cols");
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(ip[n] <= ip[n + 1], "target_indptr must be non-decreasing");
    for (int64_t t = ip[n]; t < ip[n + 1]; ++t) {
      TORCH_CHECK(tc[t] >= 0 && tc[t] < C, "target label ", tc[t], " of row ", n, " is outside [0, ", C, ")");
      TORCH_CHECK(t == ip[n] || tc[t - 1] < tc[t], "the targets of row ", n, " must be distinct and ascending");
    }
  }

  Tensor row_loss_parts = at::zeros({nchunks, N}, x.options().dtype(at::kDouble));
  std::vector<Entries> entries(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> local;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c0 = i * chunk, cc = std::min(chunk, C - c0);
      Tensor z = at::mm(x, weight.narrow(0, c0, cc).t());  // [N, cc], in cache
      float* zp = z.data_ptr<float>();
      double* loss = row_loss_parts.data_ptr<double>() + i * N;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t* lo = std::lower_bound(tc + ip[n], tc + ip[n + 1], c0);
        const int64_t* hi = std::lower_bound(lo, tc + ip[n + 1], c0 + cc);
        local.assign(lo, hi);
        for (auto& t : local) t -= c0;
        loss[n] = hinge_row(zp + n * cc, bias.defined() ? bias.data_ptr<float>() + c0 : nullptr, cc,
                            local.data(), static_cast<int64_t>(local.size()), static_cast<int32_t>(n),
                            static_cast<int32_t>(c0), entries[i]);
      }
    }
  });

  Tensor offsets = at::empty({nchunks + 1}, x.options().dtype(at::kLong));
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t i = 0; i < nchunks; ++i) off[i + 1] = off[i] + static_cast<int64_t>(entries[i].vals.size());
  const int64_t nnz = off[nchunks];
  Tensor grad_rows = at::empty({nnz}, x.options().dtype(at::kInt));
  Tensor grad_cols = at::empty({nnz}, x.options().dtype(at::kInt));
  Tensor grad_vals = at::empty({nnz}, x.options());
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Entries& e = entries[i];
      std::copy(e.rows.begin(), e.rows.end(), grad_rows.data_ptr<int32_t>() + off[i]);
      std::copy(e.cols.begin(), e.cols.end(), grad_cols.data_ptr<int32_t>() + off[i]);
      std::copy(e.vals.begin(), e.vals.end(), grad_vals.data_ptr<float>() + off[i]);
      e = Entries();
    }
  });
  return {row_loss_parts.sum(0).to(at::kFloat), offsets, grad_rows, grad_cols, grad_vals};
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& offsets, const Tensor& grad_rows,
                                            const Tensor& grad_cols, const Tensor& grad_vals,
                                            const Tensor& scale_in, const Tensor& x_in, const Tensor& weight_in,
                                            bool with_bias, int64_t chunk) {
  check_inputs(x_in, weight_in, chunk);
  const Tensor x = x_in.detach().contiguous(), weight = weight_in.detach().contiguous();
  const int64_t N = x.size(0), C = weight.size(0), k = x.size(1), nchunks = num_chunks(C, chunk);
  TORCH_CHECK(offsets.numel() == nchunks + 1 && offsets.scalar_type() == at::kLong, "offsets must be [",
              nchunks + 1, "] int64 from linear_hinge_forward with the same chunk");
  const int64_t nnz = grad_vals.numel();
  TORCH_CHECK(grad_rows.numel() == nnz && grad_cols.numel() == nnz && grad_rows.scalar_type() == at::kInt &&
                  grad_cols.scalar_type() == at::kInt && grad_vals.scalar_type() == at::kFloat,
              "grad_rows, grad_cols (int32) and grad_vals (float32) must be linear_hinge_forward's");
  TORCH_CHECK(scale_in.numel() == N, "scale must be [", N, "], got ", scale_in.sizes());
  const Tensor scale = scale_in.to(at::kFloat).contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[nchunks] == nnz, "offsets do not describe the entries");
  Tensor grad_weight = at::zeros_like(weight);
  Tensor grad_bias = at::zeros({with_bias ? C : 0}, weight.options());
  Tensor grad_x_parts = at::zeros({at::get_num_threads(), N, k}, x.options());
  const int32_t* gr = grad_rows.data_ptr<int32_t>();
  const int32_t* gc = grad_cols.data_ptr<int32_t>();
  const float* gv = grad_vals.data_ptr<float>();
  const float *sp = scale.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *gwp = grad_weight.data_ptr<float>(), *gbp = with_bias ? grad_bias.data_ptr<float>() : nullptr;
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    float* gx = grad_x_parts.data_ptr<float>() + at::get_thread_num() * N * k;
    const int64_t c_lo = begin * chunk, c_hi = std::min(end * chunk, C);  // this thread's rows
    for (int64_t e = off[begin]; e < off[end]; ++e) {
      const int64_t n = gr[e], c = gc[e];
      TORCH_CHECK(n >= 0 && n < N && c >= c_lo && c < c_hi, "entry ", e, " (", n, ", ", c,
                  ") is not in its chunk's rows");
      const float s = gv[e] * sp[n];
      if (s == 0.0f) continue;
      if (gbp != nullptr) gbp[c] += s;
      axpy(gwp + c * k, s, xp + n * k, k);
      axpy(gx + n * k, s, wp + c * k, k);
    }
  });
  return {grad_x_parts.sum(0), grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xmc, m) {
  m.def(
      "linear_hinge_forward(Tensor x, Tensor weight, Tensor? bias, Tensor target_indptr, Tensor target_cols, "
      "int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_hinge_backward(Tensor offsets, Tensor grad_rows, Tensor grad_cols, Tensor grad_vals, "
      "Tensor scale, Tensor x, Tensor weight, bool with_bias, int chunk) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(xmc, CPU, m) {
  m.impl("linear_hinge_forward", &forward);
  m.impl("linear_hinge_backward", &backward);
}

// A linear layer followed by a softmax over its outputs, by chunks of outputs (labels), on CPU.
//
//   xmc::linear_softmax_forward(x [N,k], weight [C,k], bias [C]?, chunk) -> (exps, chunk_max, chunk_sum)
//     chunk i covers labels [i*chunk, min((i+1)*chunk, C)) and is written as one contiguous [N, cc]
//     block of `exps` (flat, N*C): exp(z - chunk_max[:, i]) with z = x W_i^T + b_i;
//     chunk_max, chunk_sum [N, nchunks]: the row maximum of z over the chunk and the sum of the block.
//   xmc::linear_softmax_backward(exps, scale [N,nchunks], x, weight, with_bias, chunk)
//     -> (grad_x [N,k], grad_weight [C,k], grad_bias [C] (empty without bias)) of the dense part of the
//     gradient, G_i = exps_i * scale[:, i] (formed in place in `exps`, which is consumed).
//
// Why: with C in the hundreds of thousands the [N, C] logits are far larger than the caches, and the
// unfused path (GEMM, bias, max, exp, sum, scale, two GEMMs, column sum) streams them through memory
// about ten times. Here each chunk is produced and consumed while it is in the core's cache, and the
// logits are written once and read once. The softmax normaliser across chunks and ranks, the loss
// value and the sparse target correction are left to Python (pipeline/ops/linear_softmax.py): they
// touch [N, nchunks] numbers and the target pairs only.
//
// Chunks are spread over the intra-op threads; the ATen calls inside run single-threaded there
// (nested parallelism is inlined and MKL runs sequentially inside an OpenMP region), so each thread
// runs whole-chunk GEMMs at full single-core speed. Each thread accumulates its own grad_x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define XMC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define XMC_CLONES
#endif

namespace {

using at::Tensor;

// exp(v) for v <= 0 in float32, vectorisable (no calls, no branches): v = n ln2 + r with |r| <= ln2/2,
// exp(r) by its Taylor polynomial of degree 7 (truncation < 3e-9 relative, below float rounding),
// 2^n by building the exponent bits. v below -87 gives exp(-87) ~ 1.6e-38 instead of a denormal:
// nothing against the row's sum of at least 1.
inline float exp_nonpositive(float v) {
  v = v < -87.0f ? -87.0f : v;
  const float n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = n * -0.693145751953125f + v;                                     // ln2, high part (exact)
  r = n * -1.42860682030941723212e-6f + r;                                   // ln2, low part
  float p = 1.98412698412698413e-4f;                                        // 1/7!
  p = p * r + 1.38888888888888889e-3f;
  p = p * r + 8.33333333333333333e-3f;
  p = p * r + 4.16666666666666667e-2f;
  p = p * r + 1.66666666666666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// One chunk's block z [N, cc] of logits in place: z += bias (if any), then per row m = max z,
// z = exp(z - m), sum = sum z; m and sum go to row_max[n * stride], row_sum[n * stride]. Two passes
// over each row, which is in L1 for the second.
XMC_CLONES void exp_rows(float* z, const float* bias, int64_t N, int64_t cc, float* row_max, float* row_sum,
                         int64_t stride) {
  for (int64_t n = 0; n < N; ++n) {
    float* row = z + n * cc;
    float m = -INFINITY;
    if (bias != nullptr) {
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < cc; ++j) {
        row[j] += bias[j];
        m = row[j] > m ? row[j] : m;
      }
    } else {
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < cc; ++j) m = row[j] > m ? row[j] : m;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cc; ++j) {
      row[j] = exp_nonpositive(row[j] - m);
      sum += row[j];
    }
    row_max[n * stride] = m;
    row_sum[n * stride] = sum;
  }
}

int64_t num_chunks(int64_t C, int64_t chunk) { return (C + chunk - 1) / chunk; }

void check_inputs(const Tensor& x, const Tensor& weight, int64_t chunk) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "x [N, k] and weight [C, k] must be 2-D, got ", x.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1), " features but weight has ", weight.size(1));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x (", x.scalar_type(), ") and weight (",
              weight.scalar_type(), ") must have one dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x and weight must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "x and weight must be CPU tensors");
  TORCH_CHECK(chunk >= 1, "chunk must be >= 1, got ", chunk);
}

// The [N, cc] block of chunk i inside the flat buffer.
Tensor block(const Tensor& flat, int64_t N, int64_t c0, int64_t cc) {
  return flat.narrow(0, N * c0, N * cc).view({N, cc});
}

std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& x_in, const Tensor& weight_in,
                                           const std::optional<Tensor>& bias_in, int64_t chunk) {
  check_inputs(x_in, weight_in, chunk);
  // detached: the ATen calls below must not meet autograd (the Python Function owns the graph)
  const Tensor x = x_in.detach().contiguous(), weight = weight_in.detach().contiguous();
  const int64_t N = x.size(0), C = weight.size(0), nchunks = num_chunks(C, chunk);
  Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == C, "bias must be [", C, "], got ", bias_in->sizes());
    bias = bias_in->detach().to(at::kFloat).contiguous();
  }
  Tensor exps = at::empty({N * C}, x.options());
  Tensor chunk_max = at::empty({N, nchunks}, x.options());
  Tensor chunk_sum = at::empty({N, nchunks}, x.options());
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c0 = i * chunk, cc = std::min(chunk, C - c0);
      Tensor z = block(exps, N, c0, cc);
      at::mm_out(z, x, weight.narrow(0, c0, cc).t());
      exp_rows(z.data_ptr<float>(), bias.defined() ? bias.data_ptr<float>() + c0 : nullptr, N, cc,
               chunk_max.data_ptr<float>() + i, chunk_sum.data_ptr<float>() + i, nchunks);
    }
  });
  return {exps, chunk_max, chunk_sum};
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& exps, const Tensor& scale, const Tensor& x_in,
                                            const Tensor& weight_in, bool with_bias, int64_t chunk) {
  check_inputs(x_in, weight_in, chunk);
  // detached: the ATen calls below must not meet autograd (the Python Function owns the graph)
  const Tensor x = x_in.detach().contiguous(), weight = weight_in.detach().contiguous();
  const int64_t N = x.size(0), C = weight.size(0), nchunks = num_chunks(C, chunk);
  TORCH_CHECK(exps.dim() == 1 && exps.numel() == N * C && exps.is_contiguous(), "exps must be the flat [",
              N * C, "] buffer of linear_softmax_forward");
  TORCH_CHECK(scale.sizes() == at::IntArrayRef({N, nchunks}), "scale must be [", N, ", ", nchunks, "], got ",
              scale.sizes());
  const Tensor scale_f = scale.to(exps.scalar_type());
  Tensor grad_weight = at::empty_like(weight);
  Tensor grad_bias = with_bias ? at::empty({C}, weight.options()) : at::empty({0}, weight.options());
  Tensor grad_x_parts = at::zeros({at::get_num_threads(), N, x.size(1)}, x.options());
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    Tensor grad_x = grad_x_parts.select(0, at::get_thread_num());
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c0 = i * chunk, cc = std::min(chunk, C - c0);
      Tensor g = block(exps, N, c0, cc).mul_(scale_f.select(1, i).unsqueeze(1));
      if (with_bias) {
        Tensor grad_b = grad_bias.narrow(0, c0, cc);
        at::sum_out(grad_b, g, 0);
      }
      Tensor grad_w = grad_weight.narrow(0, c0, cc);
      at::mm_out(grad_w, g.t(), x);
      grad_x.addmm_(g, weight.narrow(0, c0, cc));
    }
  });
  return {grad_x_parts.sum(0), grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xmc, m) {
  m.def("linear_softmax_forward(Tensor x, Tensor weight, Tensor? bias, int chunk) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_softmax_backward(Tensor(a!) exps, Tensor scale, Tensor x, Tensor weight, bool with_bias, "
      "int chunk) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(xmc, CPU, m) {
  m.impl("linear_softmax_forward", &forward);
  m.impl("linear_softmax_backward", &backward);
}

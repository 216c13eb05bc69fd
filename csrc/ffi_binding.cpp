// Torch operators of the fixed fan-in (FFI) sparse layer: schema, argument checks, output allocation,
// dispatch to the CPU kernels (ffi_cpu.h) and, when built with XMC_WITH_CUDA, the CUDA launchers
// (ffi_cuda.h). The kernels themselves never see torch types.
//
//   xmc::ffi_forward(x [N,H], values [C,K], indices [C,K] int32, bias [C]?) -> y [N,C]
//   xmc::ffi_backward_input(grad_y [N,C], values [C,K], indices [C,K], in_features H) -> grad_x [N,H]
//   xmc::ffi_backward_weight(grad_y [N,C], x [N,H], indices [C,K]) -> grad_values [C,K]
//   xmc::ffi_backward(grad_y [N,C], x [N,H], values [C,K], indices [C,K], need_input, need_weight)
//       -> (grad_x [N,H], grad_values [C,K]); a gradient not asked for is an undefined tensor (None in
//       Python). CUDA with both: one fused pass over dy and the connections; CPU: the two kernels.
//   Group-shared fan-in (labels in groups of G share one index row; Q = ceil(C / G), label c in group c / G):
//   xmc::ffi_group_forward(x [N,H], values [C,K], indices [Q,K] int32, bias [C]?, group_size G) -> y [N,C]
//   xmc::ffi_group_backward(grad_y [N,C], x [N,H], values [C,K], indices [Q,K], group_size G, need_input,
//       need_weight) -> (grad_x [N,H], grad_values [C,K]), undefined where not asked for (as ffi_backward).
//
// Outputs have the dtype of x / grad_y; values and bias must share it. CPU: float32, bfloat16, float64
// (index range checked on every call, it costs one pass over the indices). CUDA: float32, bfloat16
// (index range not checked per call: it would synchronise the stream; the module checks on creation).
// The group ops check indices.size(0) == ceil(C / group_size) and group_size >= 1; their CUDA kernels
// (ffi_group_cuda.h) are registered when the build found them (XMC_WITH_GROUP_CUDA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "ffi_cpu.h"
#include "ffi_group_cpu.h"

#ifdef XMC_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "ffi_cuda.h"
// The group-shared CUDA launchers are compiled in when pipeline/ops/build.py finds their sources.
#ifdef XMC_WITH_GROUP_CUDA
#include "ffi_group_cuda.h"
#endif
#endif

namespace {

using at::Tensor;

void check_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be a 2-D tensor, got shape ", t.sizes());
}

void check_same_device(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " is on ", a.device(), " but ", b_name, " is on ", b.device());
}

void check_same_dtype(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), b_name, " must have the dtype of ", a_name, " (",
              a.scalar_type(), "), got ", b.scalar_type());
}

// values [C,K] and indices [C,K] int32 of one layer.
void check_connections(const Tensor& values, const Tensor& indices) {
  check_matrix(values, "values");
  check_matrix(indices, "indices");
  TORCH_CHECK(indices.scalar_type() == at::kInt, "indices must be int32, got ", indices.scalar_type());
  TORCH_CHECK(values.sizes() == indices.sizes(), "values ", values.sizes(), " and indices ", indices.sizes(),
              " must have the same shape [out_features, fan_in]");
  check_same_device(values, "values", indices, "indices");
}

// Every index inside [0, H), on CPU tensors (one parallel pass).
void check_index_range_cpu(const Tensor& indices, int64_t H) {
  const int64_t bad = xmc::ffi_count_invalid_indices_cpu(indices.data_ptr<int32_t>(), indices.numel(), H,
                                                         at::get_num_threads());
  TORCH_CHECK(bad == 0, "indices: ", bad, " entries outside [0, in_features=", H, ")");
}

xmc::CpuDtype cpu_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return xmc::CpuDtype::kFloat32;
    case at::kBFloat16:
      return xmc::CpuDtype::kBFloat16;
    case at::kDouble:
      return xmc::CpuDtype::kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, name, " must be float32, bfloat16 or float64 on CPU, got ", t.scalar_type());
  return xmc::CpuDtype::kFloat32;  // not reached
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor here, got ", t.device());
}

// ---- shared shape checks (device independent) ----

void check_forward_args(const Tensor& x, const Tensor& values, const Tensor& indices,
                        const std::optional<Tensor>& bias) {
  check_matrix(x, "x");
  check_connections(values, indices);
  check_same_device(x, "x", values, "values");
  check_same_dtype(x, "x", values, "values");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == values.size(0), "bias must have shape [", values.size(0),
                "], got ", bias->sizes());
    check_same_device(x, "x", *bias, "bias");
    check_same_dtype(x, "x", *bias, "bias");
  }
}

void check_backward_input_args(const Tensor& grad_y, const Tensor& values, const Tensor& indices,
                               int64_t in_features) {
  check_matrix(grad_y, "grad_y");
  check_connections(values, indices);
  check_same_device(grad_y, "grad_y", values, "values");
  check_same_dtype(grad_y, "grad_y", values, "values");
  TORCH_CHECK(grad_y.size(1) == values.size(0), "grad_y has ", grad_y.size(1), " columns but the layer has ",
              values.size(0), " outputs");
  TORCH_CHECK(in_features >= 0, "in_features must be >= 0, got ", in_features);
}

void check_backward_weight_args(const Tensor& grad_y, const Tensor& x, const Tensor& indices) {
  check_matrix(grad_y, "grad_y");
  check_matrix(x, "x");
  check_matrix(indices, "indices");
  TORCH_CHECK(indices.scalar_type() == at::kInt, "indices must be int32, got ", indices.scalar_type());
  check_same_device(grad_y, "grad_y", x, "x");
  check_same_device(grad_y, "grad_y", indices, "indices");
  check_same_dtype(x, "x", grad_y, "grad_y");
  TORCH_CHECK(grad_y.size(0) == x.size(0), "grad_y has ", grad_y.size(0), " rows but x has ", x.size(0));
  TORCH_CHECK(grad_y.size(1) == indices.size(0), "grad_y has ", grad_y.size(1), " columns but the layer has ",
              indices.size(0), " outputs");
}

// ffi_backward: the arguments of both gradients (checked whatever the flags ask for).
void check_backward_args(const Tensor& grad_y, const Tensor& x, const Tensor& values, const Tensor& indices) {
  check_backward_weight_args(grad_y, x, indices);
  check_backward_input_args(grad_y, values, indices, x.size(1));
}

void check_fan_in(int64_t K, int64_t H) {
  TORCH_CHECK(K <= H, "fan_in ", K, " exceeds in_features ", H, ": the K inputs of an output must be distinct");
}

// values [C,K] and indices [ceil(C / G), K] int32 of one group-shared layer.
void check_group_connections(const Tensor& values, const Tensor& indices, int64_t group_size) {
  check_matrix(values, "values");
  check_matrix(indices, "indices");
  TORCH_CHECK(indices.scalar_type() == at::kInt, "indices must be int32, got ", indices.scalar_type());
  TORCH_CHECK(group_size >= 1, "group_size must be >= 1, got ", group_size);
  check_same_device(values, "values", indices, "indices");
  TORCH_CHECK(values.size(1) == indices.size(1), "values ", values.sizes(), " and indices ", indices.sizes(),
              " must have the same number of columns (fan_in)");
  const int64_t C = values.size(0), groups = (C + group_size - 1) / group_size;
  TORCH_CHECK(indices.size(0) == groups, "indices has ", indices.size(0), " rows but ", C,
              " outputs in groups of ", group_size, " make ", groups, " groups (one index row per group)");
}

void check_group_forward_args(const Tensor& x, const Tensor& values, const Tensor& indices,
                              const std::optional<Tensor>& bias, int64_t group_size) {
  check_matrix(x, "x");
  check_group_connections(values, indices, group_size);
  check_same_device(x, "x", values, "values");
  check_same_dtype(x, "x", values, "values");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == values.size(0), "bias must have shape [", values.size(0),
                "], got ", bias->sizes());
    check_same_device(x, "x", *bias, "bias");
    check_same_dtype(x, "x", *bias, "bias");
  }
}

// ffi_group_backward: the arguments of both gradients (checked whatever the flags ask for).
void check_group_backward_args(const Tensor& grad_y, const Tensor& x, const Tensor& values,
                               const Tensor& indices, int64_t group_size) {
  check_matrix(grad_y, "grad_y");
  check_matrix(x, "x");
  check_group_connections(values, indices, group_size);
  check_same_device(grad_y, "grad_y", x, "x");
  check_same_device(grad_y, "grad_y", values, "values");
  check_same_dtype(x, "x", grad_y, "grad_y");
  check_same_dtype(grad_y, "grad_y", values, "values");
  TORCH_CHECK(grad_y.size(0) == x.size(0), "grad_y has ", grad_y.size(0), " rows but x has ", x.size(0));
  TORCH_CHECK(grad_y.size(1) == values.size(0), "grad_y has ", grad_y.size(1), " columns but the layer has ",
              values.size(0), " outputs");
}

// ---- CPU ----

// An uninitialised CPU output. Outputs of kHugeOutputBytes or more (glibc maps such blocks afresh for
// every allocation) are advised as transparent huge pages: the kernels then fault in their output 2 MiB
// at a time instead of 4 KiB (y of a 65,536-label layer at batch 256 is 64 MiB, 16,384 small-page faults,
// which cost more than the forward kernel itself). Only a hint: where THP is off it changes nothing.
constexpr size_t kHugeOutputBytes = size_t(32) << 20;

Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
#ifdef __linux__
  const size_t bytes = t.nbytes();
  if (bytes >= kHugeOutputBytes) {
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1), end = (start + bytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return t;
}

Tensor forward_cpu(const Tensor& x_, const Tensor& values_, const Tensor& indices_,
                   const std::optional<Tensor>& bias_) {
  check_forward_args(x_, values_, indices_, bias_);
  check_cpu(x_, "x");
  const auto dtype = cpu_dtype(x_, "x");
  const Tensor x = x_.contiguous(), values = values_.contiguous(), indices = indices_.contiguous();
  const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
  const int64_t N = x.size(0), H = x.size(1), C = values.size(0), K = values.size(1);
  check_fan_in(K, H);
  check_index_range_cpu(indices, H);
  Tensor y = empty_cpu_output({N, C}, x.options());
  xmc::ffi_forward_cpu(dtype, x.data_ptr(), values.data_ptr(), indices.data_ptr<int32_t>(),
                       bias.defined() ? bias.data_ptr() : nullptr, y.data_ptr(), N, H, C, K,
                       at::get_num_threads());
  return y;
}

Tensor backward_input_cpu(const Tensor& grad_y_, const Tensor& values_, const Tensor& indices_,
                          int64_t in_features) {
  check_backward_input_args(grad_y_, values_, indices_, in_features);
  check_cpu(grad_y_, "grad_y");
  const auto dtype = cpu_dtype(grad_y_, "grad_y");
  const Tensor grad_y = grad_y_.contiguous(), values = values_.contiguous(), indices = indices_.contiguous();
  const int64_t N = grad_y.size(0), H = in_features, C = values.size(0), K = values.size(1);
  check_fan_in(K, H);
  check_index_range_cpu(indices, H);
  Tensor grad_x = empty_cpu_output({N, H}, grad_y.options());
  xmc::ffi_backward_input_cpu(dtype, grad_y.data_ptr(), values.data_ptr(), indices.data_ptr<int32_t>(),
                              grad_x.data_ptr(), N, H, C, K, at::get_num_threads());
  return grad_x;
}

Tensor backward_weight_cpu(const Tensor& grad_y_, const Tensor& x_, const Tensor& indices_) {
  check_backward_weight_args(grad_y_, x_, indices_);
  check_cpu(grad_y_, "grad_y");
  const auto dtype = cpu_dtype(grad_y_, "grad_y");
  const Tensor grad_y = grad_y_.contiguous(), x = x_.contiguous(), indices = indices_.contiguous();
  const int64_t N = grad_y.size(0), H = x.size(1), C = indices.size(0), K = indices.size(1);
  check_fan_in(K, H);
  check_index_range_cpu(indices, H);
  Tensor grad_values = empty_cpu_output({C, K}, grad_y.options());
  xmc::ffi_backward_weight_cpu(dtype, grad_y.data_ptr(), x.data_ptr(), indices.data_ptr<int32_t>(),
                               grad_values.data_ptr(), N, H, C, K, at::get_num_threads());
  return grad_values;
}

std::tuple<Tensor, Tensor> backward_cpu(const Tensor& grad_y_, const Tensor& x_, const Tensor& values_,
                                        const Tensor& indices_, bool need_input, bool need_weight) {
  check_backward_args(grad_y_, x_, values_, indices_);
  check_cpu(grad_y_, "grad_y");
  const auto dtype = cpu_dtype(grad_y_, "grad_y");
  const Tensor grad_y = grad_y_.contiguous(), x = x_.contiguous(), values = values_.contiguous(),
               indices = indices_.contiguous();
  const int64_t N = grad_y.size(0), H = x.size(1), C = values.size(0), K = values.size(1);
  check_fan_in(K, H);
  check_index_range_cpu(indices, H);
  Tensor grad_x, grad_values;
  if (need_input) {
    grad_x = empty_cpu_output({N, H}, grad_y.options());
    xmc::ffi_backward_input_cpu(dtype, grad_y.data_ptr(), values.data_ptr(), indices.data_ptr<int32_t>(),
                                grad_x.data_ptr(), N, H, C, K, at::get_num_threads());
  }
  if (need_weight) {
    grad_values = empty_cpu_output({C, K}, grad_y.options());
    xmc::ffi_backward_weight_cpu(dtype, grad_y.data_ptr(), x.data_ptr(), indices.data_ptr<int32_t>(),
                                 grad_values.data_ptr(), N, H, C, K, at::get_num_threads());
  }
  return {grad_x, grad_values};
}

Tensor group_forward_cpu(const Tensor& x_, const Tensor& values_, const Tensor& indices_,
                         const std::optional<Tensor>& bias_, int64_t group_size) {
  check_group_forward_args(x_, values_, indices_, bias_, group_size);
  check_cpu(x_, "x");
  const auto dtype = cpu_dtype(x_, "x");
  const Tensor x = x_.contiguous(), values = values_.contiguous(), indices = indices_.contiguous();
  const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
  const int64_t N = x.size(0), H = x.size(1), C = values.size(0), K = values.size(1);
  check_fan_in(K, H);
  check_index_range_cpu(indices, H);
  Tensor y = empty_cpu_output({N, C}, x.options());
  xmc::ffi_group_forward_cpu(dtype, x.data_ptr(), values.data_ptr(), indices.data_ptr<int32_t>(),
                             bias.defined() ? bias.data_ptr() : nullptr, y.data_ptr(), N, H, C, K, group_size,
                             at::get_num_threads());
  return y;
}

std::tuple<Tensor, Tensor> group_backward_cpu(const Tensor& grad_y_, const Tensor& x_, const Tensor& values_,
                                              const Tensor& indices_, int64_t group_size, bool need_input,
                                              bool need_weight) {
  check_group_backward_args(grad_y_, x_, values_, indices_, group_size);
  check_cpu(grad_y_, "grad_y");
  const auto dtype = cpu_dtype(grad_y_, "grad_y");
  const Tensor grad_y = grad_y_.contiguous(), x = x_.contiguous(), values = values_.contiguous(),
               indices = indices_.contiguous();
  const int64_t N = grad_y.size(0), H = x.size(1), C = values.size(0), K = values.size(1);
  check_fan_in(K, H);
  check_index_range_cpu(indices, H);
  Tensor grad_x, grad_values;
  if (need_input) {
    grad_x = empty_cpu_output({N, H}, grad_y.options());
    xmc::ffi_group_backward_input_cpu(dtype, grad_y.data_ptr(), values.data_ptr(), indices.data_ptr<int32_t>(),
                                      grad_x.data_ptr(), N, H, C, K, group_size, at::get_num_threads());
  }
  if (need_weight) {
    grad_values = empty_cpu_output({C, K}, grad_y.options());
    xmc::ffi_group_backward_weight_cpu(dtype, grad_y.data_ptr(), x.data_ptr(), indices.data_ptr<int32_t>(),
                                       grad_values.data_ptr(), N, H, C, K, group_size, at::get_num_threads());
  }
  return {grad_x, grad_values};
}

// ---- CUDA ----

#ifdef XMC_WITH_CUDA
xmc::FfiDtype cuda_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return xmc::FfiDtype::kFloat32;
    case at::kBFloat16:
      return xmc::FfiDtype::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, name, " must be float32 or bfloat16 on CUDA, got ", t.scalar_type());
  return xmc::FfiDtype::kFloat32;  // not reached
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cuda(), name, " must be a CUDA tensor here, got ", t.device());
}

Tensor forward_cuda(const Tensor& x_, const Tensor& values_, const Tensor& indices_,
                    const std::optional<Tensor>& bias_) {
  check_forward_args(x_, values_, indices_, bias_);
  check_cuda(x_, "x");
  const auto dtype = cuda_dtype(x_, "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), values = values_.contiguous(), indices = indices_.contiguous();
  const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
  const int64_t N = x.size(0), H = x.size(1), C = values.size(0), K = values.size(1);
  check_fan_in(K, H);
  Tensor y = at::empty({N, C}, x.options());
  if (y.numel() == 0) return y;
  if (K == 0) return bias.defined() ? y.copy_(bias.unsqueeze(0).expand({N, C})) : y.zero_();
  xmc::ffi_forward_cuda(dtype, x.data_ptr(), values.data_ptr(), indices.data_ptr<int32_t>(),
                        bias.defined() ? bias.data_ptr() : nullptr, y.data_ptr(), N, H, C, K,
                        c10::cuda::getCurrentCUDAStream());
  return y;
}

Tensor backward_input_cuda(const Tensor& grad_y_, const Tensor& values_, const Tensor& indices_,
                           int64_t in_features) {
  check_backward_input_args(grad_y_, values_, indices_, in_features);
  check_cuda(grad_y_, "grad_y");
  const auto dtype = cuda_dtype(grad_y_, "grad_y");
  const c10::cuda::CUDAGuard guard(grad_y_.device());
  const Tensor grad_y = grad_y_.contiguous(), values = values_.contiguous(), indices = indices_.contiguous();
  const int64_t N = grad_y.size(0), H = in_features, C = values.size(0), K = values.size(1);
  check_fan_in(K, H);
  Tensor grad_x = at::empty({N, H}, grad_y.options());
  if (grad_x.numel() == 0) return grad_x;
  if (C == 0 || K == 0) return grad_x.zero_();
  const size_t ws_bytes = xmc::ffi_backward_input_cuda_workspace_bytes(N, H, C, K);
  Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, grad_y.options().dtype(at::kByte));
  xmc::ffi_backward_input_cuda(dtype, grad_y.data_ptr(), values.data_ptr(), indices.data_ptr<int32_t>(),
                               grad_x.data_ptr(), ws_bytes ? workspace.data_ptr() : nullptr, N, H, C, K,
                               c10::cuda::getCurrentCUDAStream());
  return grad_x;
}

Tensor backward_weight_cuda(const Tensor& grad_y_, const Tensor& x_, const Tensor& indices_) {
  check_backward_weight_args(grad_y_, x_, indices_);
  check_cuda(grad_y_, "grad_y");
  const auto dtype = cuda_dtype(grad_y_, "grad_y");
  const c10::cuda::CUDAGuard guard(grad_y_.device());
  const Tensor grad_y = grad_y_.contiguous(), x = x_.contiguous(), indices = indices_.contiguous();
  const int64_t N = grad_y.size(0), H = x.size(1), C = indices.size(0), K = indices.size(1);
  check_fan_in(K, H);
  Tensor grad_values = at::empty({C, K}, grad_y.options());
  if (grad_values.numel() == 0) return grad_values;
  if (N == 0) return grad_values.zero_();
  xmc::ffi_backward_weight_cuda(dtype, grad_y.data_ptr(), x.data_ptr(), indices.data_ptr<int32_t>(),
                                grad_values.data_ptr(), N, H, C, K, c10::cuda::getCurrentCUDAStream());
  return grad_values;
}

std::tuple<Tensor, Tensor> backward_cuda(const Tensor& grad_y_, const Tensor& x_, const Tensor& values_,
                                         const Tensor& indices_, bool need_input, bool need_weight) {
  check_backward_args(grad_y_, x_, values_, indices_);
  check_cuda(grad_y_, "grad_y");
  const auto dtype = cuda_dtype(grad_y_, "grad_y");
  const c10::cuda::CUDAGuard guard(grad_y_.device());
  const Tensor grad_y = grad_y_.contiguous(), x = x_.contiguous(), values = values_.contiguous(),
               indices = indices_.contiguous();
  const int64_t N = grad_y.size(0), H = x.size(1), C = values.size(0), K = values.size(1);
  check_fan_in(K, H);
  Tensor grad_x = need_input ? at::empty({N, H}, grad_y.options()) : Tensor();
  Tensor grad_values = need_weight ? at::empty({C, K}, grad_y.options()) : Tensor();
  // Degenerate shapes as the separate ops treat them; the launcher then sees N, H, C, K > 0.
  bool run_input = need_input && grad_x.numel() > 0, run_weight = need_weight && grad_values.numel() > 0;
  if (run_input && (C == 0 || K == 0)) {
    grad_x.zero_();
    run_input = false;
  }
  if (run_weight && N == 0) {
    grad_values.zero_();
    run_weight = false;
  }
  if (!run_input && !run_weight) return {grad_x, grad_values};
  const size_t ws_bytes = xmc::ffi_backward_cuda_workspace_bytes(dtype, N, H, C, K, run_input, run_weight);
  Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, grad_y.options().dtype(at::kByte));
  xmc::ffi_backward_cuda(dtype, grad_y.data_ptr(), x.data_ptr(), values.data_ptr(), indices.data_ptr<int32_t>(),
                         run_input ? grad_x.data_ptr() : nullptr, run_weight ? grad_values.data_ptr() : nullptr,
                         ws_bytes ? workspace.data_ptr() : nullptr, ws_bytes, N, H, C, K,
                         c10::cuda::getCurrentCUDAStream());
  return {grad_x, grad_values};
}

#ifdef XMC_WITH_GROUP_CUDA
Tensor group_forward_cuda(const Tensor& x_, const Tensor& values_, const Tensor& indices_,
                          const std::optional<Tensor>& bias_, int64_t group_size) {
  check_group_forward_args(x_, values_, indices_, bias_, group_size);
  check_cuda(x_, "x");
  const auto dtype = cuda_dtype(x_, "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), values = values_.contiguous(), indices = indices_.contiguous();
  const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
  const int64_t N = x.size(0), H = x.size(1), C = values.size(0), K = values.size(1);
  check_fan_in(K, H);
  Tensor y = at::empty({N, C}, x.options());
  if (y.numel() == 0) return y;
  if (K == 0) return bias.defined() ? y.copy_(bias.unsqueeze(0).expand({N, C})) : y.zero_();
  xmc::ffi_group_forward_cuda(dtype, x.data_ptr(), values.data_ptr(), indices.data_ptr<int32_t>(),
                              bias.defined() ? bias.data_ptr() : nullptr, y.data_ptr(), N, H, C, K, group_size,
                              c10::cuda::getCurrentCUDAStream());
  return y;
}

std::tuple<Tensor, Tensor> group_backward_cuda(const Tensor& grad_y_, const Tensor& x_, const Tensor& values_,
                                               const Tensor& indices_, int64_t group_size, bool need_input,
                                               bool need_weight) {
  check_group_backward_args(grad_y_, x_, values_, indices_, group_size);
  check_cuda(grad_y_, "grad_y");
  const auto dtype = cuda_dtype(grad_y_, "grad_y");
  const c10::cuda::CUDAGuard guard(grad_y_.device());
  const Tensor grad_y = grad_y_.contiguous(), x = x_.contiguous(), values = values_.contiguous(),
               indices = indices_.contiguous();
  const int64_t N = grad_y.size(0), H = x.size(1), C = values.size(0), K = values.size(1);
  check_fan_in(K, H);
  Tensor grad_x = need_input ? at::empty({N, H}, grad_y.options()) : Tensor();
  Tensor grad_values = need_weight ? at::empty({C, K}, grad_y.options()) : Tensor();
  // Degenerate shapes handled here; the launcher then sees N, H, C, K > 0.
  bool run_input = need_input && grad_x.numel() > 0, run_weight = need_weight && grad_values.numel() > 0;
  if (run_input && (C == 0 || K == 0)) {
    grad_x.zero_();
    run_input = false;
  }
  if (run_weight && N == 0) {
    grad_values.zero_();
    run_weight = false;
  }
  if (!run_input && !run_weight) return {grad_x, grad_values};
  const size_t ws_bytes =
      xmc::ffi_group_backward_cuda_workspace_bytes(dtype, N, H, C, K, group_size, run_input, run_weight);
  Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, grad_y.options().dtype(at::kByte));
  xmc::ffi_group_backward_cuda(dtype, grad_y.data_ptr(), x.data_ptr(), values.data_ptr(),
                               indices.data_ptr<int32_t>(), run_input ? grad_x.data_ptr() : nullptr,
                               run_weight ? grad_values.data_ptr() : nullptr,
                               ws_bytes ? workspace.data_ptr() : nullptr, ws_bytes, N, H, C, K, group_size,
                               c10::cuda::getCurrentCUDAStream());
  return {grad_x, grad_values};
}
#endif  // XMC_WITH_GROUP_CUDA
#endif  // XMC_WITH_CUDA

}  // namespace

TORCH_LIBRARY(xmc, m) {
  m.def("ffi_forward(Tensor x, Tensor values, Tensor indices, Tensor? bias) -> Tensor");
  m.def("ffi_backward_input(Tensor grad_y, Tensor values, Tensor indices, int in_features) -> Tensor");
  m.def("ffi_backward_weight(Tensor grad_y, Tensor x, Tensor indices) -> Tensor");
  m.def(
      "ffi_backward(Tensor grad_y, Tensor x, Tensor values, Tensor indices, bool need_input, bool need_weight) "
      "-> (Tensor grad_x, Tensor grad_values)");
  m.def("ffi_group_forward(Tensor x, Tensor values, Tensor indices, Tensor? bias, int group_size) -> Tensor");
  m.def(
      "ffi_group_backward(Tensor grad_y, Tensor x, Tensor values, Tensor indices, int group_size, "
      "bool need_input, bool need_weight) -> (Tensor grad_x, Tensor grad_values)");
}

TORCH_LIBRARY_IMPL(xmc, CPU, m) {
  m.impl("ffi_forward", &forward_cpu);
  m.impl("ffi_backward_input", &backward_input_cpu);
  m.impl("ffi_backward_weight", &backward_weight_cpu);
  m.impl("ffi_backward", &backward_cpu);
  m.impl("ffi_group_forward", &group_forward_cpu);
  m.impl("ffi_group_backward", &group_backward_cpu);
}

#ifdef XMC_WITH_CUDA
TORCH_LIBRARY_IMPL(xmc, CUDA, m) {
  m.impl("ffi_forward", &forward_cuda);
  m.impl("ffi_backward_input", &backward_input_cuda);
  m.impl("ffi_backward_weight", &backward_weight_cuda);
  m.impl("ffi_backward", &backward_cuda);
#ifdef XMC_WITH_GROUP_CUDA
  m.impl("ffi_group_forward", &group_forward_cuda);
  m.impl("ffi_group_backward", &group_backward_cuda);
#endif
}
#endif

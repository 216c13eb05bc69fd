// CPU kernels of the fixed fan-in (FFI) sparse layer.
//
// Plain pointers, no torch headers: the binding file (ffi_binding.cpp) checks shapes and dtypes,
// allocates the outputs through torch and passes the thread count torch uses (so that
// torch.set_num_threads governs these kernels too, whichever OpenMP runtime they link).
// Shapes: x [N, H], values W [C, K], indices I [C, K] int32 in [0, H), bias [C] (may be null),
// y / dy [N, C], dx [N, H], dW [C, K]; all row-major and contiguous. Element type of x, W, bias, y,
// dy, dx, dW is `dtype`; bfloat16 is passed as uint16_t bit patterns. Accumulation is float32 for
// float32 and bfloat16, float64 for float64 (the latter exists for gradcheck).
//   forward:         y[n,c]  = bias[c] + sum_k W[c,k] * x[n, I[c,k]]
//   backward input:  dx[n,j] = sum over (c,k) with I[c,k] = j of dy[n,c] * W[c,k]
//   backward weight: dW[c,k] = sum_n dy[n,c] * x[n, I[c,k]]
// Scratch memory is allocated inside (std::bad_alloc on failure, before any thread starts).
#pragma once

#include <cstdint>

namespace xmc {

enum class CpuDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat64 = 2 };

// Number of entries of indices[0..count) outside [0, H).
int64_t ffi_count_invalid_indices_cpu(const int32_t* indices, int64_t count, int64_t H, int num_threads);

void ffi_forward_cpu(CpuDtype dtype, const void* x, const void* values, const int32_t* indices,
                     const void* bias, void* y, int64_t N, int64_t H, int64_t C, int64_t K, int num_threads);

void ffi_backward_input_cpu(CpuDtype dtype, const void* grad_y, const void* values, const int32_t* indices,
                            void* grad_x, int64_t N, int64_t H, int64_t C, int64_t K, int num_threads);

void ffi_backward_weight_cpu(CpuDtype dtype, const void* grad_y, const void* x, const int32_t* indices,
                             void* grad_values, int64_t N, int64_t H, int64_t C, int64_t K, int num_threads);

}  // namespace xmc

// CPU kernels of the group-shared fixed fan-in sparse layer (HASTE): labels in groups of G share one
// index set of K inputs and keep their own weights.
//
// Plain pointers, no torch headers: the binding file (ffi_binding.cpp) checks shapes and dtypes,
// allocates the outputs through torch and passes the thread count torch uses.
// Shapes: x [N, H], values W [C, K], indices I [Q, K] int32 in [0, H) with Q = ceil(C / G) (one row per
// group; label c belongs to group c / G, the last group holds C - (Q - 1) * G labels), bias [C] (may be
// null), y / dy [N, C], dx [N, H], dW [C, K]; all row-major and contiguous, G >= 1. Element type of x,
// W, bias, y, dy, dx, dW is `dtype` (CpuDtype of ffi_cpu.h); bfloat16 is passed as uint16_t bit patterns.
// Accumulation is float32 for float32 and bfloat16, float64 for float64.
//   forward:         y[n,c]  = bias[c] + sum_k W[c,k] * x[n, I[c/G,k]]
//   backward input:  dx[n,j] = sum over (c,k) with I[c/G,k] = j of dy[n,c] * W[c,k]
//   backward weight: dW[c,k] = sum_n dy[n,c] * x[n, I[c/G,k]]
// Cost: 2*N*C*K flops each, as the plain layer, but a group reads each of its K input columns once for
// its G labels (small dense products), where the plain layer gathers one value per (sample, label, k).
// Scratch memory is allocated inside (std::bad_alloc on failure, before any thread starts).
#pragma once

#include <cstdint>

#include "ffi_cpu.h"

namespace xmc {

void ffi_group_forward_cpu(CpuDtype dtype, const void* x, const void* values, const int32_t* indices,
                           const void* bias, void* y, int64_t N, int64_t H, int64_t C, int64_t K, int64_t G,
                           int num_threads);

void ffi_group_backward_input_cpu(CpuDtype dtype, const void* grad_y, const void* values,
                                  const int32_t* indices, void* grad_x, int64_t N, int64_t H, int64_t C,
                                  int64_t K, int64_t G, int num_threads);

void ffi_group_backward_weight_cpu(CpuDtype dtype, const void* grad_y, const void* x, const int32_t* indices,
                                   void* grad_values, int64_t N, int64_t H, int64_t C, int64_t K, int64_t G,
                                   int num_threads);

}  // namespace xmc

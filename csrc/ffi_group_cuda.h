// Launchers of the CUDA kernels of the group-shared fixed fan-in layer (HASTE, ICML 2026).
//
// Labels in groups of G share one index set of K inputs and keep their own weights. Plain pointers,
// no torch headers: the binding (ffi_binding.cpp) checks shapes, devices and dtypes, allocates the
// outputs and the workspace through torch and calls these on the current stream.
// Shapes: x [N, H], values W [C, K] (one row per label), indices I [Q, K] int32 in [0, H) with
// Q = ceil(C / G) (one row per group; label c is in group c / G, the last group may be partial),
// bias [C] (may be null), y / dy [N, C], dx [N, H], dW [C, K]; all row-major and contiguous. Element
// type of x, W, bias, y, dy, dx, dW is `dtype` (float32 or bfloat16); accumulation is float32.
//   forward:         y[n,c]  = bias[c] + sum_k W[c,k] * x[n, I[c/G,k]]
//   backward weight: dW[c,k] = sum_n dy[n,c] * x[n, I[c/G,k]]
//   backward input:  dx[n,j] = sum over (c,k) with I[c/G,k] = j of dy[n,c] * W[c,k]
// Indices outside [0, H) read as zero inputs and receive nothing. G = 1 is the plain layer: by default
// it runs the plain layer's kernels (ffi_cuda.h); XMC_FFI_GROUP_PLAIN=0 runs the group kernels for it.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "ffi_cuda.h"  // FfiDtype

namespace xmc {

// y (every element written). G >= 1 (else std::runtime_error).
void ffi_group_forward_cuda(FfiDtype dtype, const void* x, const void* values, const int32_t* indices,
                            const void* bias, void* y, int64_t N, int64_t H, int64_t C, int64_t K, int64_t G,
                            cudaStream_t stream);

// Bytes of device scratch memory ffi_group_backward_cuda needs for these flags (0 if none). The binding
// allocates it (uninitialised) right before the call and passes it in with this size.
size_t ffi_group_backward_cuda_workspace_bytes(FfiDtype dtype, int64_t N, int64_t H, int64_t C, int64_t K, int64_t G,
                                               bool need_input, bool need_weight);

// dx and/or dW of one dy: grad_x / grad_values null = not wanted; every element of a wanted output is
// written (dx is zero for inputs that no group reads). workspace_bytes: what the caller allocated
// (checked against what this call needs).
void ffi_group_backward_cuda(FfiDtype dtype, const void* grad_y, const void* x, const void* values,
                             const int32_t* indices, void* grad_x, void* grad_values, void* workspace,
                             size_t workspace_bytes, int64_t N, int64_t H, int64_t C, int64_t K, int64_t G,
                             cudaStream_t stream);

}  // namespace xmc

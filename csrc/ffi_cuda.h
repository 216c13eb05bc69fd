// Launchers of the CUDA kernels of the fixed fan-in (FFI) sparse layer.
//
// Plain pointers, no torch headers: the binding file (ffi_binding.cpp) checks shapes, devices and
// dtypes, allocates outputs and workspace through torch, and calls these on the current stream.
// Shapes: x [N, H], values W [C, K], indices I [C, K] int32 in [0, H), bias [C] (may be null),
// y / dy [N, C], dx [N, H], dW [C, K]; all row-major and contiguous. Element type of x, W, bias, y,
// dy, dx, dW is `dtype` (float32 or bfloat16); accumulation is always float32.
//   forward:         y[n,c]  = bias[c] + sum_k W[c,k] * x[n, I[c,k]]
//   backward input:  dx[n,j] = sum over (c,k) with I[c,k] = j of dy[n,c] * W[c,k]
//   backward weight: dW[c,k] = sum_n dy[n,c] * x[n, I[c,k]]
//   backward (both): dx and dW of one dy in one pass over the connections (ffi_backward_cuda)
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace xmc {

enum class FfiDtype : int { kFloat32 = 0, kBFloat16 = 1 };

void ffi_forward_cuda(FfiDtype dtype, const void* x, const void* values, const int32_t* indices,
                      const void* bias, void* y, int64_t N, int64_t H, int64_t C, int64_t K,
                      cudaStream_t stream);

// Bytes of device scratch memory ffi_backward_input_cuda needs (0 if none). The binding allocates
// it (uninitialised) and passes it in; the launcher may use it for float32 accumulators or for a
// transposed (input -> outputs) index built on the fly.
size_t ffi_backward_input_cuda_workspace_bytes(int64_t N, int64_t H, int64_t C, int64_t K);

void ffi_backward_input_cuda(FfiDtype dtype, const void* grad_y, const void* values, const int32_t* indices,
                             void* grad_x, void* workspace, int64_t N, int64_t H, int64_t C, int64_t K,
                             cudaStream_t stream);

void ffi_backward_weight_cuda(FfiDtype dtype, const void* grad_y, const void* x, const int32_t* indices,
                              void* grad_values, int64_t N, int64_t H, int64_t C, int64_t K,
                              cudaStream_t stream);

// Bytes of device scratch memory ffi_backward_cuda needs for these flags (0 if none): with both
// gradients the float32 dx accumulator, the transposed x and (bfloat16, several batch tiles) a float32
// dW accumulator; with dx only what ffi_backward_input_cuda needs; with dW only 0.
size_t ffi_backward_cuda_workspace_bytes(FfiDtype dtype, int64_t N, int64_t H, int64_t C, int64_t K,
                                         bool need_input, bool need_weight);

// dx and/or dW of one dy: grad_x / grad_values null = not wanted. With both, one fused kernel reads
// dy and walks the connections once (float32 with XMC_FFI_DX=atomic, the defaults; XMC_FFI_FUSED=1
// also for bfloat16); with XMC_FFI_DX=csc or XMC_FFI_FUSED=0, or with one gradient, the separate
// launchers above run. workspace_bytes: what the
// caller allocated (checked against what this call needs).
void ffi_backward_cuda(FfiDtype dtype, const void* grad_y, const void* x, const void* values, const int32_t* indices,
                       void* grad_x, void* grad_values, void* workspace, size_t workspace_bytes, int64_t N, int64_t H,
                       int64_t C, int64_t K, cudaStream_t stream);

}  // namespace xmc

// CUDA kernels of the fixed fan-in (FFI) sparse layer; contract in ffi_cuda.h.
//
// Design (memory bound, no tensor-core work):
// * Gathers read whole rows of a transposed, batch-tiled copy of the dense operand: xt[t][j][0:NT]
//   holds x[t*NT .. t*NT+NT-1, j], so fetching input j for the NT batch rows of a tile is one
//   contiguous NT*sizeof(T)-byte row (16 bytes per lane, a "group" of G lanes per row) instead of NT
//   separate 32-byte sectors. NT is picked so that one tile's slab (H*NT elements) stays in L2 while
//   every block of that tile gathers from it: blockIdx.y is the tile, the slowest grid dimension.
// * forward: a group of G lanes owns one output c at a time, its K (index, weight) pairs are loaded
//   lane-parallel and broadcast by shuffles, 8 row loads in flight per lane; the block stages its
//   [CB outputs x NT batch] tile in shared memory and writes y rows coalesced.
// * dW: same gathers; per k the lane's NT/G partial dot products are reduced across the group by a
//   transposing butterfly (G-1 shuffles for G values of k instead of G*log2(G)).
// * dx: XMC_FFI_DX=atomic (default): float4 reductions into a float32 [tile][H][NT] accumulator in
//   the workspace (L2-resident per tile), then a transposing convert to dx. XMC_FFI_DX=csc: counting
//   sort of the connections by input (CSC index, built each call in the workspace), then the forward
//   gather kernel run on the transposed graph over a batch-tiled dy^T slab: no atomics on the data.
// * dx and dW together (ffi_backward_cuda, atomic mode): one kernel does both per connection, so dy
//   and I are read and the connections walked once instead of twice; its transposed x and dx
//   accumulator come from the caller's workspace, and a tile's two slabs share the L2 budget.
// Forward and dW need the transposed x but the contract gives them no workspace: they take it from a
// private stream-ordered memory pool (cudaMallocFromPoolAsync), which torch's allocator does not see.
#include "ffi_cuda.h"
#include "cuda_scratch.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace xmc {
namespace {

// Every launch goes through this (one place to change how kernels are started).
#ifndef XMC_LAUNCH
#define XMC_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

constexpr int kThreads = 256;  // every kernel here: 8 warps per block
constexpr unsigned kFull = 0xffffffffu;

// ---------------------------------------------------------------- errors

using cuda::Scratch;

void check_cuda(cudaError_t err, const char* what) { cuda::check(err, what); }

// A failed launch (bad configuration, no kernel image for this GPU) shows up here, not later.
void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

// ---------------------------------------------------------------- element access

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;  // elements per 16-byte lane access
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
  // 16 bytes through the read-only path: the slab is re-read by many blocks, keep it cached.
  __device__ static void load_vec(const float* p, float (&v)[4]) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
  }
  // Streamed operands (weights, indices, dy): evict-first so they do not push the slab out of L2.
  __device__ static float load_stream(const float* p) { return __ldcs(p); }
  __device__ static void store_stream(float* p, float v) { __stcs(p, v); }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static void load_vec(const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    const unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);  // bf16 is the high half of a float32
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ static float load_stream(const __nv_bfloat16* p) {
    const unsigned short u = __ldcs(reinterpret_cast<const unsigned short*>(p));
    return __uint_as_float(static_cast<unsigned>(u) << 16);
  }
  __device__ static void store_stream(__nv_bfloat16* p, float v) {
    const __nv_bfloat16 b = __float2bfloat16_rn(v);
    __stcs(reinterpret_cast<unsigned short*>(p), *reinterpret_cast<const unsigned short*>(&b));
  }
};

// Index and weight-value loads: streamed once per tile.
__device__ __forceinline__ int32_t load_index(const int32_t* p) { return __ldcs(p); }
template <typename VT>
__device__ __forceinline__ float load_value(const VT* p) {
  return Elem<VT>::load_stream(p);
}

// ---------------------------------------------------------------- tile geometry

// A group of G lanes serves one row (output c, or input j in the CSC gather); 256/G groups per block.
// CB rows per block: at least 32 so that the staged tile is written in >= 32-element row segments.
template <int G>
struct Geom {
  static_assert(G == 2 || G == 4 || G == 8 || G == 16 || G == 32, "G must be a power of two in [2, 32]");
  static constexpr int kGroups = kThreads / G;
  static constexpr int kRows = kGroups > 32 ? kGroups : 32;  // CB
  static constexpr int kRowsPerGroup = kRows / kGroups;
};

// Row loads in flight per lane: 8 x 16 bytes for float32, 4 for bf16 (its 8 values per load cost
// twice the registers once converted).
template <int G, int V>
constexpr int kBatch = G < 32 / V ? G : 32 / V;

// Max over the warp, without sm_80's __reduce_max_sync so older targets build too.
__device__ __forceinline__ int warp_max(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// p[i] of every lane of a G-lane group -> lane g returns the sum over the group of p[g]. Each step
// keeps the half of the array that its lane's bit selects and adds the partner's copy of that half.
template <int W, int G>
__device__ __forceinline__ void transpose_reduce_step(float (&p)[G], int lane_g) {
  const bool upper = (lane_g & W) != 0;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const float send = upper ? p[i] : p[i + W];
    const float keep = upper ? p[i + W] : p[i];
    p[i] = keep + __shfl_xor_sync(kFull, send, W);
  }
  if constexpr (W > 1) transpose_reduce_step<W / 2, G>(p, lane_g);
}

template <int G>
__device__ __forceinline__ float transpose_reduce(float (&p)[G], int lane_g) {
  transpose_reduce_step<G / 2, G>(p, lane_g);
  return p[0];
}

// ---------------------------------------------------------------- layout kernels

// src [R, S] row-major -> dst slab(s): dst[((r - r0) / NT * S + s) * NT + (r - r0) % NT] for rows
// r in [r0, r0 + rows_pad); rows >= R are written as zeros (padding of the last tile).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    to_tiles_kernel(const T* __restrict__ src, T* __restrict__ dst, int64_t R, int64_t S, int64_t r0,
                    int64_t rows_pad, int NT) {
  __shared__ T tile[32][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t s_base = static_cast<int64_t>(blockIdx.x) * 32;
  const int64_t rr_base = static_cast<int64_t>(blockIdx.y) * 32;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t rr = rr_base + ty + 8 * i, r = r0 + rr, s = s_base + tx;
    T v = Elem<T>::from_float(0.f);
    if (rr < rows_pad && r < R && s < S) v = src[r * S + s];
    tile[ty + 8 * i][tx] = v;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t s = s_base + ty + 8 * i, rr = rr_base + tx;
    if (rr < rows_pad && s < S) dst[(rr / NT * S + s) * NT + rr % NT] = tile[tx][ty + 8 * i];
  }
}

// Inverse of to_tiles for the float32 accumulator: src slabs [tiles][S][NT] -> dst [R, S] in T.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    from_tiles_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t R, int64_t S, int NT) {
  __shared__ float tile[32][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t s_base = static_cast<int64_t>(blockIdx.x) * 32;
  const int64_t r_base = static_cast<int64_t>(blockIdx.y) * 32;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t s = s_base + ty + 8 * i, r = r_base + tx;
    float v = 0.f;
    if (r < R && s < S) v = src[(r / NT * S + s) * NT + r % NT];
    tile[ty + 8 * i][tx] = v;  // tile[s][r]
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r_base + ty + 8 * i, s = s_base + tx;
    if (r < R && s < S) dst[r * S + s] = Elem<T>::from_float(tile[tx][ty + 8 * i]);
  }
}

template <typename T>
__global__ void float_to_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = Elem<T>::from_float(src[i]);
}

// ---------------------------------------------------------------- gather (forward, CSC dx)

// out[n, r] = bias[r] + sum_{e in row r} val[e] * src_tile[idx[e]][n - n0]  for the NT batch rows
// n of tile blockIdx.y. Rows are [r*K, r*K+K) when rowptr is null (forward), else
// [rowptr[r], rowptr[r+1]) (the CSC index). src is the slab of the first tile, S rows of NT.
template <typename T, typename VT, int G>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const int32_t* __restrict__ rowptr, const int32_t* __restrict__ idx,
                  const VT* __restrict__ val, int64_t K, const T* __restrict__ src, int64_t S,
                  const T* __restrict__ bias, T* __restrict__ out, int64_t rows, int64_t out_ld,
                  int64_t n_base, int64_t N) {
  using E = Elem<T>;
  using Gm = Geom<G>;
  constexpr int V = E::kVec, NT = G * V, CB = Gm::kRows, B = kBatch<G, V>;
  __shared__ float ys[CB][NT + 1];  // odd row stride: the column-wise reads below are conflict-free

  const int lane_g = threadIdx.x % G, grp = threadIdx.x / G;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * CB;
  const int64_t n0 = n_base + static_cast<int64_t>(blockIdx.y) * NT;
  const T* slab = src + static_cast<int64_t>(blockIdx.y) * S * NT + lane_g * V;

#pragma unroll 1
  for (int ci = 0; ci < Gm::kRowsPerGroup; ++ci) {
    const int rl = grp + ci * Gm::kGroups;
    const int64_t r = min(r0 + rl, rows - 1);  // tail groups compute a valid row, never stored
    int64_t start;
    int len;
    if (rowptr) {
      start = rowptr[r];
      len = rowptr[r + 1] - rowptr[r];
    } else {
      start = r * K;
      len = static_cast<int>(K);
    }
    int chunks = (len + G - 1) / G;
    if (rowptr) chunks = warp_max(chunks);  // shuffles below need the whole warp

    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.f;

#pragma unroll 1
    for (int ch = 0; ch < chunks; ++ch) {
      const int k0 = ch * G, kn = len - k0;  // kn <= 0: this group's row is done
      int my_j = 0;
      float my_w = 0.f;
      if (lane_g < kn) {
        my_j = load_index(idx + start + k0 + lane_g);
        my_w = load_value(val + start + k0 + lane_g);
      }
#pragma unroll
      for (int b = 0; b < G; b += B) {
        float xv[B][V];
#pragma unroll
        for (int u = 0; u < B; ++u) {
          const int j = __shfl_sync(kFull, my_j, b + u, G);
          if (b + u < kn) {
            E::load_vec(slab + static_cast<int64_t>(j) * NT, xv[u]);
          } else {
#pragma unroll
            for (int v = 0; v < V; ++v) xv[u][v] = 0.f;
          }
        }
#pragma unroll
        for (int u = 0; u < B; ++u) {
          const float w = __shfl_sync(kFull, my_w, b + u, G);
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] = fmaf(w, xv[u][v], acc[v]);
        }
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) ys[rl][lane_g * V + v] = acc[v];
  }
  __syncthreads();

  // Consecutive threads take consecutive rows r of one batch row n: coalesced out[n, r0 .. r0+CB).
  for (int t = threadIdx.x; t < CB * NT; t += kThreads) {
    const int rl = t % CB, nl = t / CB;
    const int64_t r = r0 + rl, n = n0 + nl;
    if (r < rows && n < N) {
      float v = ys[rl][nl];
      if (bias) v += E::to_float(bias[r]);
      E::store_stream(out + n * out_ld + r, v);
    }
  }
}

// ---------------------------------------------------------------- dy tile staging (dW, dx atomic)

// ds[cl][nl] = dy[n0 + nl, c0 + cl] as float, zero outside [N, C); coalesced along c.
template <typename T, int CB, int NT>
__device__ __forceinline__ void stage_dy(const T* __restrict__ dy, float (&ds)[CB][NT + 1], int64_t c0,
                                         int64_t n0, int64_t N, int64_t C) {
  for (int t = threadIdx.x; t < CB * NT; t += kThreads) {
    const int cl = t % CB, nl = t / CB;
    const int64_t c = c0 + cl, n = n0 + nl;
    ds[cl][nl] = (c < C && n < N) ? Elem<T>::load_stream(dy + n * C + c) : 0.f;
  }
  __syncthreads();
}

// ---------------------------------------------------------------- backward weight

// dW[c, k] = sum_n dy[n, c] * xt[tile][I[c,k]][n]. With several batch tiles the partial sums of
// each tile are added into the float32 accumulator acc (zeroed by the launcher); with one tile they
// are stored straight to dW.
template <typename T, int G>
__global__ void __launch_bounds__(kThreads)
    dw_kernel(const T* __restrict__ dy, const T* __restrict__ xt, const int32_t* __restrict__ I,
              float* __restrict__ acc, T* __restrict__ dW, int64_t N, int64_t H, int64_t C, int64_t K) {
  using E = Elem<T>;
  using Gm = Geom<G>;
  constexpr int V = E::kVec, NT = G * V, CB = Gm::kRows, B = kBatch<G, V>;
  __shared__ float ds[CB][NT + 1];

  const int lane_g = threadIdx.x % G, grp = threadIdx.x / G;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * CB;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * NT;
  const T* slab = xt + static_cast<int64_t>(blockIdx.y) * H * NT + lane_g * V;
  stage_dy<T, CB, NT>(dy, ds, c0, n0, N, C);

#pragma unroll 1
  for (int ci = 0; ci < Gm::kRowsPerGroup; ++ci) {
    const int rl = grp + ci * Gm::kGroups;
    const bool valid = c0 + rl < C;
    const int64_t c = min(c0 + rl, C - 1);
    float d[V];
#pragma unroll
    for (int v = 0; v < V; ++v) d[v] = ds[rl][lane_g * V + v];

#pragma unroll 1
    for (int64_t k0 = 0; k0 < K; k0 += G) {
      const int kn = static_cast<int>(K - k0 < G ? K - k0 : G);  // same for the whole warp
      const int my_j = lane_g < kn ? load_index(I + c * K + k0 + lane_g) : 0;
      float p[G];
#pragma unroll
      for (int b = 0; b < G; b += B) {
        float xv[B][V];
#pragma unroll
        for (int u = 0; u < B; ++u) {
          const int j = __shfl_sync(kFull, my_j, b + u, G);
          if (b + u < kn) {
            E::load_vec(slab + static_cast<int64_t>(j) * NT, xv[u]);
          } else {
#pragma unroll
            for (int v = 0; v < V; ++v) xv[u][v] = 0.f;
          }
        }
#pragma unroll
        for (int u = 0; u < B; ++u) {
          float s = 0.f;
#pragma unroll
          for (int v = 0; v < V; ++v) s = fmaf(d[v], xv[u][v], s);
          p[b + u] = s;
        }
      }
      const float s = transpose_reduce<G>(p, lane_g);
      if (valid && lane_g < kn) {
        const int64_t e = c * K + k0 + lane_g;
        if (acc) {
          atomicAdd(acc + e, s);
        } else {
          E::store_stream(dW + e, s);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- backward input, atomic

// acc[tile][I[c,k]][n] += W[c,k] * dy[n, c] for the NT batch rows of tile blockIdx.y (float32, 4 per
// lane: one 16-byte vector reduction per lane and connection).
template <typename T, int G>
__global__ void __launch_bounds__(kThreads)
    dx_atomic_kernel(const T* __restrict__ dy, const T* __restrict__ W, const int32_t* __restrict__ I,
                     float* __restrict__ acc, int64_t N, int64_t H, int64_t C, int64_t K) {
  using Gm = Geom<G>;
  constexpr int V = 4, NT = G * V, CB = Gm::kRows;
  __shared__ float ds[CB][NT + 1];

  const int lane_g = threadIdx.x % G, grp = threadIdx.x / G;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * CB;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * NT;
  float* slab = acc + static_cast<int64_t>(blockIdx.y) * H * NT + lane_g * V;
  stage_dy<T, CB, NT>(dy, ds, c0, n0, N, C);

#pragma unroll 1
  for (int ci = 0; ci < Gm::kRowsPerGroup; ++ci) {
    const int rl = grp + ci * Gm::kGroups;
    const bool valid = c0 + rl < C;
    const int64_t c = min(c0 + rl, C - 1);
    float d[V];
#pragma unroll
    for (int v = 0; v < V; ++v) d[v] = ds[rl][lane_g * V + v];

#pragma unroll 1
    for (int64_t k0 = 0; k0 < K; k0 += G) {
      const int kn = static_cast<int>(K - k0 < G ? K - k0 : G);
      int my_j = 0;
      float my_w = 0.f;
      if (lane_g < kn) {
        my_j = load_index(I + c * K + k0 + lane_g);
        my_w = load_value(W + c * K + k0 + lane_g);
      }
#pragma unroll
      for (int kk = 0; kk < G; ++kk) {
        const int j = __shfl_sync(kFull, my_j, kk, G);
        const float w = __shfl_sync(kFull, my_w, kk, G);
        if (valid && kk < kn) {
          float* p = slab + static_cast<int64_t>(j) * NT;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
          atomicAdd(reinterpret_cast<float4*>(p), make_float4(w * d[0], w * d[1], w * d[2], w * d[3]));
#else
#pragma unroll
          for (int v = 0; v < V; ++v) atomicAdd(p + v, w * d[v]);
#endif
        }
      }
    }
  }
}

// ---------------------------------------------------------------- backward, both gradients fused

// p[0 .. V) += w * d[0 .. V) as float4 reductions (V = 4 or 8; p 16-byte aligned).
template <int V>
__device__ __forceinline__ void atomic_add_scaled(float* p, float w, const float (&d)[V]) {
#pragma unroll
  for (int q = 0; q < V; q += 4) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(p + q), make_float4(w * d[q], w * d[q + 1], w * d[q + 2], w * d[q + 3]));
#else
#pragma unroll
    for (int v = 0; v < 4; ++v) atomicAdd(p + q + v, w * d[q + v]);
#endif
  }
}

// dw_kernel and dx_atomic_kernel in one pass for batch tile blockIdx.y: the dy tile is staged once,
// each connection's (index, weight) is loaded once, and per connection (c,k) a lane gathers its V
// batch rows of xt[tile][I[c,k]] (dot with dy -> dW[c,k], reduced across the group) and adds
// W[c,k] * dy into dx_acc[tile][I[c,k]] (V/4 float4 reductions). Both slabs are [tile][H][NT] with
// the same NT = G * V (bf16: 8 rows per lane, two float4 reductions). dW: stored once per (c,k) with
// one tile; with several, each tile adds into the float32 dw_acc (zeroed by the launcher).
template <typename T, int G>
__global__ void __launch_bounds__(kThreads)
    fused_backward_kernel(const T* __restrict__ dy, const T* __restrict__ xt, const T* __restrict__ W,
                          const int32_t* __restrict__ I, float* __restrict__ dx_acc, float* __restrict__ dw_acc,
                          T* __restrict__ dW, int64_t N, int64_t H, int64_t C, int64_t K) {
  using E = Elem<T>;
  using Gm = Geom<G>;
  constexpr int V = E::kVec, NT = G * V, CB = Gm::kRows, B = kBatch<G, V>;
  static_assert(V % 4 == 0, "dx reductions are float4");
  __shared__ float ds[CB][NT + 1];

  const int lane_g = threadIdx.x % G, grp = threadIdx.x / G;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * CB;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * NT;
  const int64_t tile_off = static_cast<int64_t>(blockIdx.y) * H * NT + lane_g * V;
  const T* slab = xt + tile_off;
  float* acc = dx_acc + tile_off;
  stage_dy<T, CB, NT>(dy, ds, c0, n0, N, C);

#pragma unroll 1
  for (int ci = 0; ci < Gm::kRowsPerGroup; ++ci) {
    const int rl = grp + ci * Gm::kGroups;
    const bool valid = c0 + rl < C;
    const int64_t c = min(c0 + rl, C - 1);  // tail groups keep the warp's shuffles, store nothing
    float d[V];
#pragma unroll
    for (int v = 0; v < V; ++v) d[v] = ds[rl][lane_g * V + v];

#pragma unroll 1
    for (int64_t k0 = 0; k0 < K; k0 += G) {
      const int kn = static_cast<int>(K - k0 < G ? K - k0 : G);  // same for the whole warp
      int my_j = 0;
      float my_w = 0.f;
      if (lane_g < kn) {
        my_j = load_index(I + c * K + k0 + lane_g);
        my_w = load_value(W + c * K + k0 + lane_g);
      }
      float p[G];
#pragma unroll
      for (int b = 0; b < G; b += B) {
        float xv[B][V];
#pragma unroll
        for (int u = 0; u < B; ++u) {
          const int j = __shfl_sync(kFull, my_j, b + u, G);
          if (b + u < kn) {
            E::load_vec(slab + static_cast<int64_t>(j) * NT, xv[u]);
          } else {
#pragma unroll
            for (int v = 0; v < V; ++v) xv[u][v] = 0.f;
          }
        }
        // The reductions need only (j, w, dy): they go out while the gathers above are in flight.
#pragma unroll
        for (int u = 0; u < B; ++u) {
          const int j = __shfl_sync(kFull, my_j, b + u, G);
          const float w = __shfl_sync(kFull, my_w, b + u, G);
          if (valid && b + u < kn) atomic_add_scaled<V>(acc + static_cast<int64_t>(j) * NT, w, d);
        }
#pragma unroll
        for (int u = 0; u < B; ++u) {
          float s = 0.f;
#pragma unroll
          for (int v = 0; v < V; ++v) s = fmaf(d[v], xv[u][v], s);
          p[b + u] = s;
        }
      }
      const float s = transpose_reduce<G>(p, lane_g);
      if (valid && lane_g < kn) {
        const int64_t e = c * K + k0 + lane_g;
        if (dw_acc) {
          atomicAdd(dw_acc + e, s);
        } else {
          E::store_stream(dW + e, s);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- CSC index build

__global__ void csc_count_kernel(const int32_t* __restrict__ I, int64_t E, int64_t H, int32_t* __restrict__ cnt) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t j = __ldcs(I + e);
    if (j >= 0 && j < H) atomicAdd(cnt + j, 1);
  }
}

// One block of 1024: colptr = exclusive prefix sum of cnt (H + 1 entries); cnt becomes the scatter
// cursor (= colptr[j]). Each thread scans a contiguous chunk; H is at most a few hundred thousand.
__global__ void __launch_bounds__(1024) csc_scan_kernel(int32_t* __restrict__ cnt, int32_t* __restrict__ colptr,
                                                        int64_t H) {
  __shared__ int32_t warp_sums[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t per = (H + 1023) / 1024, begin = min(tid * per, H), end = min(begin + per, H);
  int32_t local = 0;
  for (int64_t j = begin; j < end; ++j) local += cnt[j];
  // inclusive scan over the block
  int32_t incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t t = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int32_t w = warp_sums[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t t = __shfl_up_sync(kFull, w, o);
      if (lane >= o) w += t;
    }
    warp_sums[lane] = w;
  }
  __syncthreads();
  int32_t run = incl - local + (warp > 0 ? warp_sums[warp - 1] : 0);
  for (int64_t j = begin; j < end; ++j) {
    const int32_t c = cnt[j];
    colptr[j] = run;
    cnt[j] = run;
    run += c;
  }
  if (tid == 1023) colptr[H] = run;
}

// Entry order within a column follows the atomics: sums over a column are not bitwise reproducible.
template <typename T>
__global__ void csc_scatter_kernel(const int32_t* __restrict__ I, const T* __restrict__ W, int64_t E, int64_t K,
                                   int64_t H, int32_t* __restrict__ cursor, int32_t* __restrict__ ent_c,
                                   float* __restrict__ ent_v) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t j = __ldcs(I + e);
    if (j < 0 || j >= H) continue;
    const int32_t pos = atomicAdd(cursor + j, 1);
    ent_c[pos] = static_cast<int32_t>(e / K);
    ent_v[pos] = Elem<T>::load_stream(W + e);
  }
}

// ---------------------------------------------------------------- host-side planning

enum class DxMode { kAtomic, kCsc };

// Read on every call so a process can switch modes between calls (the benchmark measures both).
DxMode dx_mode() {
  const char* s = std::getenv("XMC_FFI_DX");
  if (s == nullptr || *s == '\0' || std::strcmp(s, "atomic") == 0) return DxMode::kAtomic;
  if (std::strcmp(s, "csc") == 0) return DxMode::kCsc;
  throw std::runtime_error(std::string("xmc FFI CUDA: XMC_FFI_DX must be 'atomic' or 'csc', got '") + s + "'");
}

// Bytes of one batch tile's slab that should stay L2-resident while a kernel gathers from it:
// XMC_FFI_L2_BUDGET_MB if set, else 45% of the current device's L2 (the rest serves the streamed
// operands; H100 50 MB -> 22.5 MB, H200 60 MB -> 27 MB).
size_t l2_budget_bytes() {
  if (const char* s = std::getenv("XMC_FFI_L2_BUDGET_MB"); s != nullptr && *s != '\0') {
    const double mb = std::atof(s);
    if (mb > 0) return static_cast<size_t>(mb * 1024 * 1024);
  }
  int dev = 0, l2 = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev) != cudaSuccess ||
      l2 <= 0) {
    cudaGetLastError();  // clear a sticky query error; fall back to an H100-sized budget
    return size_t{22} << 20;
  }
  return static_cast<size_t>(l2) * 45 / 100;
}

// Group width G (batch tile NT = G * vec): the smallest G >= g_min whose tile covers N, halved
// while the slab (slab_rows * NT * elem_bytes) exceeds the L2 budget.
int plan_group(int64_t N, int64_t slab_rows, int vec, int elem_bytes, int g_min) {
  int G = g_min;
  while (G < 32 && static_cast<int64_t>(G) * vec < N) G *= 2;
  const size_t budget = l2_budget_bytes();
  while (G > g_min && static_cast<size_t>(slab_rows) * G * vec * elem_bytes > budget) G /= 2;
  return G;
}

// Gathers of the forward / dW / atomic dx move at least 8 lanes x 16 bytes = 128 bytes per row.
constexpr int kGMinDense = 8;
constexpr int kGMinCsc = 2;  // the dy^T slab has C rows: narrow tiles keep it in L2

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align_up(size_t v) { return (v + 255) / 256 * 256; }

// dx atomic: float32 accumulator, whole tiles of NT = 4G | 128 batch rows.
size_t atomic_workspace_bytes(int64_t N, int64_t H) {
  return static_cast<size_t>(ceil_div(N, 128) * 128) * static_cast<size_t>(H) * sizeof(float);
}

// CSC: G is the same for both dtypes' budget check (a slab row is always 16*G bytes).
int csc_group(int64_t N, int64_t C) { return plan_group(N, C, 4, 4, kGMinCsc); }

struct CscLayout {
  size_t cnt, colptr, ent_c, ent_v, slab, total;
};

CscLayout csc_layout(int64_t N, int64_t H, int64_t C, int64_t K) {
  CscLayout l{};
  const size_t E = static_cast<size_t>(C) * static_cast<size_t>(K);
  l.cnt = 0;
  l.colptr = l.cnt + align_up(static_cast<size_t>(H) * 4);
  l.ent_c = l.colptr + align_up(static_cast<size_t>(H + 1) * 4);
  l.ent_v = l.ent_c + align_up(E * 4);
  l.slab = l.ent_v + align_up(E * 4);
  l.total = l.slab + align_up(static_cast<size_t>(C) * 16 * csc_group(N, C));
  return l;
}

// Fused backward: every block of a tile gathers from its transposed-x slab and reduces into its dx
// accumulator slab. The tile is as wide as the separate kernels' (the budget is checked against the
// float32 accumulator slab alone): on an H200 (60 MB L2, fp32) that was 5% faster than tiles sized so
// that both slabs fit the budget (N=128, K=32: 3.35 vs 3.53 ms; N=512: 13.3 vs 14.0 ms), because each
// extra tile costs one more pass over W and I (C*K*(e+4) bytes) and over dy.
struct FusedLayout {
  int G, NT;
  int64_t tiles;
  bool dw_acc;                   // bf16 with several tiles: dW is summed in float32 first
  size_t dx_acc, xt, dw, total;  // byte offsets into the workspace, 256-aligned
};

template <typename T>
FusedLayout fused_layout(int64_t N, int64_t H, int64_t C, int64_t K) {
  constexpr int V = Elem<T>::kVec;
  FusedLayout l{};
  l.G = plan_group(N, H, V, sizeof(float), kGMinDense);
  l.NT = l.G * V;
  l.tiles = ceil_div(N, l.NT);
  l.dw_acc = l.tiles > 1 && !std::is_same<T, float>::value;
  const size_t slab = static_cast<size_t>(l.tiles) * l.NT * static_cast<size_t>(H);
  l.dx_acc = 0;
  l.xt = align_up(slab * sizeof(float));
  l.dw = l.xt + align_up(slab * sizeof(T));
  l.total = l.dw + (l.dw_acc ? align_up(static_cast<size_t>(C) * static_cast<size_t>(K) * sizeof(float)) : 0);
  return l;
}

// The fused kernel is the atomic dx path plus dW; the CSC dx has no fused form. XMC_FFI_FUSED: unset
// or "auto" = fused for float32 only (for bfloat16 it was 1.6x slower than the separate kernels on an
// H200: 6.37 vs 4.06 ms at N=128, K=32; 8 batch rows per lane double its registers and halve its
// occupancy); "1" = fused for both dtypes, "0" = never (A/B timing, fallback).
bool use_fused(FfiDtype dtype, bool need_input, bool need_weight) {
  if (!need_input || !need_weight || dx_mode() != DxMode::kAtomic) return false;
  const char* s = std::getenv("XMC_FFI_FUSED");
  if (s == nullptr || *s == '\0' || std::strcmp(s, "auto") == 0) return dtype == FfiDtype::kFloat32;
  if (std::strcmp(s, "1") == 0) return true;
  if (std::strcmp(s, "0") == 0) return false;
  throw std::runtime_error(std::string("xmc FFI CUDA: XMC_FFI_FUSED must be 'auto', '1' or '0', got '") + s + "'");
}

// ---------------------------------------------------------------- launch helpers

template <typename T>
void launch_to_tiles(const T* src, T* dst, int64_t R, int64_t S, int64_t r0, int64_t rows_pad, int NT,
                     cudaStream_t stream) {
  if (S <= 0 || rows_pad <= 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(S, 32)), static_cast<unsigned>(ceil_div(rows_pad, 32)));
  const auto kernel = to_tiles_kernel<T>;
  XMC_LAUNCH(kernel, grid, kThreads, stream, src, dst, R, S, r0, rows_pad, NT);
  check_launch("to_tiles_kernel");
}

unsigned grid_stride_blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(ceil_div(n, kThreads), 1), 65536));
}

template <typename T, typename VT, int G>
void launch_gather(const int32_t* rowptr, const int32_t* idx, const VT* val, int64_t K, const T* src, int64_t S,
                   const T* bias, T* out, int64_t rows, int64_t out_ld, int64_t n_base, int64_t N, int64_t tiles,
                   cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, Geom<G>::kRows)), static_cast<unsigned>(tiles));
  const auto kernel = gather_kernel<T, VT, G>;
  XMC_LAUNCH(kernel, grid, kThreads, stream, rowptr, idx, val, K, src, S, bias, out, rows, out_ld, n_base, N);
  check_launch("gather_kernel");
}

template <typename T, typename VT>
void launch_gather_g(int G, const int32_t* rowptr, const int32_t* idx, const VT* val, int64_t K, const T* src,
                     int64_t S, const T* bias, T* out, int64_t rows, int64_t out_ld, int64_t n_base, int64_t N,
                     int64_t tiles, cudaStream_t stream) {
  switch (G) {
    case 2:
      return launch_gather<T, VT, 2>(rowptr, idx, val, K, src, S, bias, out, rows, out_ld, n_base, N, tiles, stream);
    case 4:
      return launch_gather<T, VT, 4>(rowptr, idx, val, K, src, S, bias, out, rows, out_ld, n_base, N, tiles, stream);
    case 8:
      return launch_gather<T, VT, 8>(rowptr, idx, val, K, src, S, bias, out, rows, out_ld, n_base, N, tiles, stream);
    case 16:
      return launch_gather<T, VT, 16>(rowptr, idx, val, K, src, S, bias, out, rows, out_ld, n_base, N, tiles,
                                      stream);
    case 32:
      return launch_gather<T, VT, 32>(rowptr, idx, val, K, src, S, bias, out, rows, out_ld, n_base, N, tiles,
                                      stream);
    default:
      throw std::runtime_error("xmc FFI CUDA: bad group width");
  }
}

// ---------------------------------------------------------------- launchers per element type

template <typename T>
void forward_impl(const T* x, const T* W, const int32_t* I, const T* bias, T* y, int64_t N, int64_t H, int64_t C,
                  int64_t K, cudaStream_t stream) {
  constexpr int V = Elem<T>::kVec;
  const int G = plan_group(N, H, V, sizeof(T), kGMinDense);
  const int NT = G * V;
  const int64_t tiles = ceil_div(N, NT);
  Scratch xt(static_cast<size_t>(tiles) * NT * H * sizeof(T), stream);
  launch_to_tiles<T>(x, xt.as<T>(), N, H, 0, tiles * NT, NT, stream);
  launch_gather_g<T, T>(G, nullptr, I, W, K, xt.as<T>(), H, bias, y, C, C, 0, N, tiles, stream);
}

template <typename T, int G>
void launch_dw(const T* dy, const T* xt, const int32_t* I, float* acc, T* dW, int64_t N, int64_t H, int64_t C,
               int64_t K, int64_t tiles, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(C, Geom<G>::kRows)), static_cast<unsigned>(tiles));
  const auto kernel = dw_kernel<T, G>;
  XMC_LAUNCH(kernel, grid, kThreads, stream, dy, xt, I, acc, dW, N, H, C, K);
  check_launch("dw_kernel");
}

template <typename T>
void backward_weight_impl(const T* dy, const T* x, const int32_t* I, T* dW, int64_t N, int64_t H, int64_t C,
                          int64_t K, cudaStream_t stream) {
  constexpr int V = Elem<T>::kVec;
  const int G = plan_group(N, H, V, sizeof(T), kGMinDense);
  const int NT = G * V;
  const int64_t tiles = ceil_div(N, NT);
  const size_t xt_bytes = align_up(static_cast<size_t>(tiles) * NT * H * sizeof(T));
  // Several tiles add partial sums: in place for float32 dW, through a float32 buffer for bf16.
  const bool need_acc = tiles > 1 && !std::is_same<T, float>::value;
  Scratch scratch(xt_bytes + (need_acc ? static_cast<size_t>(C) * K * sizeof(float) : 0), stream);
  T* xt = scratch.as<T>();
  float* acc = nullptr;
  if (tiles > 1) {
    acc = need_acc ? reinterpret_cast<float*>(scratch.as<char>() + xt_bytes) : reinterpret_cast<float*>(dW);
    check_cuda(cudaMemsetAsync(acc, 0, static_cast<size_t>(C) * K * sizeof(float), stream), "cudaMemsetAsync");
  }
  launch_to_tiles<T>(x, xt, N, H, 0, tiles * NT, NT, stream);
  switch (G) {
    case 8:
      launch_dw<T, 8>(dy, xt, I, acc, dW, N, H, C, K, tiles, stream);
      break;
    case 16:
      launch_dw<T, 16>(dy, xt, I, acc, dW, N, H, C, K, tiles, stream);
      break;
    case 32:
      launch_dw<T, 32>(dy, xt, I, acc, dW, N, H, C, K, tiles, stream);
      break;
    default:
      throw std::runtime_error("xmc FFI CUDA: bad group width for dW");
  }
  if (need_acc) {
    const int64_t n = C * K;
    const auto kernel = float_to_kernel<T>;
    XMC_LAUNCH(kernel, grid_stride_blocks(n), kThreads, stream, acc, dW, n);
    check_launch("float_to_kernel");
  }
}

template <typename T, int G>
void launch_dx_atomic(const T* dy, const T* W, const int32_t* I, float* acc, int64_t N, int64_t H, int64_t C,
                      int64_t K, int64_t tiles, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(C, Geom<G>::kRows)), static_cast<unsigned>(tiles));
  const auto kernel = dx_atomic_kernel<T, G>;
  XMC_LAUNCH(kernel, grid, kThreads, stream, dy, W, I, acc, N, H, C, K);
  check_launch("dx_atomic_kernel");
}

template <typename T>
void backward_input_atomic(const T* dy, const T* W, const int32_t* I, T* dx, float* acc, int64_t N, int64_t H,
                           int64_t C, int64_t K, cudaStream_t stream) {
  const int G = plan_group(N, H, 4, sizeof(float), kGMinDense);
  const int NT = G * 4;
  const int64_t tiles = ceil_div(N, NT);
  check_cuda(cudaMemsetAsync(acc, 0, static_cast<size_t>(tiles) * NT * H * sizeof(float), stream),
             "cudaMemsetAsync");
  switch (G) {
    case 8:
      launch_dx_atomic<T, 8>(dy, W, I, acc, N, H, C, K, tiles, stream);
      break;
    case 16:
      launch_dx_atomic<T, 16>(dy, W, I, acc, N, H, C, K, tiles, stream);
      break;
    case 32:
      launch_dx_atomic<T, 32>(dy, W, I, acc, N, H, C, K, tiles, stream);
      break;
    default:
      throw std::runtime_error("xmc FFI CUDA: bad group width for dx");
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(H, 32)), static_cast<unsigned>(ceil_div(N, 32)));
  const auto kernel = from_tiles_kernel<T>;
  XMC_LAUNCH(kernel, grid, kThreads, stream, acc, dx, N, H, NT);
  check_launch("from_tiles_kernel");
}

template <typename T>
void backward_input_csc(const T* dy, const T* W, const int32_t* I, T* dx, char* ws, int64_t N, int64_t H, int64_t C,
                        int64_t K, cudaStream_t stream) {
  const int64_t E = C * K;
  if (E >= (int64_t{1} << 31)) throw std::runtime_error("xmc FFI CUDA: csc dx needs C*K < 2^31");
  const CscLayout l = csc_layout(N, H, C, K);
  auto* cnt = reinterpret_cast<int32_t*>(ws + l.cnt);
  auto* colptr = reinterpret_cast<int32_t*>(ws + l.colptr);
  auto* ent_c = reinterpret_cast<int32_t*>(ws + l.ent_c);
  auto* ent_v = reinterpret_cast<float*>(ws + l.ent_v);
  T* slab = reinterpret_cast<T*>(ws + l.slab);

  check_cuda(cudaMemsetAsync(cnt, 0, static_cast<size_t>(H) * 4, stream), "cudaMemsetAsync");
  XMC_LAUNCH(csc_count_kernel, grid_stride_blocks(E), kThreads, stream, I, E, H, cnt);
  check_launch("csc_count_kernel");
  XMC_LAUNCH(csc_scan_kernel, 1, 1024, stream, cnt, colptr, H);
  check_launch("csc_scan_kernel");
  const auto scatter = csc_scatter_kernel<T>;
  XMC_LAUNCH(scatter, grid_stride_blocks(E), kThreads, stream, I, W, E, K, H, cnt, ent_c, ent_v);
  check_launch("csc_scatter_kernel");

  // Same G as the workspace was sized with (fp32 planning); a bf16 slab row has 2x the batch rows.
  constexpr int V = Elem<T>::kVec;
  int G = csc_group(N, C);
  while (G > kGMinCsc && static_cast<int64_t>(G / 2) * V >= N) G /= 2;  // bf16 covers N with fewer lanes
  const int NT = G * V;
  for (int64_t n0 = 0; n0 < N; n0 += NT) {
    launch_to_tiles<T>(dy, slab, N, C, n0, NT, NT, stream);
    launch_gather_g<T, float>(G, colptr, ent_c, ent_v, 0, slab, C, nullptr, dx, H, H, n0, N, 1, stream);
  }
}

template <typename T, int G>
void launch_fused(const T* dy, const T* xt, const T* W, const int32_t* I, float* dx_acc, float* dw_acc, T* dW,
                  int64_t N, int64_t H, int64_t C, int64_t K, int64_t tiles, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(C, Geom<G>::kRows)), static_cast<unsigned>(tiles));
  const auto kernel = fused_backward_kernel<T, G>;
  XMC_LAUNCH(kernel, grid, kThreads, stream, dy, xt, W, I, dx_acc, dw_acc, dW, N, H, C, K);
  check_launch("fused_backward_kernel");
}

template <typename T>
void backward_fused(const T* dy, const T* x, const T* W, const int32_t* I, T* dx, T* dW, char* ws, size_t ws_bytes,
                    int64_t N, int64_t H, int64_t C, int64_t K, cudaStream_t stream) {
  const FusedLayout l = fused_layout<T>(N, H, C, K);
  // Sized by the same planning; a smaller one means the L2 budget or the mode changed in between.
  if (ws == nullptr || ws_bytes < l.total)
    throw std::runtime_error("xmc FFI CUDA: fused backward needs " + std::to_string(l.total) +
                             " bytes of workspace, got " + std::to_string(ws_bytes));
  auto* dx_acc = reinterpret_cast<float*>(ws + l.dx_acc);
  T* xt = reinterpret_cast<T*>(ws + l.xt);
  // One tile stores dW directly; several add into float32: in place for float32 dW, else a buffer.
  float* dw_acc = nullptr;
  if (l.tiles > 1) {
    dw_acc = l.dw_acc ? reinterpret_cast<float*>(ws + l.dw) : reinterpret_cast<float*>(dW);
    check_cuda(cudaMemsetAsync(dw_acc, 0, static_cast<size_t>(C) * K * sizeof(float), stream), "cudaMemsetAsync");
  }
  check_cuda(cudaMemsetAsync(dx_acc, 0, static_cast<size_t>(l.tiles) * l.NT * H * sizeof(float), stream),
             "cudaMemsetAsync");
  launch_to_tiles<T>(x, xt, N, H, 0, l.tiles * l.NT, l.NT, stream);
  switch (l.G) {
    case 8:
      launch_fused<T, 8>(dy, xt, W, I, dx_acc, dw_acc, dW, N, H, C, K, l.tiles, stream);
      break;
    case 16:
      launch_fused<T, 16>(dy, xt, W, I, dx_acc, dw_acc, dW, N, H, C, K, l.tiles, stream);
      break;
    case 32:
      launch_fused<T, 32>(dy, xt, W, I, dx_acc, dw_acc, dW, N, H, C, K, l.tiles, stream);
      break;
    default:
      throw std::runtime_error("xmc FFI CUDA: bad group width for the fused backward");
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(H, 32)), static_cast<unsigned>(ceil_div(N, 32)));
  const auto from_tiles = from_tiles_kernel<T>;
  XMC_LAUNCH(from_tiles, grid, kThreads, stream, dx_acc, dx, N, H, l.NT);
  check_launch("from_tiles_kernel");
  if (l.dw_acc) {
    const int64_t n = C * K;
    const auto to_t = float_to_kernel<T>;
    XMC_LAUNCH(to_t, grid_stride_blocks(n), kThreads, stream, dw_acc, dW, n);
    check_launch("float_to_kernel");
  }
}

}  // namespace

// ---------------------------------------------------------------- contract

void ffi_forward_cuda(FfiDtype dtype, const void* x, const void* values, const int32_t* indices, const void* bias,
                      void* y, int64_t N, int64_t H, int64_t C, int64_t K, cudaStream_t stream) {
  if (N <= 0 || C <= 0) return;
  switch (dtype) {
    case FfiDtype::kFloat32:
      return forward_impl<float>(static_cast<const float*>(x), static_cast<const float*>(values), indices,
                                 static_cast<const float*>(bias), static_cast<float*>(y), N, H, C, K, stream);
    case FfiDtype::kBFloat16:
      return forward_impl<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(x),
                                         static_cast<const __nv_bfloat16*>(values), indices,
                                         static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(y), N,
                                         H, C, K, stream);
  }
  throw std::runtime_error("xmc FFI CUDA: unknown dtype");
}

size_t ffi_backward_input_cuda_workspace_bytes(int64_t N, int64_t H, int64_t C, int64_t K) {
  if (N <= 0 || H <= 0 || C <= 0 || K <= 0) return 0;
  // Sized for the mode selected now; the binding asks right before it launches.
  return dx_mode() == DxMode::kCsc ? csc_layout(N, H, C, K).total : atomic_workspace_bytes(N, H);
}

void ffi_backward_input_cuda(FfiDtype dtype, const void* grad_y, const void* values, const int32_t* indices,
                             void* grad_x, void* workspace, int64_t N, int64_t H, int64_t C, int64_t K,
                             cudaStream_t stream) {
  if (N <= 0 || H <= 0) return;
  const size_t dx_bytes = static_cast<size_t>(N) * H * (dtype == FfiDtype::kFloat32 ? 4 : 2);
  if (C <= 0 || K <= 0) {
    check_cuda(cudaMemsetAsync(grad_x, 0, dx_bytes, stream), "cudaMemsetAsync");
    return;
  }
  if (workspace == nullptr) throw std::runtime_error("xmc FFI CUDA: backward input needs its workspace");
  const bool csc = dx_mode() == DxMode::kCsc;
  switch (dtype) {
    case FfiDtype::kFloat32: {
      auto dy = static_cast<const float*>(grad_y);
      auto W = static_cast<const float*>(values);
      auto dx = static_cast<float*>(grad_x);
      if (csc) return backward_input_csc<float>(dy, W, indices, dx, static_cast<char*>(workspace), N, H, C, K, stream);
      return backward_input_atomic<float>(dy, W, indices, dx, static_cast<float*>(workspace), N, H, C, K, stream);
    }
    case FfiDtype::kBFloat16: {
      auto dy = static_cast<const __nv_bfloat16*>(grad_y);
      auto W = static_cast<const __nv_bfloat16*>(values);
      auto dx = static_cast<__nv_bfloat16*>(grad_x);
      if (csc)
        return backward_input_csc<__nv_bfloat16>(dy, W, indices, dx, static_cast<char*>(workspace), N, H, C, K,
                                                 stream);
      return backward_input_atomic<__nv_bfloat16>(dy, W, indices, dx, static_cast<float*>(workspace), N, H, C, K,
                                                  stream);
    }
  }
  throw std::runtime_error("xmc FFI CUDA: unknown dtype");
}

void ffi_backward_weight_cuda(FfiDtype dtype, const void* grad_y, const void* x, const int32_t* indices,
                              void* grad_values, int64_t N, int64_t H, int64_t C, int64_t K, cudaStream_t stream) {
  if (C <= 0 || K <= 0) return;
  if (N <= 0) {
    check_cuda(cudaMemsetAsync(grad_values, 0, static_cast<size_t>(C) * K * (dtype == FfiDtype::kFloat32 ? 4 : 2),
                               stream),
               "cudaMemsetAsync");
    return;
  }
  switch (dtype) {
    case FfiDtype::kFloat32:
      return backward_weight_impl<float>(static_cast<const float*>(grad_y), static_cast<const float*>(x), indices,
                                         static_cast<float*>(grad_values), N, H, C, K, stream);
    case FfiDtype::kBFloat16:
      return backward_weight_impl<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(grad_y),
                                                 static_cast<const __nv_bfloat16*>(x), indices,
                                                 static_cast<__nv_bfloat16*>(grad_values), N, H, C, K, stream);
  }
  throw std::runtime_error("xmc FFI CUDA: unknown dtype");
}

size_t ffi_backward_cuda_workspace_bytes(FfiDtype dtype, int64_t N, int64_t H, int64_t C, int64_t K,
                                         bool need_input, bool need_weight) {
  if (N <= 0 || H <= 0 || C <= 0 || K <= 0) return 0;
  if (use_fused(dtype, need_input, need_weight)) {
    switch (dtype) {
      case FfiDtype::kFloat32:
        return fused_layout<float>(N, H, C, K).total;
      case FfiDtype::kBFloat16:
        return fused_layout<__nv_bfloat16>(N, H, C, K).total;
    }
    throw std::runtime_error("xmc FFI CUDA: unknown dtype");
  }
  return need_input ? ffi_backward_input_cuda_workspace_bytes(N, H, C, K) : 0;  // dW: private pool
}

void ffi_backward_cuda(FfiDtype dtype, const void* grad_y, const void* x, const void* values, const int32_t* indices,
                       void* grad_x, void* grad_values, void* workspace, size_t workspace_bytes, int64_t N, int64_t H,
                       int64_t C, int64_t K, cudaStream_t stream) {
  const bool need_input = grad_x != nullptr, need_weight = grad_values != nullptr;
  if (N <= 0 || H <= 0 || C <= 0 || K <= 0 || !use_fused(dtype, need_input, need_weight)) {
    if (need_input) {
      if (workspace_bytes < ffi_backward_input_cuda_workspace_bytes(N, H, C, K))
        throw std::runtime_error("xmc FFI CUDA: backward input workspace too small");
      ffi_backward_input_cuda(dtype, grad_y, values, indices, grad_x, workspace, N, H, C, K, stream);
    }
    if (need_weight) ffi_backward_weight_cuda(dtype, grad_y, x, indices, grad_values, N, H, C, K, stream);
    return;
  }
  char* ws = static_cast<char*>(workspace);
  switch (dtype) {
    case FfiDtype::kFloat32:
      return backward_fused<float>(static_cast<const float*>(grad_y), static_cast<const float*>(x),
                                   static_cast<const float*>(values), indices, static_cast<float*>(grad_x),
                                   static_cast<float*>(grad_values), ws, workspace_bytes, N, H, C, K, stream);
    case FfiDtype::kBFloat16:
      return backward_fused<__nv_bfloat16>(
          static_cast<const __nv_bfloat16*>(grad_y), static_cast<const __nv_bfloat16*>(x),
          static_cast<const __nv_bfloat16*>(values), indices, static_cast<__nv_bfloat16*>(grad_x),
          static_cast<__nv_bfloat16*>(grad_values), ws, workspace_bytes, N, H, C, K, stream);
  }
  throw std::runtime_error("xmc FFI CUDA: unknown dtype");
}

}  // namespace xmc

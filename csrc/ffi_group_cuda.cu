// CUDA kernels of the group-shared fixed fan-in layer (HASTE); contract in ffi_group_cuda.h.
//
// Per group g the layer is a small dense product: the group's K input columns gathered for a batch tile
// (X_g [n, K]) times its G x K weights. Design:
// * x is first copied into a transposed, batch-tiled slab xt[t][j][0:BN] (BN batch rows of input j
//   contiguous), so gathering input j for a batch tile is one contiguous BN-element row instead of BN
//   separate sectors. blockIdx.y is the batch tile, the slowest grid dimension: at any time the blocks
//   gather from one tile's slab (H * BN elements: 16 MB at H = 65,536 for float32 BN 64 / bf16 BN 128),
//   which stays L2-resident while the streamed operands (W, dy, y) pass through with evict-first hints.
// * A block covers up to 64 consecutive labels as "chunks" of CS labels that each lie inside one group
//   (several whole groups, or a 64-label slice of a large group) and stages, per K-chunk of KC inputs,
//   the gathered block X_g[BN, KC] of each of its groups ("slots") once in shared memory, with the
//   weights of its labels; the products read both from shared memory.
// * forward: bfloat16 with G % 16 == 0 uses tensor cores (nvcuda::wmma bf16 16x16x16, float
//   accumulators; one 16-label tile never straddles two groups); other G and float32 run a SIMT path
//   (plain float32 FMA, register tiles of 2 batch rows x 8 labels per thread) with the same staging.
// * backward: the block stages dy^T for its labels once per batch tile; per K-chunk it computes
//   dW_g = dY_g^T X_g over the tile's rows and dX_g = dY_g W_g, and scatter-adds dX_g into a float32
//   accumulator dxt[t][j][0:BN] (coalesced float atomics along the batch rows; float2 on sm_90) that a
//   transposing pass converts to dx (float32 or bf16). dW over several batch tiles: float32 atomics
//   (in place for float32 dW, through a float32 buffer for bf16), one tile stores it directly; sums over
//   several tiles (and dx always) are therefore not bitwise reproducible from run to run.
//   Batch tile 64 for every backward path, so that the tile's x slab and dx accumulator share the L2.
// Forward has no workspace in the contract: its transposed x comes from a private stream-ordered pool.
#include "ffi_group_cuda.h"
#include "cuda_scratch.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

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
#ifndef XMC_GROUP_LAUNCH
#define XMC_GROUP_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256;  // every kernel here: 8 warps per block
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------- errors

using cuda::Scratch;

void check_cuda(cudaError_t err, const char* what) { cuda::check(err, what); }

void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

// ---------------------------------------------------------------- element access

template <typename T>
struct GE;

template <>
struct GE<float> {
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
  __device__ static float load_stream(const float* p) { return __ldcs(p); }
  __device__ static void store_stream(float* p, float v) { __stcs(p, v); }
};

template <>
struct GE<bf16> {
  __device__ static float to_float(bf16 v) { return __bfloat162float(v); }
  __device__ static bf16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static float load_stream(const bf16* p) {
    const unsigned short u = __ldcs(reinterpret_cast<const unsigned short*>(p));
    return __uint_as_float(static_cast<unsigned>(u) << 16);  // bf16 is the high half of a float32
  }
  __device__ static void store_stream(bf16* p, float v) {
    const bf16 b = __float2bfloat16_rn(v);
    __stcs(reinterpret_cast<unsigned short*>(p), *reinterpret_cast<const unsigned short*>(&b));
  }
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// p[0], p[1] += a, b (p 8-byte aligned).
__device__ __forceinline__ void atomic_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// ---------------------------------------------------------------- block plan

// A block covers NC chunks of up to CS consecutive labels; each chunk lies in one group. With
// cpg = ceil(G / CS) chunks per group: if cpg <= NC the block takes NC / cpg whole groups (slot s =
// its s-th group, chunks [s*cpg, s*cpg + cpg)); else each group is split into slices of NC chunks
// (one slot, all chunks). At most NC slots; the block's labels are contiguous.
template <int NC>
struct Plan {
  long long ls[NC];  // first label of chunk
  int nl[NC];        // labels in chunk (0: none)
  int slot[NC];      // slot of chunk, in [0, NC)
  long long sg[NC];  // group of slot, -1: none
  int cb[NC], ce[NC];  // chunk range of slot
};

__host__ __device__ inline int64_t plan_blocks(int64_t G, int64_t Q, int CS, int NC) {
  const int64_t cpg = (G + CS - 1) / CS;
  if (cpg <= NC) {
    const int64_t gpb = NC / cpg;
    return (Q + gpb - 1) / gpb;
  }
  return Q * ((cpg + NC - 1) / NC);
}

template <int CS, int NC>
__device__ void make_plan(Plan<NC>& p, int64_t b, int64_t G, int64_t Q, int64_t C) {
  const int64_t cpg = (G + CS - 1) / CS;
  const int tid = threadIdx.x;
  if (tid < NC) {
    const int w = tid;
    int64_t g = -1, sub = 0;
    int slot = 0;
    if (cpg <= NC) {
      const int64_t gpb = NC / cpg;
      slot = static_cast<int>(w / cpg);
      sub = w % cpg;
      if (slot < gpb) g = b * gpb + slot;
    } else {
      const int64_t spg = (cpg + NC - 1) / NC;
      g = b / spg;
      sub = (b % spg) * NC + w;
      if (sub >= cpg) g = -1;
    }
    int64_t ls = 0;
    int nl = 0;
    if (g >= 0 && g < Q) {
      ls = g * G + sub * CS;
      const int64_t le = min64(g * G + min64((sub + 1) * CS, G), C);
      nl = le > ls ? static_cast<int>(le - ls) : 0;
    }
    p.ls[w] = ls;
    p.nl[w] = nl;
    p.slot[w] = slot;  // < NC: w / cpg <= w
  } else if (tid >= 32 && tid < 32 + NC) {
    const int s = tid - 32;
    int64_t g = -1;
    int cb = 0, ce = 0;
    if (cpg <= NC) {
      const int64_t gpb = NC / cpg;
      if (s < gpb) {
        g = b * gpb + s;
        cb = static_cast<int>(s * cpg);
        ce = static_cast<int>(cb + cpg);
      }
    } else if (s == 0) {
      g = b / ((cpg + NC - 1) / NC);
      ce = NC;
    }
    if (g >= Q) g = -1;
    p.sg[s] = g;
    p.cb[s] = cb;
    p.ce[s] = g >= 0 ? ce : cb;
  }
}

// ---------------------------------------------------------------- staging

// Is[s*KC + k] = I[g_s, k0 + k] for valid slots, k0 + k < K and an index in [0, H); else -1.
template <int NC, int KC>
__device__ __forceinline__ void load_indices(int* Is, const Plan<NC>& p, const int32_t* __restrict__ I, int64_t K,
                                             int64_t H, int64_t k0) {
  for (int t = threadIdx.x; t < NC * KC; t += kThreads) {
    const int s = t / KC, k = t % KC;
    const long long g = p.sg[s];
    int j = -1;
    if (g >= 0 && k0 + k < K) {
      j = __ldg(I + g * K + k0 + k);
      if (j < 0 || j >= H) j = -1;
    }
    Is[t] = j;
  }
}

// Ws[(c*CS + l)*WLD + k] = W[ls_c + l, k0 + k] (as float, or raw bf16), zero outside the labels / K.
template <typename T, typename S, int CS, int NC, int KC, int WLD>
__device__ __forceinline__ void load_weights(S* Ws, const Plan<NC>& p, const T* __restrict__ W, int64_t K,
                                             int64_t k0) {
  for (int t = threadIdx.x; t < NC * CS * KC; t += kThreads) {
    const int pos = t / KC, k = t % KC, ch = pos / CS, l = pos % CS;
    float v = 0.f;
    if (l < p.nl[ch] && k0 + k < K) v = GE<T>::load_stream(W + (p.ls[ch] + l) * K + k0 + k);
    if constexpr (std::is_same<S, float>::value) {
      Ws[pos * WLD + k] = v;
    } else {
      Ws[pos * WLD + k] = GE<bf16>::from_float(v);  // exact: v came from a bf16
    }
  }
}

// Dy[(c*CS + l)*DLD + n] = dy[n0 + n, ls_c + l] (dy^T of the block's labels), zero outside N / labels.
template <typename T, typename S, int CS, int NC, int BN, int DLD>
__device__ __forceinline__ void load_dy(S* Dy, const Plan<NC>& p, const T* __restrict__ dy, int64_t n0, int64_t N,
                                        int64_t C) {
  for (int t = threadIdx.x; t < BN * NC * CS; t += kThreads) {
    const int nn = t / (NC * CS), pos = t % (NC * CS), ch = pos / CS, l = pos % CS;
    float v = 0.f;
    if (n0 + nn < N && l < p.nl[ch]) v = GE<T>::load_stream(dy + (n0 + nn) * C + p.ls[ch] + l);
    if constexpr (std::is_same<S, float>::value) {
      Dy[pos * DLD + nn] = v;
    } else {
      Dy[pos * DLD + nn] = GE<bf16>::from_float(v);
    }
  }
}

// Xs[(s*KC + k)*XLD + n] = xt_tile[Is[s*KC + k]][n] for n < BN, as float (zero rows for Is = -1).
template <typename T, int NC, int KC, int BN, int XLD>
__device__ __forceinline__ void gather_float(float* Xs, const int* Is, const T* __restrict__ slab) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  constexpr int VPR = BN / V;
  for (int t = threadIdx.x; t < NC * KC * VPR; t += kThreads) {
    const int row = t / VPR, q = t % VPR;
    const int j = Is[row];
    float* dst = Xs + row * XLD + q * V;
    if constexpr (std::is_same<T, float>::value) {
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (j >= 0) v = __ldg(reinterpret_cast<const float4*>(slab + static_cast<int64_t>(j) * BN + q * V));
      *reinterpret_cast<float4*>(dst) = v;
    } else {
      uint4 u = make_uint4(0u, 0u, 0u, 0u);
      if (j >= 0) u = __ldg(reinterpret_cast<const uint4*>(slab + static_cast<int64_t>(j) * BN + q * V));
      const unsigned w[4] = {u.x, u.y, u.z, u.w};
      float f[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
      }
      *reinterpret_cast<float4*>(dst) = make_float4(f[0], f[1], f[2], f[3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(f[4], f[5], f[6], f[7]);
    }
  }
}

// The same for bf16 kept as bf16 (tensor-core operands): plain 16-byte copies.
template <int NC, int KC, int BN, int XLD>
__device__ __forceinline__ void gather_bf16(bf16* Xs, const int* Is, const bf16* __restrict__ slab) {
  constexpr int V = 8, VPR = BN / V;
  for (int t = threadIdx.x; t < NC * KC * VPR; t += kThreads) {
    const int row = t / VPR, q = t % VPR;
    const int j = Is[row];
    uint4 u = make_uint4(0u, 0u, 0u, 0u);
    if (j >= 0) u = __ldg(reinterpret_cast<const uint4*>(slab + static_cast<int64_t>(j) * BN + q * V));
    *reinterpret_cast<uint4*>(Xs + row * XLD + q * V) = u;
  }
}

// y[n0 + n, ls_c + l] = Ys[n*YLD + c*CS + l] (+ bias): consecutive threads write consecutive labels.
template <typename T, int CS, int NC, int BN, int YLD>
__device__ __forceinline__ void store_y(const float* Ys, const Plan<NC>& p, const T* __restrict__ bias,
                                        T* __restrict__ y, int64_t n0, int64_t N, int64_t C) {
  for (int t = threadIdx.x; t < BN * NC * CS; t += kThreads) {
    const int nn = t / (NC * CS), pos = t % (NC * CS), ch = pos / CS, l = pos % CS;
    const int64_t n = n0 + nn;
    if (n < N && l < p.nl[ch]) {
      const int64_t c = p.ls[ch] + l;
      float v = Ys[nn * YLD + pos];
      if (bias) v += GE<T>::to_float(bias[c]);
      GE<T>::store_stream(y + n * C + c, v);
    }
  }
}

// ---------------------------------------------------------------- SIMT kernels (float32; bf16 any G)

// Chunks of 8 labels (one warp each), 8 slots, batch tile 64, K-chunk 16. Row strides padded so that
// the float4 / float2 reads of the products are free of bank conflicts.
struct Simt {
  static constexpr int CS = 8, NC = 8, BN = 64, KC = 16;
  static constexpr int XLD = BN + 4;  // Xs [slot][k][n]
  static constexpr int WLD = KC + 4;  // Ws [label][k]
  static constexpr int DLD = BN + 4;  // Dy [label][n]
  static constexpr int YLD = NC * CS + 1;  // Ys [n][label] (aliases Xs)
  static constexpr int kXs = NC * KC * XLD, kWs = NC * CS * WLD, kDy = NC * CS * DLD, kIs = NC * KC;
  static_assert(BN * YLD <= kXs, "the output tile reuses the X staging buffer");
  // Dynamic shared memory of the backward kernel.
  static constexpr size_t kBwdSmem = sizeof(float) * (kXs + kWs + kDy) + sizeof(int) * kIs;
};

// y for batch tile blockIdx.y: warp w owns chunk w (<= 8 labels of one group), lane rows 2*lane and
// 2*lane + 1; per 4 inputs it reads 4 float2 of X and 8 float4 of W (broadcast) for 64 FMAs.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    group_fwd_simt_kernel(const T* __restrict__ xt, const T* __restrict__ W, const int32_t* __restrict__ I,
                          const T* __restrict__ bias, T* __restrict__ y, int64_t N, int64_t H, int64_t C, int64_t K,
                          int64_t G, int64_t Q) {
  using S = Simt;
  constexpr int CS = S::CS, NC = S::NC, BN = S::BN, KC = S::KC, XLD = S::XLD, WLD = S::WLD, YLD = S::YLD;
  __shared__ __align__(16) float Xs[S::kXs];
  __shared__ __align__(16) float Ws[S::kWs];
  __shared__ int Is[S::kIs];
  __shared__ Plan<NC> p;
  make_plan<CS, NC>(p, blockIdx.x, G, Q, C);
  __syncthreads();

  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const T* slab = xt + static_cast<int64_t>(blockIdx.y) * H * BN;
  const int nl = p.nl[w], slot = p.slot[w];
  float acc[2][CS];
#pragma unroll
  for (int l = 0; l < CS; ++l) acc[0][l] = acc[1][l] = 0.f;

#pragma unroll 1
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    if (k0 > 0) __syncthreads();  // the previous chunk's products are done with the buffers
    load_indices<NC, KC>(Is, p, I, K, H, k0);
    load_weights<T, float, CS, NC, KC, WLD>(Ws, p, W, K, k0);
    __syncthreads();
    gather_float<T, NC, KC, BN, XLD>(Xs, Is, slab);
    __syncthreads();
    if (nl > 0) {  // warp-uniform
      const float* xs = Xs + slot * KC * XLD + 2 * lane;
      const float* ws = Ws + w * CS * WLD;
#pragma unroll
      for (int kk = 0; kk < KC; kk += 4) {
        float2 xv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) xv[q] = *reinterpret_cast<const float2*>(xs + (kk + q) * XLD);
#pragma unroll
        for (int l = 0; l < CS; ++l) {
          const float4 wv = *reinterpret_cast<const float4*>(ws + l * WLD + kk);
          acc[0][l] = fmaf(wv.x, xv[0].x, acc[0][l]);
          acc[1][l] = fmaf(wv.x, xv[0].y, acc[1][l]);
          acc[0][l] = fmaf(wv.y, xv[1].x, acc[0][l]);
          acc[1][l] = fmaf(wv.y, xv[1].y, acc[1][l]);
          acc[0][l] = fmaf(wv.z, xv[2].x, acc[0][l]);
          acc[1][l] = fmaf(wv.z, xv[2].y, acc[1][l]);
          acc[0][l] = fmaf(wv.w, xv[3].x, acc[0][l]);
          acc[1][l] = fmaf(wv.w, xv[3].y, acc[1][l]);
        }
      }
    }
  }
  __syncthreads();
  float* Ys = Xs;
#pragma unroll
  for (int l = 0; l < CS; ++l) {
    Ys[(2 * lane) * YLD + w * CS + l] = acc[0][l];
    Ys[(2 * lane + 1) * YLD + w * CS + l] = acc[1][l];
  }
  __syncthreads();
  store_y<T, CS, NC, BN, YLD>(Ys, p, bias, y, n0, N, C);
}

// dW and/or dx for batch tile blockIdx.y. dxt: float32 accumulator slabs [tile][H][BN] (null: dx not
// wanted); dW null: not wanted; dw_acc non-null: add dW into it (several tiles) instead of storing.
// dW: warp w owns chunk w; lane (kp = lane % 8, np = lane / 8) sums inputs kp, kp + 8 of its 8 labels
// over batch rows [16 np, 16 np + 16), then the 4 row parts are added by shuffles.
// dX: work item (slot, 4 inputs); lane rows 2*lane, 2*lane + 1; float2 atomics into the accumulator.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    group_bwd_simt_kernel(const T* __restrict__ dy, const T* __restrict__ xt, const T* __restrict__ W,
                          const int32_t* __restrict__ I, float* __restrict__ dxt, float* __restrict__ dw_acc,
                          T* __restrict__ dW, int64_t N, int64_t H, int64_t C, int64_t K, int64_t G, int64_t Q) {
  using S = Simt;
  constexpr int CS = S::CS, NC = S::NC, BN = S::BN, KC = S::KC, XLD = S::XLD, WLD = S::WLD, DLD = S::DLD;
  extern __shared__ __align__(16) float smem[];
  float* Xs = smem;
  float* Ws = Xs + S::kXs;
  float* Dy = Ws + S::kWs;
  int* Is = reinterpret_cast<int*>(Dy + S::kDy);
  __shared__ Plan<NC> p;
  make_plan<CS, NC>(p, blockIdx.x, G, Q, C);
  __syncthreads();

  const bool want_dx = dxt != nullptr, want_dw = dW != nullptr;
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t tile_off = static_cast<int64_t>(blockIdx.y) * H * BN;
  const int nl = p.nl[w], slot = p.slot[w];
  const long long ls = p.ls[w];
  load_dy<T, float, CS, NC, BN, DLD>(Dy, p, dy, n0, N, C);

#pragma unroll 1
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    if (k0 > 0) __syncthreads();
    load_indices<NC, KC>(Is, p, I, K, H, k0);
    load_weights<T, float, CS, NC, KC, WLD>(Ws, p, W, K, k0);
    __syncthreads();
    if (want_dw) {
      gather_float<T, NC, KC, BN, XLD>(Xs, Is, xt + tile_off);
      __syncthreads();
      if (nl > 0) {
        const int kp = lane & 7, np = lane >> 3;
        const float* x0 = Xs + (slot * KC + kp) * XLD + 16 * np;
        const float* x1 = x0 + 8 * XLD;
        const float* d = Dy + w * CS * DLD + 16 * np;
        float a[CS][2];
#pragma unroll
        for (int l = 0; l < CS; ++l) a[l][0] = a[l][1] = 0.f;
#pragma unroll
        for (int i = 0; i < 16; i += 4) {
          const float4 u0 = *reinterpret_cast<const float4*>(x0 + i);
          const float4 u1 = *reinterpret_cast<const float4*>(x1 + i);
#pragma unroll
          for (int l = 0; l < CS; ++l) {
            const float4 dv = *reinterpret_cast<const float4*>(d + l * DLD + i);
            a[l][0] = fmaf(dv.x, u0.x, fmaf(dv.y, u0.y, fmaf(dv.z, u0.z, fmaf(dv.w, u0.w, a[l][0]))));
            a[l][1] = fmaf(dv.x, u1.x, fmaf(dv.y, u1.y, fmaf(dv.z, u1.z, fmaf(dv.w, u1.w, a[l][1]))));
          }
        }
#pragma unroll
        for (int l = 0; l < CS; ++l) {
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            a[l][q] += __shfl_xor_sync(0xffffffffu, a[l][q], 8);
            a[l][q] += __shfl_xor_sync(0xffffffffu, a[l][q], 16);
          }
        }
        // Row part np writes labels 2np, 2np + 1 (unrolled: no dynamic register indexing).
#pragma unroll
        for (int l = 0; l < CS; ++l) {
          if ((l >> 1) != np || l >= nl) continue;
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const int64_t k = k0 + kp + 8 * q;
            if (k >= K) continue;
            const int64_t e = (ls + l) * K + k;
            if (dw_acc) {
              atomicAdd(dw_acc + e, a[l][q]);
            } else {
              GE<T>::store_stream(dW + e, a[l][q]);
            }
          }
        }
      }
    }
    if (want_dx) {
      float* acc_tile = dxt + tile_off + 2 * lane;
#pragma unroll 1
      for (int item = w; item < NC * 4; item += kWarps) {
        const int s = item >> 2, kq = item & 3;
        if (p.sg[s] < 0) continue;  // warp-uniform
        float a[2][4];
#pragma unroll
        for (int q = 0; q < 4; ++q) a[0][q] = a[1][q] = 0.f;
#pragma unroll 1
        for (int ch = p.cb[s]; ch < p.ce[s]; ++ch) {
          const float* d = Dy + ch * CS * DLD + 2 * lane;
          const float* wr = Ws + ch * CS * WLD + 4 * kq;
#pragma unroll
          for (int l = 0; l < CS; ++l) {  // labels past the chunk's end are zero in Dy and Ws
            const float2 dv = *reinterpret_cast<const float2*>(d + l * DLD);
            const float4 wv = *reinterpret_cast<const float4*>(wr + l * WLD);
            a[0][0] = fmaf(dv.x, wv.x, a[0][0]);
            a[0][1] = fmaf(dv.x, wv.y, a[0][1]);
            a[0][2] = fmaf(dv.x, wv.z, a[0][2]);
            a[0][3] = fmaf(dv.x, wv.w, a[0][3]);
            a[1][0] = fmaf(dv.y, wv.x, a[1][0]);
            a[1][1] = fmaf(dv.y, wv.y, a[1][1]);
            a[1][2] = fmaf(dv.y, wv.z, a[1][2]);
            a[1][3] = fmaf(dv.y, wv.w, a[1][3]);
          }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int j = Is[s * KC + 4 * kq + q];
          if (j >= 0) atomic_add2(acc_tile + static_cast<int64_t>(j) * BN, a[0][q], a[1][q]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- tensor-core kernels (bf16, G % 16 == 0)

// Chunks of 16 labels (one 16-wide MMA tile each, never straddling two groups), 4 slots, K-chunk 32.
// Shared row strides are multiples of 8 elements (wmma) with a 16-byte skew against bank conflicts.
struct MmaFwd {
  static constexpr int CS = 16, NC = 4, BN = 128, KC = 32;
  static constexpr int XLD = BN + 8;  // Xs [slot][k][n] bf16
  static constexpr int WLD = KC + 8;  // Ws [label][k] bf16
  static constexpr int YLD = NC * CS + 4;  // Ys [n][label] float (aliases Xs)
  static constexpr int kXBytes = NC * KC * XLD * 2, kYBytes = BN * YLD * 4;
  static constexpr int kBytes = kXBytes > kYBytes ? kXBytes : kYBytes;
};

struct MmaBwd {
  static constexpr int CS = 16, NC = 4, BN = 64, KC = 32;
  static constexpr int XLD = BN + 8;  // Xs [slot][k][n] bf16
  static constexpr int WLD = KC + 8;  // Ws [label][k] bf16
  static constexpr int DLD = BN + 8;  // Dy [label][n] bf16
  static constexpr int SLD = 16 + 4;  // per-warp float tile [16][SLD]
};

// y for batch tile blockIdx.y (128 rows): warp w owns rows [16w, 16w + 16) of all 4 label tiles;
// Y_tile = X_slot[rows, k] . W_tile^T, both operands column-major views of the staged buffers.
__global__ void __launch_bounds__(kThreads, 2)
    group_fwd_mma_kernel(const bf16* __restrict__ xt, const bf16* __restrict__ W, const int32_t* __restrict__ I,
                         const bf16* __restrict__ bias, bf16* __restrict__ y, int64_t N, int64_t H, int64_t C,
                         int64_t K, int64_t G, int64_t Q) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  static_assert(MmaFwd::WLD > 0 && MmaFwd::kBytes > 0, "layout constants in use");
  __trap();  // the launcher picks this kernel only on sm_80 and newer
#else
  using namespace nvcuda;
  using S = MmaFwd;
  constexpr int CS = S::CS, NC = S::NC, BN = S::BN, KC = S::KC, XLD = S::XLD, WLD = S::WLD, YLD = S::YLD;
  __shared__ __align__(32) unsigned char xbuf[S::kBytes];
  __shared__ __align__(32) bf16 Ws[NC * CS * WLD];
  __shared__ int Is[NC * KC];
  __shared__ Plan<NC> p;
  bf16* Xs = reinterpret_cast<bf16*>(xbuf);
  make_plan<CS, NC>(p, blockIdx.x, G, Q, C);
  __syncthreads();

  const int w = threadIdx.x / 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const bf16* slab = xt + static_cast<int64_t>(blockIdx.y) * H * BN;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NC];
#pragma unroll
  for (int t = 0; t < NC; ++t) wmma::fill_fragment(acc[t], 0.f);

#pragma unroll 1
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    if (k0 > 0) __syncthreads();
    load_indices<NC, KC>(Is, p, I, K, H, k0);
    load_weights<bf16, bf16, CS, NC, KC, WLD>(Ws, p, W, K, k0);
    __syncthreads();
    gather_bf16<NC, KC, BN, XLD>(Xs, Is, slab);
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < KC; ks += 16) {
#pragma unroll
      for (int t = 0; t < NC; ++t) {
        if (p.nl[t] == 0) continue;  // block-uniform
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
        wmma::load_matrix_sync(a, Xs + (p.slot[t] * KC + ks) * XLD + 16 * w, XLD);
        wmma::load_matrix_sync(b, Ws + t * CS * WLD + ks, WLD);
        wmma::mma_sync(acc[t], a, b, acc[t]);
      }
    }
  }
  __syncthreads();
  float* Ys = reinterpret_cast<float*>(xbuf);
#pragma unroll
  for (int t = 0; t < NC; ++t) wmma::store_matrix_sync(Ys + 16 * w * YLD + t * CS, acc[t], YLD, wmma::mem_row_major);
  __syncthreads();
  store_y<bf16, CS, NC, BN, YLD>(Ys, p, bias, y, n0, N, C);
#endif
}

// dW and/or dx for batch tile blockIdx.y (64 rows), arguments as group_bwd_simt_kernel.
// dW: warp w owns output tile (labels 16*(w/2), inputs 16*(w%2)) = dY^T . X over the 4 row steps.
// dX: warp w owns rows 16*(w%4), inputs 16*(w/4) of every slot: dY[rows, slot labels] . W[labels, k],
// staged through a per-warp float tile, then float atomics (16 consecutive rows per half-warp).
__global__ void __launch_bounds__(kThreads, 2)
    group_bwd_mma_kernel(const bf16* __restrict__ dy, const bf16* __restrict__ xt, const bf16* __restrict__ W,
                         const int32_t* __restrict__ I, float* __restrict__ dxt, float* __restrict__ dw_acc,
                         bf16* __restrict__ dW, int64_t N, int64_t H, int64_t C, int64_t K, int64_t G, int64_t Q) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  static_assert(MmaBwd::XLD > 0 && MmaBwd::WLD > 0 && MmaBwd::DLD > 0 && MmaBwd::SLD > 0, "layout constants in use");
  __trap();  // the launcher picks this kernel only on sm_80 and newer
#else
  using namespace nvcuda;
  using S = MmaBwd;
  constexpr int CS = S::CS, NC = S::NC, BN = S::BN, KC = S::KC, XLD = S::XLD, WLD = S::WLD, DLD = S::DLD,
                SLD = S::SLD;
  __shared__ __align__(32) bf16 Xs[NC * KC * XLD];
  __shared__ __align__(32) bf16 Ws[NC * CS * WLD];
  __shared__ __align__(32) bf16 Dy[NC * CS * DLD];
  __shared__ __align__(32) float Sc[kWarps * 16 * SLD];
  __shared__ int Is[NC * KC];
  __shared__ Plan<NC> p;
  make_plan<CS, NC>(p, blockIdx.x, G, Q, C);
  __syncthreads();

  const bool want_dx = dxt != nullptr, want_dw = dW != nullptr;
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t tile_off = static_cast<int64_t>(blockIdx.y) * H * BN;
  float* sc = Sc + w * 16 * SLD;
  load_dy<bf16, bf16, CS, NC, BN, DLD>(Dy, p, dy, n0, N, C);

#pragma unroll 1
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    if (k0 > 0) __syncthreads();
    load_indices<NC, KC>(Is, p, I, K, H, k0);
    load_weights<bf16, bf16, CS, NC, KC, WLD>(Ws, p, W, K, k0);
    __syncthreads();
    if (want_dw) {
      gather_bf16<NC, KC, BN, XLD>(Xs, Is, xt + tile_off);
      __syncthreads();
      const int t = w >> 1, kt = w & 1;
      const int nl = p.nl[t];
      if (nl > 0) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int ns = 0; ns < BN; ns += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
          wmma::load_matrix_sync(a, Dy + t * CS * DLD + ns, DLD);
          wmma::load_matrix_sync(b, Xs + (p.slot[t] * KC + kt * 16) * XLD + ns, XLD);
          wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(sc, acc, SLD, wmma::mem_row_major);
        __syncwarp();
        const long long ls = p.ls[t];
        for (int e = lane; e < 256; e += 32) {
          const int r = e >> 4, cc = e & 15;
          const int64_t k = k0 + kt * 16 + cc;
          if (r < nl && k < K) {
            const int64_t idx = (ls + r) * K + k;
            if (dw_acc) {
              atomicAdd(dw_acc + idx, sc[r * SLD + cc]);
            } else {
              GE<bf16>::store_stream(dW + idx, sc[r * SLD + cc]);
            }
          }
        }
        __syncwarp();
      }
    }
    if (want_dx) {
      const int rt = w & 3, kt = w >> 2;
      float* acc_tile = dxt + tile_off + rt * 16;
#pragma unroll 1
      for (int s = 0; s < NC; ++s) {
        if (p.sg[s] < 0) continue;  // block-uniform
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll 1
        for (int ch = p.cb[s]; ch < p.ce[s]; ++ch) {
          if (p.nl[ch] == 0) continue;
          wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
          wmma::load_matrix_sync(a, Dy + ch * CS * DLD + rt * 16, DLD);
          wmma::load_matrix_sync(b, Ws + ch * CS * WLD + kt * 16, WLD);
          wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(sc, acc, SLD, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int r = e & 15, cc = e >> 4;
          const int j = Is[s * KC + kt * 16 + cc];
          if (j >= 0) atomicAdd(acc_tile + static_cast<int64_t>(j) * BN + r, sc[r * SLD + cc]);
        }
        __syncwarp();
      }
    }
  }
#endif
}

// ---------------------------------------------------------------- layout kernels

// src [R, S] row-major -> dst slabs [rows_pad / NT][S][NT]: dst[(r / NT * S + s) * NT + r % NT] for
// r < rows_pad; rows >= R are zeros. blockIdx.x: 32 rows, blockIdx.y: 32 columns.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    group_to_tiles_kernel(const T* __restrict__ src, T* __restrict__ dst, int64_t R, int64_t S, int64_t rows_pad,
                          int NT) {
  __shared__ T tile[32][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t r_base = static_cast<int64_t>(blockIdx.x) * 32;
  const int64_t s_base = static_cast<int64_t>(blockIdx.y) * 32;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r_base + ty + 8 * i, s = s_base + tx;
    T v = GE<T>::from_float(0.f);
    if (r < R && s < S) v = src[r * S + s];
    tile[ty + 8 * i][tx] = v;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t s = s_base + ty + 8 * i, r = r_base + tx;
    if (r < rows_pad && s < S) dst[(r / NT * S + s) * NT + r % NT] = tile[tx][ty + 8 * i];
  }
}

// Inverse for the float32 accumulator: src slabs [tiles][S][NT] -> dst [R, S] in T.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    group_from_tiles_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t R, int64_t S, int NT) {
  __shared__ float tile[32][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t r_base = static_cast<int64_t>(blockIdx.x) * 32;
  const int64_t s_base = static_cast<int64_t>(blockIdx.y) * 32;
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
    if (r < R && s < S) dst[r * S + s] = GE<T>::from_float(tile[tx][ty + 8 * i]);
  }
}

template <typename T>
__global__ void group_float_to_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = GE<T>::from_float(src[i]);
}

// ---------------------------------------------------------------- host-side planning

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align_up(size_t v) { return (v + 255) / 256 * 256; }

// "1" / "0" / unset (default). Read on every call so a process can compare the variants.
bool env_flag(const char* name, bool dflt) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return dflt;
  if (std::strcmp(s, "1") == 0) return true;
  if (std::strcmp(s, "0") == 0) return false;
  throw std::runtime_error(std::string("xmc group FFI CUDA: ") + name + " must be '1' or '0', got '" + s + "'");
}

// G = 1 is the plain layer: run its kernels (XMC_FFI_GROUP_PLAIN=0: the group kernels).
bool plain_for(int64_t G) { return G == 1 && env_flag("XMC_FFI_GROUP_PLAIN", true); }

int device_major() {
  int dev = 0, major = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  return major;
}

// Tensor cores for bf16 when no 16-label tile straddles two groups: G % 16 == 0 or one group holds
// every label (XMC_FFI_GROUP_MMA=0: SIMT always).
bool use_mma(FfiDtype dtype, int64_t G, int64_t C) {
  return dtype == FfiDtype::kBFloat16 && (G % 16 == 0 || G >= C) && env_flag("XMC_FFI_GROUP_MMA", true) &&
         device_major() >= 8;
}

// G >= C: every label is in group 0, the same as G = C (and no empty slices of a huge group).
int64_t effective_group(int64_t G, int64_t C) { return std::min(G, C); }

void check_group(int64_t G) {
  if (G < 1) throw std::runtime_error("xmc group FFI CUDA: group_size must be >= 1, got " + std::to_string(G));
}

// Grid of the main kernels: (blocks over labels, batch tiles).
dim3 main_grid(int64_t G, int64_t Q, int CS, int NC, int64_t tiles) {
  const int64_t blocks = plan_blocks(G, Q, CS, NC);
  if (blocks > 0x7fffffff) throw std::runtime_error("xmc group FFI CUDA: too many labels for one launch");
  if (tiles > 65535)
    throw std::runtime_error("xmc group FFI CUDA: batch of " + std::to_string(tiles) +
                             " tiles exceeds the grid limit (65,535 tiles)");
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(tiles));
}

// ---------------------------------------------------------------- launch helpers

template <typename T>
void launch_to_tiles(const T* src, T* dst, int64_t R, int64_t S, int64_t rows_pad, int NT, cudaStream_t stream) {
  if (S <= 0 || rows_pad <= 0) return;
  if (ceil_div(S, 32) > 65535) throw std::runtime_error("xmc group FFI CUDA: in_features too large");
  const dim3 grid(static_cast<unsigned>(ceil_div(rows_pad, 32)), static_cast<unsigned>(ceil_div(S, 32)));
  const auto kernel = group_to_tiles_kernel<T>;
  XMC_GROUP_LAUNCH(kernel, grid, kThreads, 0, stream, src, dst, R, S, rows_pad, NT);
  check_launch("group_to_tiles_kernel");
}

template <typename T>
void launch_from_tiles(const float* src, T* dst, int64_t R, int64_t S, int NT, cudaStream_t stream) {
  if (S <= 0 || R <= 0) return;
  if (ceil_div(S, 32) > 65535) throw std::runtime_error("xmc group FFI CUDA: in_features too large");
  const dim3 grid(static_cast<unsigned>(ceil_div(R, 32)), static_cast<unsigned>(ceil_div(S, 32)));
  const auto kernel = group_from_tiles_kernel<T>;
  XMC_GROUP_LAUNCH(kernel, grid, kThreads, 0, stream, src, dst, R, S, NT);
  check_launch("group_from_tiles_kernel");
}

template <typename T>
void launch_float_to(const float* src, T* dst, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kThreads), 65536));
  const auto kernel = group_float_to_kernel<T>;
  XMC_GROUP_LAUNCH(kernel, blocks, kThreads, 0, stream, src, dst, n);
  check_launch("group_float_to_kernel");
}

// ---------------------------------------------------------------- forward

template <typename T>
void forward_impl(const T* x, const T* W, const int32_t* I, const T* bias, T* y, int64_t N, int64_t H, int64_t C,
                  int64_t K, int64_t G, bool mma, cudaStream_t stream) {
  const int64_t Q = ceil_div(C, G);
  const int BN = mma ? MmaFwd::BN : Simt::BN;
  const int64_t tiles = ceil_div(N, BN);
  const dim3 grid = mma ? main_grid(G, Q, MmaFwd::CS, MmaFwd::NC, tiles) : main_grid(G, Q, Simt::CS, Simt::NC, tiles);
  const bool gather = K > 0 && H > 0;
  Scratch xt(gather ? static_cast<size_t>(tiles) * BN * static_cast<size_t>(H) * sizeof(T) : 0, stream);
  if (gather) launch_to_tiles<T>(x, xt.as<T>(), N, H, tiles * BN, BN, stream);
  if constexpr (std::is_same<T, bf16>::value) {
    if (mma) {
      XMC_GROUP_LAUNCH(group_fwd_mma_kernel, grid, kThreads, 0, stream, xt.as<bf16>(), W, I, bias, y, N, H, C, K,
                       G, Q);
      check_launch("group_fwd_mma_kernel");
      return;
    }
  }
  const auto kernel = group_fwd_simt_kernel<T>;
  XMC_GROUP_LAUNCH(kernel, grid, kThreads, 0, stream, xt.as<T>(), W, I, bias, y, N, H, C, K, G, Q);
  check_launch("group_fwd_simt_kernel");
}

// ---------------------------------------------------------------- backward

// Workspace: [dx accumulator: float32 slabs, need_input] [transposed x, need_weight]
// [float32 dW accumulator: bf16 with several batch tiles]; offsets 256-aligned. Every backward path
// tiles the batch by 64 rows.
struct BwdLayout {
  int64_t tiles;
  bool dw_acc;
  size_t dxt, xt, dw, total;
};

BwdLayout bwd_layout(FfiDtype dtype, int64_t N, int64_t H, int64_t C, int64_t K, bool need_input, bool need_weight) {
  static_assert(Simt::BN == MmaBwd::BN, "one batch tiling for every backward path");
  BwdLayout l{};
  l.tiles = ceil_div(N, Simt::BN);
  const size_t slab = static_cast<size_t>(l.tiles) * Simt::BN * static_cast<size_t>(H);
  const size_t e = dtype == FfiDtype::kFloat32 ? 4 : 2;
  size_t off = 0;
  l.dxt = off;
  if (need_input) off += align_up(slab * sizeof(float));
  l.xt = off;
  if (need_weight) off += align_up(slab * e);
  l.dw = off;
  l.dw_acc = need_weight && l.tiles > 1 && dtype != FfiDtype::kFloat32;
  if (l.dw_acc) off += align_up(static_cast<size_t>(C) * static_cast<size_t>(K) * sizeof(float));
  l.total = off;
  return l;
}

bool trivial(int64_t N, int64_t H, int64_t C, int64_t K) { return N <= 0 || H <= 0 || C <= 0 || K <= 0; }

template <typename T>
void backward_impl(const T* dy, const T* x, const T* W, const int32_t* I, T* dx, T* dW, char* ws, size_t ws_bytes,
                   int64_t N, int64_t H, int64_t C, int64_t K, int64_t G, bool mma, cudaStream_t stream) {
  const bool need_input = dx != nullptr, need_weight = dW != nullptr;
  const FfiDtype dtype = std::is_same<T, float>::value ? FfiDtype::kFloat32 : FfiDtype::kBFloat16;
  const BwdLayout l = bwd_layout(dtype, N, H, C, K, need_input, need_weight);
  if (ws == nullptr || ws_bytes < l.total)
    throw std::runtime_error("xmc group FFI CUDA: backward needs " + std::to_string(l.total) +
                             " bytes of workspace, got " + std::to_string(ws_bytes));
  const int64_t Q = ceil_div(C, G);
  const int BN = Simt::BN;
  const dim3 grid =
      mma ? main_grid(G, Q, MmaBwd::CS, MmaBwd::NC, l.tiles) : main_grid(G, Q, Simt::CS, Simt::NC, l.tiles);
  float* dxt = need_input ? reinterpret_cast<float*>(ws + l.dxt) : nullptr;
  T* xt = need_weight ? reinterpret_cast<T*>(ws + l.xt) : nullptr;
  float* dw_acc = nullptr;
  if (need_weight && l.tiles > 1) {
    dw_acc = l.dw_acc ? reinterpret_cast<float*>(ws + l.dw) : reinterpret_cast<float*>(dW);  // float32: in place
    check_cuda(cudaMemsetAsync(dw_acc, 0, static_cast<size_t>(C) * K * sizeof(float), stream), "cudaMemsetAsync");
  }
  if (need_input)
    check_cuda(cudaMemsetAsync(dxt, 0, static_cast<size_t>(l.tiles) * BN * H * sizeof(float), stream),
               "cudaMemsetAsync");
  if (need_weight) launch_to_tiles<T>(x, xt, N, H, l.tiles * BN, BN, stream);
  bool launched = false;
  if constexpr (std::is_same<T, bf16>::value) {
    if (mma) {
      XMC_GROUP_LAUNCH(group_bwd_mma_kernel, grid, kThreads, 0, stream, dy, xt, W, I, dxt, dw_acc, dW, N, H, C, K,
                       G, Q);
      check_launch("group_bwd_mma_kernel");
      launched = true;
    }
  }
  if (!launched) {
    const auto kernel = group_bwd_simt_kernel<T>;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(Simt::kBwdSmem)),
               "cudaFuncSetAttribute");
    XMC_GROUP_LAUNCH(kernel, grid, kThreads, Simt::kBwdSmem, stream, dy, xt, W, I, dxt, dw_acc, dW, N, H, C, K, G,
                     Q);
    check_launch("group_bwd_simt_kernel");
  }
  if (need_input) launch_from_tiles<T>(dxt, dx, N, H, BN, stream);
  if (l.dw_acc) launch_float_to<T>(dw_acc, dW, C * K, stream);
}

}  // namespace

// ---------------------------------------------------------------- contract

void ffi_group_forward_cuda(FfiDtype dtype, const void* x, const void* values, const int32_t* indices,
                            const void* bias, void* y, int64_t N, int64_t H, int64_t C, int64_t K, int64_t G,
                            cudaStream_t stream) {
  check_group(G);
  if (plain_for(G)) return ffi_forward_cuda(dtype, x, values, indices, bias, y, N, H, C, K, stream);
  if (N <= 0 || C <= 0) return;
  const bool mma = use_mma(dtype, G, C);
  G = effective_group(G, C);
  switch (dtype) {
    case FfiDtype::kFloat32:
      return forward_impl<float>(static_cast<const float*>(x), static_cast<const float*>(values), indices,
                                 static_cast<const float*>(bias), static_cast<float*>(y), N, H, C, K, G, false,
                                 stream);
    case FfiDtype::kBFloat16:
      return forward_impl<bf16>(static_cast<const bf16*>(x), static_cast<const bf16*>(values), indices,
                                static_cast<const bf16*>(bias), static_cast<bf16*>(y), N, H, C, K, G, mma, stream);
  }
  throw std::runtime_error("xmc group FFI CUDA: unknown dtype");
}

size_t ffi_group_backward_cuda_workspace_bytes(FfiDtype dtype, int64_t N, int64_t H, int64_t C, int64_t K, int64_t G,
                                               bool need_input, bool need_weight) {
  check_group(G);
  if (plain_for(G)) return ffi_backward_cuda_workspace_bytes(dtype, N, H, C, K, need_input, need_weight);
  if (trivial(N, H, C, K) || (!need_input && !need_weight)) return 0;
  return bwd_layout(dtype, N, H, C, K, need_input, need_weight).total;
}

void ffi_group_backward_cuda(FfiDtype dtype, const void* grad_y, const void* x, const void* values,
                             const int32_t* indices, void* grad_x, void* grad_values, void* workspace,
                             size_t workspace_bytes, int64_t N, int64_t H, int64_t C, int64_t K, int64_t G,
                             cudaStream_t stream) {
  check_group(G);
  if (plain_for(G))
    return ffi_backward_cuda(dtype, grad_y, x, values, indices, grad_x, grad_values, workspace, workspace_bytes, N, H,
                             C, K, stream);
  const bool need_input = grad_x != nullptr, need_weight = grad_values != nullptr;
  if (!need_input && !need_weight) return;
  const size_t e = dtype == FfiDtype::kFloat32 ? 4 : 2;
  if (trivial(N, H, C, K)) {  // every wanted element is zero (or there is none)
    if (need_input && N > 0 && H > 0)
      check_cuda(cudaMemsetAsync(grad_x, 0, static_cast<size_t>(N) * H * e, stream), "cudaMemsetAsync");
    if (need_weight && C > 0 && K > 0)
      check_cuda(cudaMemsetAsync(grad_values, 0, static_cast<size_t>(C) * K * e, stream), "cudaMemsetAsync");
    return;
  }
  const bool mma = use_mma(dtype, G, C);
  G = effective_group(G, C);
  char* ws = static_cast<char*>(workspace);
  switch (dtype) {
    case FfiDtype::kFloat32:
      return backward_impl<float>(static_cast<const float*>(grad_y), static_cast<const float*>(x),
                                  static_cast<const float*>(values), indices, static_cast<float*>(grad_x),
                                  static_cast<float*>(grad_values), ws, workspace_bytes, N, H, C, K, G, false, stream);
    case FfiDtype::kBFloat16:
      return backward_impl<bf16>(static_cast<const bf16*>(grad_y), static_cast<const bf16*>(x),
                                 static_cast<const bf16*>(values), indices, static_cast<bf16*>(grad_x),
                                 static_cast<bf16*>(grad_values), ws, workspace_bytes, N, H, C, K, G, mma, stream);
  }
  throw std::runtime_error("xmc group FFI CUDA: unknown dtype");
}

}  // namespace xmc

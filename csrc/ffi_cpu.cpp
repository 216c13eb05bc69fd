// CPU kernels of the fixed fan-in (FFI) sparse layer; contract in ffi_cpu.h.
//
// Layout choices (why they are fast):
// - forward and dW work on a transposed copy xT [H, n] of a chunk of n batch rows (converted to the
//   accumulation type once). A connection (c, k) then touches one contiguous row xT[I[c,k], :], so the
//   inner loops are unit-stride vector loops over the batch instead of scalar gathers. Threads split the
//   outputs c in tiles of kTile; each tile keeps its accumulators [kTile, n] in L1 and writes y in
//   kTile-wide contiguous pieces.
// - dx is a scatter: threads own blocks of kDxRows batch rows with a private transposed accumulator
//   dxT [H, kDxRows] (no atomics), stream over all (c, k) once per block, and write their dx rows at the
//   end. When there are fewer row blocks than threads, the outputs are split too and the partial
//   accumulators summed afterwards.
// - work is handed out dynamically in small chunks: on a shared machine a thread that loses its core
//   does not hold the whole call back (results do not depend on the schedule: every output or row
//   block is summed by one thread in a fixed order).
// - the innermost loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 (target_clones picks one
//   at load time), so the build stays portable without -march=native.
#include "ffi_cpu.h"
#include "cpu_common.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>


namespace xmc {
namespace {

constexpr int64_t kTile = 16;            // outputs per forward / dW work item
constexpr int64_t kMaxChunkRows = 512;   // batch rows per transposed chunk of x
constexpr int64_t kChunkElems = 1 << 23; // budget of the transposed chunk (elements)
constexpr int64_t kDxRows = 16;          // batch rows per dx work item
constexpr int64_t kDxCols = 1024;        // outputs per dy sub-block staged by a dx work item

using cpu::Elem;
using cpu::bf16_to_float;
using cpu::clamp_threads;
using cpu::float_to_bf16;

// ---- innermost loops (templated on the accumulation type, instantiated below per ISA) ----

// acc[t, :nc] = bias[t] + sum_k w[t,k] * xT[idx[t,k], :nc] for t < T.
template <typename A>
XMC_INLINE void forward_tile(const A* xT, int64_t nc, const A* w, const int32_t* idx, const A* bias, int64_t T,
                             int64_t K, A* acc) {
  for (int64_t t = 0; t < T; ++t) {
    A* a = acc + t * nc;
    const A b = bias ? bias[t] : A(0);
    for (int64_t n = 0; n < nc; ++n) a[n] = b;
    const A* wt = w + t * K;
    const int32_t* it = idx + t * K;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      const A w0 = wt[k], w1 = wt[k + 1], w2 = wt[k + 2], w3 = wt[k + 3];
      const A* x0 = xT + static_cast<int64_t>(it[k]) * nc;
      const A* x1 = xT + static_cast<int64_t>(it[k + 1]) * nc;
      const A* x2 = xT + static_cast<int64_t>(it[k + 2]) * nc;
      const A* x3 = xT + static_cast<int64_t>(it[k + 3]) * nc;
#pragma omp simd
      for (int64_t n = 0; n < nc; ++n) a[n] += w0 * x0[n] + w1 * x1[n] + w2 * x2[n] + w3 * x3[n];
    }
    for (; k < K; ++k) {
      const A w0 = wt[k];
      const A* x0 = xT + static_cast<int64_t>(it[k]) * nc;
#pragma omp simd
      for (int64_t n = 0; n < nc; ++n) a[n] += w0 * x0[n];
    }
  }
}

// out[t,k] (+)= sum_n dyT[t, n] * xT[idx[t,k], n] for t < T.
template <typename A>
XMC_INLINE void weight_tile(const A* xT, int64_t nc, const A* dyT, const int32_t* idx, int64_t T, int64_t K,
                            bool accumulate, A* out) {
  for (int64_t t = 0; t < T; ++t) {
    const A* d = dyT + t * nc;
    const int32_t* it = idx + t * K;
    A* o = out + t * K;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      const A* x0 = xT + static_cast<int64_t>(it[k]) * nc;
      const A* x1 = xT + static_cast<int64_t>(it[k + 1]) * nc;
      const A* x2 = xT + static_cast<int64_t>(it[k + 2]) * nc;
      const A* x3 = xT + static_cast<int64_t>(it[k + 3]) * nc;
      A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t n = 0; n < nc; ++n) {
        s0 += d[n] * x0[n];
        s1 += d[n] * x1[n];
        s2 += d[n] * x2[n];
        s3 += d[n] * x3[n];
      }
      if (accumulate) {
        o[k] += s0, o[k + 1] += s1, o[k + 2] += s2, o[k + 3] += s3;
      } else {
        o[k] = s0, o[k + 1] = s1, o[k + 2] = s2, o[k + 3] = s3;
      }
    }
    for (; k < K; ++k) {
      const A* x0 = xT + static_cast<int64_t>(it[k]) * nc;
      A s0 = 0;
#pragma omp simd reduction(+ : s0)
      for (int64_t n = 0; n < nc; ++n) s0 += d[n] * x0[n];
      o[k] = accumulate ? o[k] + s0 : s0;
    }
  }
}

// dxT[idx[c,k], :nb] += w[c,k] * dyT[c, :nb] for c < cc.
template <typename A, int64_t NB>
XMC_INLINE void input_block_fixed(const A* dyT, const A* w, const int32_t* idx, int64_t cc, int64_t K, A* dxT) {
  for (int64_t c = 0; c < cc; ++c) {
    const A* d = dyT + c * NB;
    for (int64_t k = 0; k < K; ++k) {
      const A wk = w[c * K + k];
      A* r = dxT + static_cast<int64_t>(idx[c * K + k]) * NB;
#pragma omp simd
      for (int64_t i = 0; i < NB; ++i) r[i] += wk * d[i];
    }
  }
}

template <typename A>
XMC_INLINE void input_block(const A* dyT, const A* w, const int32_t* idx, int64_t cc, int64_t K, int64_t nb,
                            A* dxT) {
  if (nb == kDxRows) return input_block_fixed<A, kDxRows>(dyT, w, idx, cc, K, dxT);
  for (int64_t c = 0; c < cc; ++c) {
    const A* d = dyT + c * nb;
    for (int64_t k = 0; k < K; ++k) {
      const A wk = w[c * K + k];
      A* r = dxT + static_cast<int64_t>(idx[c * K + k]) * nb;
      for (int64_t i = 0; i < nb; ++i) r[i] += wk * d[i];
    }
  }
}

XMC_CLONES void forward_tile_f32(const float* xT, int64_t nc, const float* w, const int32_t* idx,
                                 const float* bias, int64_t T, int64_t K, float* acc) {
  forward_tile<float>(xT, nc, w, idx, bias, T, K, acc);
}
void forward_tile_f64(const double* xT, int64_t nc, const double* w, const int32_t* idx, const double* bias,
                      int64_t T, int64_t K, double* acc) {
  forward_tile<double>(xT, nc, w, idx, bias, T, K, acc);
}
XMC_CLONES void weight_tile_f32(const float* xT, int64_t nc, const float* dyT, const int32_t* idx, int64_t T,
                                int64_t K, bool accumulate, float* out) {
  weight_tile<float>(xT, nc, dyT, idx, T, K, accumulate, out);
}
void weight_tile_f64(const double* xT, int64_t nc, const double* dyT, const int32_t* idx, int64_t T, int64_t K,
                     bool accumulate, double* out) {
  weight_tile<double>(xT, nc, dyT, idx, T, K, accumulate, out);
}
XMC_CLONES void input_block_f32(const float* dyT, const float* w, const int32_t* idx, int64_t cc, int64_t K,
                                int64_t nb, float* dxT) {
  input_block<float>(dyT, w, idx, cc, K, nb, dxT);
}
void input_block_f64(const double* dyT, const double* w, const int32_t* idx, int64_t cc, int64_t K, int64_t nb,
                     double* dxT) {
  input_block<double>(dyT, w, idx, cc, K, nb, dxT);
}

inline void call_forward_tile(const float* xT, int64_t nc, const float* w, const int32_t* idx, const float* b,
                              int64_t T, int64_t K, float* acc) {
  forward_tile_f32(xT, nc, w, idx, b, T, K, acc);
}
inline void call_forward_tile(const double* xT, int64_t nc, const double* w, const int32_t* idx,
                              const double* b, int64_t T, int64_t K, double* acc) {
  forward_tile_f64(xT, nc, w, idx, b, T, K, acc);
}
inline void call_weight_tile(const float* xT, int64_t nc, const float* dyT, const int32_t* idx, int64_t T,
                             int64_t K, bool accumulate, float* out) {
  weight_tile_f32(xT, nc, dyT, idx, T, K, accumulate, out);
}
inline void call_weight_tile(const double* xT, int64_t nc, const double* dyT, const int32_t* idx, int64_t T,
                             int64_t K, bool accumulate, double* out) {
  weight_tile_f64(xT, nc, dyT, idx, T, K, accumulate, out);
}
inline void call_input_block(const float* dyT, const float* w, const int32_t* idx, int64_t cc, int64_t K,
                             int64_t nb, float* dxT) {
  input_block_f32(dyT, w, idx, cc, K, nb, dxT);
}
inline void call_input_block(const double* dyT, const double* w, const int32_t* idx, int64_t cc, int64_t K,
                             int64_t nb, double* dxT) {
  input_block_f64(dyT, w, idx, cc, K, nb, dxT);
}

// ---- drivers ----

// Rows per transposed chunk of x: all of them when they fit the budget, at least 16.
int64_t chunk_rows(int64_t N, int64_t H) {
  const int64_t by_budget = std::max<int64_t>(16, kChunkElems / std::max<int64_t>(H, 1));
  return std::max<int64_t>(1, std::min({N, kMaxChunkRows, by_budget}));
}

// xT[h, i] = x[n0 + i, h] for i < nc, in the accumulation type.
template <typename E, typename A>
void transpose_rows(const E* x, int64_t n0, int64_t nc, int64_t H, A* xT, int nthreads) {
  constexpr int64_t kB = 64;
  const int64_t hblocks = (H + kB - 1) / kB;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 8)
  for (int64_t hb = 0; hb < hblocks; ++hb) {
    const int64_t h0 = hb * kB, h1 = std::min(H, h0 + kB);
    for (int64_t i = 0; i < nc; ++i) {
      const E* row = x + (n0 + i) * H;
      for (int64_t h = h0; h < h1; ++h) xT[h * nc + i] = Elem<E>::load(row[h]);
    }
  }
}

template <typename E>
void forward_impl(const E* x, const E* W, const int32_t* I, const E* bias, E* y, int64_t N, int64_t H, int64_t C,
                  int64_t K, int nthreads) {
  using A = typename Elem<E>::Acc;
  constexpr bool kSame = std::is_same_v<E, A>;
  if (N == 0 || C == 0) return;
  const int64_t rows = chunk_rows(N, H);
  const int64_t tiles = (C + kTile - 1) / kTile;
  const int64_t per_thread = kTile * rows + kTile * K + kTile;
  std::vector<A> xT(static_cast<size_t>(H * rows));
  std::vector<A> scratch(static_cast<size_t>(per_thread * nthreads));
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nc = std::min(rows, N - n0);
    transpose_rows(x, n0, nc, H, xT.data(), nthreads);
#pragma omp parallel num_threads(nthreads)
    {
      A* acc = scratch.data() + per_thread * omp_get_thread_num();
      A* wbuf = acc + kTile * rows;
      A* bbuf = wbuf + kTile * K;
#pragma omp for schedule(dynamic, 8)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t c0 = tile * kTile, T = std::min(kTile, C - c0);
        const A* w;
        const A* b = nullptr;
        if constexpr (kSame) {
          w = W + c0 * K;
          if (bias) b = bias + c0;
        } else {
          for (int64_t e = 0; e < T * K; ++e) wbuf[e] = Elem<E>::load(W[c0 * K + e]);
          w = wbuf;
          if (bias) {
            for (int64_t t = 0; t < T; ++t) bbuf[t] = Elem<E>::load(bias[c0 + t]);
            b = bbuf;
          }
        }
        call_forward_tile(xT.data(), nc, w, I + c0 * K, b, T, K, acc);
        for (int64_t i = 0; i < nc; ++i) {
          E* out = y + (n0 + i) * C + c0;
          for (int64_t t = 0; t < T; ++t) out[t] = Elem<E>::store(acc[t * nc + i]);
        }
      }
    }
  }
}

template <typename E>
void backward_weight_impl(const E* dy, const E* x, const int32_t* I, E* dW, int64_t N, int64_t H, int64_t C,
                          int64_t K, int nthreads) {
  using A = typename Elem<E>::Acc;
  constexpr bool kSame = std::is_same_v<E, A>;
  if (C == 0 || K == 0) return;
  if (N == 0) {
    std::fill(dW, dW + C * K, Elem<E>::store(A(0)));
    return;
  }
  const int64_t rows = chunk_rows(N, H);
  const int64_t chunks = (N + rows - 1) / rows;
  const int64_t tiles = (C + kTile - 1) / kTile;
  const int64_t per_thread = kTile * rows + kTile * K;
  std::vector<A> xT(static_cast<size_t>(H * rows));
  std::vector<A> scratch(static_cast<size_t>(per_thread * nthreads));
  // Several chunks of a bfloat16 batch need float32 partial sums across chunks.
  std::vector<A> partial(!kSame && chunks > 1 ? static_cast<size_t>(C * K) : 0);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nc = std::min(rows, N - n0);
    const bool accumulate = n0 > 0;
    transpose_rows(x, n0, nc, H, xT.data(), nthreads);
#pragma omp parallel num_threads(nthreads)
    {
      A* dyT = scratch.data() + per_thread * omp_get_thread_num();
      A* obuf = dyT + kTile * rows;
#pragma omp for schedule(dynamic, 8)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t c0 = tile * kTile, T = std::min(kTile, C - c0);
        for (int64_t i = 0; i < nc; ++i) {
          const E* row = dy + (n0 + i) * C + c0;
          for (int64_t t = 0; t < T; ++t) dyT[t * nc + i] = Elem<E>::load(row[t]);
        }
        if constexpr (kSame) {
          call_weight_tile(xT.data(), nc, dyT, I + c0 * K, T, K, accumulate, dW + c0 * K);
        } else if (chunks > 1) {
          call_weight_tile(xT.data(), nc, dyT, I + c0 * K, T, K, accumulate, partial.data() + c0 * K);
          if (n0 + nc == N)
            for (int64_t e = 0; e < T * K; ++e) dW[c0 * K + e] = Elem<E>::store(partial[c0 * K + e]);
        } else {
          call_weight_tile(xT.data(), nc, dyT, I + c0 * K, T, K, false, obuf);
          for (int64_t e = 0; e < T * K; ++e) dW[c0 * K + e] = Elem<E>::store(obuf[e]);
        }
      }
    }
  }
}

template <typename E>
void backward_input_impl(const E* dy, const E* W, const int32_t* I, E* dx, int64_t N, int64_t H, int64_t C,
                         int64_t K, int nthreads) {
  using A = typename Elem<E>::Acc;
  constexpr bool kSame = std::is_same_v<E, A>;
  if (N == 0 || H == 0) return;
  const int64_t nb = std::min(kDxRows, N);
  const int64_t blocks = (N + nb - 1) / nb;
  // Split the outputs too when there are fewer row blocks than threads.
  const int64_t splits =
      blocks >= nthreads ? 1 : std::min<int64_t>((nthreads + blocks - 1) / blocks, std::max<int64_t>(C, 1));
  const int64_t items = blocks * splits;
  const int64_t acc_elems = H * nb;
  const int64_t staging = kDxCols * nb + kDxCols * K;
  const int64_t accumulators = splits == 1 ? nthreads : items;
  std::vector<A> acc(static_cast<size_t>(acc_elems * accumulators));
  std::vector<A> stage(static_cast<size_t>(staging * nthreads));

  auto write_rows = [&](int64_t n0, int64_t nr, int64_t j0, int64_t j1, auto&& value) {
    for (int64_t i = 0; i < nr; ++i) {
      E* row = dx + (n0 + i) * H;
      for (int64_t j = j0; j < j1; ++j) row[j] = Elem<E>::store(value(j, i));
    }
  };

#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    A* dyT = stage.data() + staging * tid;
    A* wbuf = dyT + kDxCols * nb;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / splits, s = item % splits;
      const int64_t n0 = b * nb, nr = std::min(nb, N - n0);
      const int64_t cs = C * s / splits, ce = C * (s + 1) / splits;
      A* dxT = acc.data() + acc_elems * (splits == 1 ? tid : item);
      std::fill(dxT, dxT + acc_elems, A(0));
      for (int64_t c0 = cs; c0 < ce; c0 += kDxCols) {
        const int64_t cc = std::min(kDxCols, ce - c0);
        for (int64_t c = 0; c < cc; ++c) {
          for (int64_t i = 0; i < nr; ++i) dyT[c * nb + i] = Elem<E>::load(dy[(n0 + i) * C + c0 + c]);
          for (int64_t i = nr; i < nb; ++i) dyT[c * nb + i] = A(0);
        }
        const A* w;
        if constexpr (kSame) {
          w = W + c0 * K;
        } else {
          for (int64_t e = 0; e < cc * K; ++e) wbuf[e] = Elem<E>::load(W[c0 * K + e]);
          w = wbuf;
        }
        call_input_block(dyT, w, I + c0 * K, cc, K, nb, dxT);
      }
      if (splits == 1) write_rows(n0, nr, 0, H, [&](int64_t j, int64_t i) { return dxT[j * nb + i]; });
    }
    if (splits > 1) {
      // Sum the partial accumulators of each row block, in column blocks so every thread has work.
      constexpr int64_t kJ = 256;
      const int64_t jblocks = (H + kJ - 1) / kJ;
#pragma omp for schedule(dynamic, 4)
      for (int64_t task = 0; task < blocks * jblocks; ++task) {
        const int64_t b = task / jblocks, j0 = (task % jblocks) * kJ, j1 = std::min(H, j0 + kJ);
        const int64_t n0 = b * nb, nr = std::min(nb, N - n0);
        const A* first = acc.data() + acc_elems * (b * splits);
        write_rows(n0, nr, j0, j1, [&](int64_t j, int64_t i) {
          A sum = 0;
          for (int64_t s = 0; s < splits; ++s) sum += first[acc_elems * s + j * nb + i];
          return sum;
        });
      }
    }
  }
}

}  // namespace

int64_t ffi_count_invalid_indices_cpu(const int32_t* indices, int64_t count, int64_t H, int num_threads) {
  int64_t bad = 0;
#pragma omp parallel for num_threads(clamp_threads(num_threads)) reduction(+ : bad) schedule(static)
  for (int64_t e = 0; e < count; ++e) bad += (indices[e] < 0 || indices[e] >= H);
  return bad;
}

void ffi_forward_cpu(CpuDtype dtype, const void* x, const void* values, const int32_t* indices,
                     const void* bias, void* y, int64_t N, int64_t H, int64_t C, int64_t K, int num_threads) {
  const int nt = clamp_threads(num_threads);
  switch (dtype) {
    case CpuDtype::kFloat32:
      return forward_impl(static_cast<const float*>(x), static_cast<const float*>(values), indices,
                          static_cast<const float*>(bias), static_cast<float*>(y), N, H, C, K, nt);
    case CpuDtype::kBFloat16:
      return forward_impl(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(values), indices,
                          static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(y), N, H, C, K, nt);
    case CpuDtype::kFloat64:
      return forward_impl(static_cast<const double*>(x), static_cast<const double*>(values), indices,
                          static_cast<const double*>(bias), static_cast<double*>(y), N, H, C, K, nt);
  }
}

void ffi_backward_input_cpu(CpuDtype dtype, const void* grad_y, const void* values, const int32_t* indices,
                            void* grad_x, int64_t N, int64_t H, int64_t C, int64_t K, int num_threads) {
  const int nt = clamp_threads(num_threads);
  switch (dtype) {
    case CpuDtype::kFloat32:
      return backward_input_impl(static_cast<const float*>(grad_y), static_cast<const float*>(values), indices,
                                 static_cast<float*>(grad_x), N, H, C, K, nt);
    case CpuDtype::kBFloat16:
      return backward_input_impl(static_cast<const uint16_t*>(grad_y), static_cast<const uint16_t*>(values),
                                 indices, static_cast<uint16_t*>(grad_x), N, H, C, K, nt);
    case CpuDtype::kFloat64:
      return backward_input_impl(static_cast<const double*>(grad_y), static_cast<const double*>(values),
                                 indices, static_cast<double*>(grad_x), N, H, C, K, nt);
  }
}

void ffi_backward_weight_cpu(CpuDtype dtype, const void* grad_y, const void* x, const int32_t* indices,
                             void* grad_values, int64_t N, int64_t H, int64_t C, int64_t K, int num_threads) {
  const int nt = clamp_threads(num_threads);
  switch (dtype) {
    case CpuDtype::kFloat32:
      return backward_weight_impl(static_cast<const float*>(grad_y), static_cast<const float*>(x), indices,
                                  static_cast<float*>(grad_values), N, H, C, K, nt);
    case CpuDtype::kBFloat16:
      return backward_weight_impl(static_cast<const uint16_t*>(grad_y), static_cast<const uint16_t*>(x),
                                  indices, static_cast<uint16_t*>(grad_values), N, H, C, K, nt);
    case CpuDtype::kFloat64:
      return backward_weight_impl(static_cast<const double*>(grad_y), static_cast<const double*>(x), indices,
                                  static_cast<double*>(grad_values), N, H, C, K, nt);
  }
}

}  // namespace xmc

// CPU kernels of the group-shared fixed fan-in layer; contract in ffi_group_cpu.h.
//
// Layout choices (why they are fast; measured on 2 Zen 4 cores at N 256, H 2048, C 65536, K 32, G 16,
// where every product runs at 120-140 GFLOP/s against about 230 peak and the rest is memory traffic):
// - forward and dW work on a transposed copy xT [H, n] of a chunk of n batch rows (converted to the
//   accumulation type once, float32 in 16 x 16 register transposes). A group's connection k then reads
//   one contiguous row xT[I[q,k], :n], and every value read serves all labels of the group: they are
//   consecutive columns of y / dy and consecutive rows of W, so a slice of L labels (16 float32 or 8
//   float64 lanes, one AVX-512 register; 8 float32 lanes when G <= 8) is one vector.
//   forward:  acc[n, :L] += W^T[k, :L] * xT[I[k], n]  (register block of 8 batch rows; per k one weight
//             vector and 8 FMAs with an embedded broadcast). Work items are runs of groups (about 256
//             labels) whose packed weights serve row tiles of 32 rows, so the tile's rows of y stay in
//             the TLB; with AVX-512 a tile [32, run] is written out with non-temporal row stores (y is
//             written once; reading its lines for ownership first costs as much again).
//   dW:       acc[k, :L] += dy[n, :L] * xT[I[k], n]  (register block of 8 connections; per n one dy vector
//             and 8 broadcast FMAs), then transposed into the rows of dW. The run's dy columns are first
//             copied out row by row (a row of dy per batch row is 256 KiB away from the next: read in
//             place, the group's lines would share one cache set and one page per row).
// - dx: threads own blocks of 16 batch rows with a private transposed accumulator dxT [H, 16] (no
//   atomics), stage dyT [labels, 16] for a few groups at a time (16 x 16 register transposes, the
//   blocks two stages ahead prefetched), and per group and connection k form
//   t[:16] = sum_j W[qG+j, k] * dyT[qG+j, :16] in registers (G broadcast FMAs, 8 connections at once),
//   then add t once into dxT[I[q,k], :]: one scatter per (group, k) instead of per (label, k). With
//   fewer row blocks than threads the groups are split too and the partial accumulators summed.
// - work is handed out dynamically in small chunks (a thread that loses its core on a shared machine
//   does not hold the call back); every output is summed by one thread in a fixed order, so results
//   do not depend on the schedule.
// - the innermost loops use GCC vector types and are compiled for AVX-512, AVX2+FMA and baseline
//   x86-64 (target_clones picks one at load time): the AVX-512 clone turns `vector * scalar` into FMAs
//   with an embedded broadcast from memory. Scratch memory is kept per calling thread between calls.
#include "ffi_group_cpu.h"
#include "cpu_common.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <new>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define XMC_STREAM_STORES 1
#else
#define XMC_STREAM_STORES 0
#endif

namespace xmc {
namespace {

constexpr int64_t kMaxChunkRows = 512;   // batch rows per transposed chunk of x
constexpr int64_t kChunkElems = 1 << 23; // budget of the transposed chunk (elements)
constexpr int kFwdRows = 8;              // batch rows per forward register block
constexpr int kDwCols = 8;               // connections per dW register block
constexpr int kDxCols = 8;               // connections per dx register block
constexpr int kDxVecs = 1;               // vectors of batch rows per dx block
constexpr int64_t kRunLanes = 256;       // slice lanes (labels, padded) per forward / dW work item
constexpr int64_t kRowTile = 32;         // batch rows per forward pass over a run
constexpr int64_t kPrefetchRows = 8;     // rows ahead that the staging of dy prefetches
constexpr int64_t kDxStageLabels = 128;  // labels per dy sub-block staged by a dx work item (rounded to groups)
constexpr int64_t kDxPrefetchStages = 2; // dy sub-blocks ahead that a dx work item prefetches

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x8 __attribute__((vector_size(64)));

using cpu::Elem;
using cpu::bf16_to_float;
using cpu::clamp_threads;
using cpu::float_to_bf16;

// Vector values never cross a call (these and their users are always_inline), so the note that a
// vector return changes the ABI without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename V, typename A>
XMC_INLINE V loadv(const A* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename A>
XMC_INLINE void storev(A* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// ---- 16 x 16 float32 transpose (the staging of dy for dx, the write-out of dW) ----

typedef int32_t i32x16 __attribute__((vector_size(64)));

// Swaps the off-diagonal B x B blocks of every 2B x 2B block of the rows r[0..16).
template <int B>
XMC_INLINE void butterfly(f32x16* r, const i32x16& lo, const i32x16& hi) {
  for (int i = 0; i < 16; ++i)
    if (!(i & B)) {
      const f32x16 a = r[i], b = r[i + B];
      r[i] = __builtin_shuffle(a, b, lo);
      r[i + B] = __builtin_shuffle(a, b, hi);
    }
}

// dst[c * ldd + i] = src[i * lds + c] for i, c < 16: 64 two-source shuffles instead of 256 scalar moves.
XMC_CLONES void transpose16_f32(const float* src, int64_t lds, float* dst, int64_t ldd) {
  f32x16 r[16];
  for (int i = 0; i < 16; ++i) r[i] = loadv<f32x16>(src + i * lds);
  butterfly<8>(r, i32x16{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
               i32x16{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  butterfly<4>(r, i32x16{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
               i32x16{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  butterfly<2>(r, i32x16{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
               i32x16{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  butterfly<1>(r, i32x16{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
               i32x16{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
  for (int c = 0; c < 16; ++c) storev(dst + c * ldd, r[c]);
}

// ---- innermost loops (templated on the accumulation and vector types, instantiated below per ISA) ----

// out[r * ldo + :L] = b[:L] + sum_k wp[k * L + :L] * xT[idx[k] * nc + n0 + r] for r < R.
template <typename A, typename V, int R>
XMC_INLINE void forward_rows(const A* xT, int64_t nc, int64_t n0, const int32_t* idx, int64_t K, const A* wp,
                             const A* b, A* out, int64_t ldo) {
  constexpr int64_t L = sizeof(V) / sizeof(A);
  const V bv = loadv<V>(b);
  V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = bv;
  for (int64_t k = 0; k < K; ++k) {
    const V w = loadv<V>(wp + k * L);
    const A* xr = xT + static_cast<int64_t>(idx[k]) * nc + n0;
    for (int r = 0; r < R; ++r) acc[r] += w * xr[r];
  }
  for (int r = 0; r < R; ++r) storev(out + r * ldo, acc[r]);
}

// One slice of L labels of a group over rows [n0, n0 + nr) of the chunk (xT row stride ld); wp [K, L] its
// transposed weights, b [L] its bias; out[(n - n0) * ldo + :L] receives the rows.
template <typename A, typename V>
XMC_INLINE void forward_slice(const A* xT, int64_t ld, int64_t n0, int64_t nr, const int32_t* idx, int64_t K,
                              const A* wp, const A* b, A* out, int64_t ldo) {
  int64_t n = 0;
  for (; n + kFwdRows <= nr; n += kFwdRows)
    forward_rows<A, V, kFwdRows>(xT, ld, n0 + n, idx, K, wp, b, out + n * ldo, ldo);
  for (; n + 4 <= nr; n += 4) forward_rows<A, V, 4>(xT, ld, n0 + n, idx, K, wp, b, out + n * ldo, ldo);
  for (; n < nr; ++n) forward_rows<A, V, 1>(xT, ld, n0 + n, idx, K, wp, b, out + n * ldo, ldo);
}

// tile[j * L + :L] = sum_n d[n * ldd + :L] * xT[idx[j] * nc + n] for j < KB.
template <typename A, typename V, int KB>
XMC_INLINE void weight_cols(const A* xT, int64_t nc, const int32_t* idx, const A* d, int64_t ldd, A* tile) {
  constexpr int64_t L = sizeof(V) / sizeof(A);
  V acc[KB];
  const A* xr[KB];
  for (int j = 0; j < KB; ++j) {
    acc[j] = V{};
    xr[j] = xT + static_cast<int64_t>(idx[j]) * nc;
  }
  for (int64_t n = 0; n < nc; ++n) {
    const V dv = loadv<V>(d + n * ldd);
    for (int j = 0; j < KB; ++j) acc[j] += dv * xr[j][n];
  }
  for (int j = 0; j < KB; ++j) storev(tile + j * L, acc[j]);
}

// tile [K, L]: the dW of one slice of L labels of a group over the chunk (d: its dy columns, row stride ldd).
template <typename A, typename V>
XMC_INLINE void weight_slice(const A* xT, int64_t nc, const int32_t* idx, int64_t K, const A* d, int64_t ldd,
                             A* tile) {
  constexpr int64_t L = sizeof(V) / sizeof(A);
  int64_t k = 0;
  for (; k + kDwCols <= K; k += kDwCols) weight_cols<A, V, kDwCols>(xT, nc, idx + k, d, ldd, tile + k * L);
  for (; k + 4 <= K; k += 4) weight_cols<A, V, 4>(xT, nc, idx + k, d, ldd, tile + k * L);
  for (; k < K; ++k) weight_cols<A, V, 1>(xT, nc, idx + k, d, ldd, tile + k * L);
}

// dxT[idx[j] * NB + :NB] += sum_g w[g * K + j] * dyT[g * NB + :NB] for j < KB, NB = NV * L.
template <typename A, typename V, int NV, int KB>
XMC_INLINE void input_cols(const A* dyT, int64_t Gq, const A* w, int64_t K, const int32_t* idx, A* dxT) {
  constexpr int64_t L = sizeof(V) / sizeof(A), NB = NV * L;
  V acc[KB][NV];
  for (int j = 0; j < KB; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = V{};
  for (int64_t g = 0; g < Gq; ++g) {
    V d[NV];
    for (int v = 0; v < NV; ++v) d[v] = loadv<V>(dyT + g * NB + v * L);
    const A* wg = w + g * K;
    for (int j = 0; j < KB; ++j) {
      const A s = wg[j];
      for (int v = 0; v < NV; ++v) acc[j][v] += d[v] * s;
    }
  }
  for (int j = 0; j < KB; ++j) {
    A* r = dxT + static_cast<int64_t>(idx[j]) * NB;
    for (int v = 0; v < NV; ++v) storev(r + v * L, loadv<V>(r + v * L) + acc[j][v]);
  }
}

// One group of Gq labels: dyT [Gq, NB] its staged dy, w [Gq, K] its weights, idx [K] its inputs.
template <typename A, typename V, int NV>
XMC_INLINE void input_group(const A* dyT, int64_t Gq, const A* w, int64_t K, const int32_t* idx, A* dxT) {
  int64_t k = 0;
  for (; k + kDxCols <= K; k += kDxCols) input_cols<A, V, NV, kDxCols>(dyT, Gq, w + k, K, idx + k, dxT);
  for (; k < K; ++k) input_cols<A, V, NV, 1>(dyT, Gq, w + k, K, idx + k, dxT);
}

#define XMC_GROUP_SLICE_KERNELS(SUFFIX, A, V, ATTR)                                                         \
  ATTR void forward_slice_##SUFFIX(const A* xT, int64_t ld, int64_t n0, int64_t nr, const int32_t* idx,   \
                                   int64_t K, const A* wp, const A* b, A* out, int64_t ldo) {               \
    forward_slice<A, V>(xT, ld, n0, nr, idx, K, wp, b, out, ldo);                                           \
  }                                                                                                         \
  ATTR void weight_slice_##SUFFIX(const A* xT, int64_t nc, const int32_t* idx, int64_t K, const A* d,       \
                                  int64_t ldd, A* tile) {                                                   \
    weight_slice<A, V>(xT, nc, idx, K, d, ldd, tile);                                                       \
  }

XMC_GROUP_SLICE_KERNELS(f32x16, float, f32x16, XMC_CLONES)
XMC_GROUP_SLICE_KERNELS(f32x8, float, f32x8, XMC_CLONES)
XMC_GROUP_SLICE_KERNELS(f64x8, double, f64x8, )
#undef XMC_GROUP_SLICE_KERNELS

XMC_CLONES void input_group_f32(const float* dyT, int64_t Gq, const float* w, int64_t K, const int32_t* idx,
                                float* dxT) {
  input_group<float, f32x16, kDxVecs>(dyT, Gq, w, K, idx, dxT);
}
void input_group_f64(const double* dyT, int64_t Gq, const double* w, int64_t K, const int32_t* idx,
                     double* dxT) {
  input_group<double, f64x8, kDxVecs>(dyT, Gq, w, K, idx, dxT);
}

#if XMC_STREAM_STORES
// y[i * ldy + c] = tile[i * width + c] for i < rows, c < width (a multiple of 16) with non-temporal
// stores where y is 64-byte aligned (AVX-512 only): the forward writes y once and the next op reads it
// from memory anyway, so its lines need not be read for ownership first nor cached. Contiguous row
// pieces keep the write-combining buffers full (scattered 64-byte pieces would not).
__attribute__((target("arch=x86-64-v4"))) void stream_rows_f32(const float* tile, int64_t rows, int64_t width,
                                                               float* y, int64_t ldy) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < width; c += 16) {
      float* dst = y + i * ldy + c;
      const __m512 v = _mm512_loadu_ps(tile + i * width + c);
      if (reinterpret_cast<uintptr_t>(dst) % 64 == 0)
        _mm512_stream_ps(dst, v);
      else
        _mm512_storeu_ps(dst, v);
    }
  _mm_sfence();  // the stores are complete before the threads join
}

bool have_avx512() {
  static const bool have = __builtin_cpu_supports("avx512f");
  return have;
}
#endif

// Label-slice kernels of one vector width (L lanes of the accumulation type A).
#define XMC_SLICE_TRAITS(NAME, A_, L_, SUFFIX)                                                              \
  struct NAME {                                                                                             \
    using A = A_;                                                                                           \
    static constexpr int64_t L = L_;                                                                        \
    static void forward(const A* xT, int64_t ld, int64_t n0, int64_t nr, const int32_t* idx, int64_t K,     \
                        const A* wp, const A* b, A* out, int64_t ldo) {                                     \
      forward_slice_##SUFFIX(xT, ld, n0, nr, idx, K, wp, b, out, ldo);                                      \
    }                                                                                                       \
    static void weight(const A* xT, int64_t nc, const int32_t* idx, int64_t K, const A* d, int64_t ldd,     \
                       A* tile) {                                                                           \
      weight_slice_##SUFFIX(xT, nc, idx, K, d, ldd, tile);                                                  \
    }                                                                                                       \
  };
XMC_SLICE_TRAITS(SliceF32x16, float, 16, f32x16)
XMC_SLICE_TRAITS(SliceF32x8, float, 8, f32x8)
XMC_SLICE_TRAITS(SliceF64x8, double, 8, f64x8)
#undef XMC_SLICE_TRAITS

// dx kernels: NB batch rows per block.
struct DxF32 {
  using A = float;
  static constexpr int64_t NB = kDxVecs * 16;
  static void group(const A* dyT, int64_t Gq, const A* w, int64_t K, const int32_t* idx, A* dxT) {
    input_group_f32(dyT, Gq, w, K, idx, dxT);
  }
};
struct DxF64 {
  using A = double;
  static constexpr int64_t NB = kDxVecs * 8;
  static void group(const A* dyT, int64_t Gq, const A* w, int64_t K, const int32_t* idx, A* dxT) {
    input_group_f64(dyT, Gq, w, K, idx, dxT);
  }
};

// ---- drivers ----

int64_t num_groups(int64_t C, int64_t G) { return C == 0 ? 0 : (C + G - 1) / G; }

// Rows per transposed chunk of x: all of them when they fit the budget, at least 16.
int64_t chunk_rows(int64_t N, int64_t H) {
  const int64_t by_budget = std::max<int64_t>(16, kChunkElems / std::max<int64_t>(H, 1));
  return std::max<int64_t>(1, std::min({N, kMaxChunkRows, by_budget}));
}

// xT[h, i] = x[n0 + i, h] for i < nc, in the accumulation type (float32 in 16 x 16 register tiles).
template <typename E, typename A>
void transpose_rows(const E* x, int64_t n0, int64_t nc, int64_t H, A* xT, int nthreads) {
  constexpr int64_t kB = 64;
  const int64_t hblocks = (H + kB - 1) / kB;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 8)
  for (int64_t hb = 0; hb < hblocks; ++hb) {
    const int64_t h0 = hb * kB, h1 = std::min(H, h0 + kB);
    int64_t i0 = 0;
    if constexpr (std::is_same_v<E, float>) {
      if (h1 - h0 == kB)
        for (; i0 + 16 <= nc; i0 += 16)
          for (int64_t h = h0; h < h1; h += 16) transpose16_f32(x + (n0 + i0) * H + h, H, xT + h * nc + i0, nc);
    }
    for (int64_t i = i0; i < nc; ++i) {
      const E* row = x + (n0 + i) * H;
      for (int64_t h = h0; h < h1; ++h) xT[h * nc + i] = Elem<E>::load(row[h]);
    }
  }
}

// Uninitialised scratch memory of one call, carved into 64-byte aligned pieces. It is kept per calling
// thread for the next call (up to kKeepBytes), so repeated calls of one shape neither zero nor fault in
// fresh pages. One Scratch at a time per thread (the drivers never nest). Allocation failure throws
// std::bad_alloc before any thread starts.
class Scratch {
 public:
  Scratch(std::initializer_list<size_t> bytes) {
    size_t total = 0;
    for (size_t b : bytes) {
      offsets_[count_++] = total;
      total += (b + 63) / 64 * 64;
    }
    Cache& c = cache();
    if (c.size < total) {
      c.data.reset();
      c.size = 0;
      c.data.reset(static_cast<unsigned char*>(::operator new(total, std::align_val_t(64))));
      c.size = total;
    }
    base_ = c.data.get();
  }
  ~Scratch() {
    Cache& c = cache();
    if (c.size > kKeepBytes) {
      c.data.reset();
      c.size = 0;
    }
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* get(int piece) const {
    return reinterpret_cast<T*>(base_ + offsets_[piece]);
  }

 private:
  static constexpr size_t kKeepBytes = size_t(64) << 20;
  struct Free {
    void operator()(unsigned char* p) const { ::operator delete(p, std::align_val_t(64)); }
  };
  struct Cache {
    std::unique_ptr<unsigned char, Free> data;
    size_t size = 0;
  };
  static Cache& cache() {
    static thread_local Cache c;
    return c;
  }
  size_t offsets_[4] = {};
  int count_ = 0;
  unsigned char* base_ = nullptr;
};

// Prefetch (into L2) the columns [c0, c1) of one row.
template <typename E>
inline void prefetch_row(const E* row, int64_t c0, int64_t c1) {
  const char* p = reinterpret_cast<const char*>(row + c0);
  const int64_t bytes = (c1 - c0) * static_cast<int64_t>(sizeof(E));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
}

// A work item of forward / dW: a run of whole groups of about kRunLanes slice lanes.
int64_t run_groups(int64_t G, int64_t L) {
  const int64_t lanes = (G + L - 1) / L * L;
  return std::max<int64_t>(1, kRunLanes / lanes);
}

template <typename E, typename S>
void forward_impl(const E* x, const E* W, const int32_t* I, const E* bias, E* y, int64_t N, int64_t H,
                  int64_t C, int64_t K, int64_t G, int nthreads) {
  using A = typename S::A;
  constexpr int64_t L = S::L;
  constexpr bool kSame = std::is_same_v<E, A>;
  if (N == 0 || C == 0) return;
  const int64_t Q = num_groups(C, G), per_run = run_groups(G, L), runs = (Q + per_run - 1) / per_run;
  const int64_t max_slices = per_run * ((G + L - 1) / L);
  const int64_t rows = chunk_rows(N, H);
  bool stream = false;
#if XMC_STREAM_STORES
  stream = std::is_same_v<E, float> && L == 16 && have_avx512();
#endif
  const int64_t per_thread = max_slices * (K * L + L + kRowTile * L);
  const Scratch mem({sizeof(A) * H * rows, sizeof(A) * per_thread * nthreads});
  A* const xT = mem.get<A>(0);
  A* const scratch = mem.get<A>(1);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nc = std::min(rows, N - n0);
    transpose_rows(x, n0, nc, H, xT, nthreads);
#pragma omp parallel num_threads(nthreads)
    {
      A* wp = scratch + per_thread * omp_get_thread_num();  // [slices, K, L] transposed weights
      A* bl = wp + max_slices * K * L;                             // [slices, L] bias
      A* tile = bl + max_slices * L;                               // [kRowTile, slices * L] staged output
#pragma omp for schedule(dynamic, 1)
      for (int64_t run = 0; run < runs; ++run) {
        const int64_t q0 = run * per_run, q1 = std::min(Q, q0 + per_run);
        // Pack the run's slices once: W^T [K, L] each, zero lanes past the group's end.
        int64_t s = 0;
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t g1 = std::min(C, (q + 1) * G);
          for (int64_t c0 = q * G; c0 < g1; c0 += L, ++s) {
            const int64_t w = std::min(L, g1 - c0);
            A* ws = wp + s * K * L;
            for (int64_t l = 0; l < L; ++l) {
              if (l < w) {
                const E* row = W + (c0 + l) * K;
                for (int64_t k = 0; k < K; ++k) ws[k * L + l] = Elem<E>::load(row[k]);
                bl[s * L + l] = bias ? Elem<E>::load(bias[c0 + l]) : A(0);
              } else {
                for (int64_t k = 0; k < K; ++k) ws[k * L + l] = A(0);
                bl[s * L + l] = A(0);
              }
            }
          }
        }
        // Row tiles across the run: the tile's rows of y (one page each) stay in the TLB for the run.
        // Float32 runs of whole slices: with AVX-512 a tile [nr, width] streamed out row by row, else
        // straight into y; other slices through a [nr, L] tile.
        const int64_t width = std::min(C, q1 * G) - q0 * G;
        const bool streamed = stream && G % L == 0 && q1 * G <= C;
        for (int64_t r0 = 0; r0 < nc; r0 += kRowTile) {
          const int64_t nr = std::min(kRowTile, nc - r0);
          s = 0;
          for (int64_t q = q0; q < q1; ++q) {
            const int64_t g1 = std::min(C, (q + 1) * G);
            for (int64_t c0 = q * G; c0 < g1; c0 += L, ++s) {
              const int64_t w = std::min(L, g1 - c0);
              if (streamed) {
                S::forward(xT, nc, r0, nr, I + q * K, K, wp + s * K * L, bl + s * L, tile + (c0 - q0 * G),
                           width);
                continue;
              }
              const bool direct = kSame && w == L;
              A* out = direct ? reinterpret_cast<A*>(y) + (n0 + r0) * C + c0 : tile;
              S::forward(xT, nc, r0, nr, I + q * K, K, wp + s * K * L, bl + s * L, out, direct ? C : L);
              if (!direct)
                for (int64_t i = 0; i < nr; ++i) {
                  E* dst = y + (n0 + r0 + i) * C + c0;
                  for (int64_t l = 0; l < w; ++l) dst[l] = Elem<E>::store(tile[i * L + l]);
                }
            }
          }
#if XMC_STREAM_STORES
          if constexpr (std::is_same_v<E, float>) {
            if (streamed) stream_rows_f32(tile, nr, width, y + (n0 + r0) * C + q0 * G, C);
          }
#endif
        }
      }
    }
  }
}

template <typename E, typename S>
void backward_weight_impl(const E* dy, const E* x, const int32_t* I, E* dW, int64_t N, int64_t H, int64_t C,
                          int64_t K, int64_t G, int nthreads) {
  using A = typename S::A;
  constexpr int64_t L = S::L;
  constexpr bool kSame = std::is_same_v<E, A>;
  if (C == 0 || K == 0) return;
  if (N == 0) {
    std::fill(dW, dW + C * K, Elem<E>::store(A(0)));
    return;
  }
  const int64_t Q = num_groups(C, G), per_run = run_groups(G, L), runs = (Q + per_run - 1) / per_run;
  const int64_t max_slices = per_run * ((G + L - 1) / L);
  const int64_t rows = chunk_rows(N, H);
  const int64_t chunks = (N + rows - 1) / rows;
  const int64_t per_thread = max_slices * rows * L + K * L;
  // Several chunks of a bfloat16 batch need float32 partial sums across chunks.
  const size_t partial_elems = !kSame && chunks > 1 ? static_cast<size_t>(C * K) : 0;
  const Scratch mem({sizeof(A) * H * rows, sizeof(A) * per_thread * nthreads, sizeof(A) * partial_elems});
  A* const xT = mem.get<A>(0);
  A* const scratch = mem.get<A>(1);
  A* const partial = mem.get<A>(2);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nc = std::min(rows, N - n0);
    const bool first = n0 == 0, last = n0 + nc == N;
    transpose_rows(x, n0, nc, H, xT, nthreads);
#pragma omp parallel num_threads(nthreads)
    {
      A* ds = scratch + per_thread * omp_get_thread_num();  // the run's staged dy columns
      A* tile = ds + max_slices * rows * L;                 // [K, L] dW of a slice
#pragma omp for schedule(dynamic, 1)
      for (int64_t run = 0; run < runs; ++run) {
        const int64_t q0 = run * per_run, q1 = std::min(Q, q0 + per_run);
        const int64_t c_end = std::min(C, q1 * G);
        // Stage the run's dy columns: float32 runs of whole slices as rows [nc, width] (one copy per
        // row), others slice by slice ([nc, L] each, zero lanes past a group's end). One pass over
        // the rows, each read once and contiguously.
        const int64_t width = c_end - q0 * G;
        const bool whole = kSame && G % L == 0 && q1 * G <= C;
        for (int64_t i = 0; i < nc; ++i) {
          const E* src = dy + (n0 + i) * C;
          if (i + kPrefetchRows < nc) prefetch_row(src + kPrefetchRows * C, q0 * G, c_end);
          if (whole) {
            std::memcpy(ds + i * width, src + q0 * G, width * sizeof(A));
            continue;
          }
          int64_t s = 0;
          for (int64_t q = q0; q < q1; ++q) {
            const int64_t g1 = std::min(C, (q + 1) * G);
            for (int64_t c0 = q * G; c0 < g1; c0 += L, ++s) {
              const int64_t w = std::min(L, g1 - c0);
              A* dst = ds + (s * nc + i) * L;
              if (kSame && w == L) {
                std::memcpy(dst, src + c0, L * sizeof(A));
              } else {
                for (int64_t l = 0; l < w; ++l) dst[l] = Elem<E>::load(src[c0 + l]);
                for (int64_t l = w; l < L; ++l) dst[l] = A(0);
              }
            }
          }
        }
        int64_t s = 0;
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t g1 = std::min(C, (q + 1) * G);
          for (int64_t c0 = q * G; c0 < g1; c0 += L, ++s) {
            const int64_t w = std::min(L, g1 - c0);
            if (whole)
              S::weight(xT, nc, I + q * K, K, ds + (c0 - q0 * G), width, tile);
            else
              S::weight(xT, nc, I + q * K, K, ds + s * nc * L, L, tile);
            int64_t k_done = 0;  // tile columns written by the vector transpose
            if constexpr (kSame && L == 16) {
              if (first && w == L) {
                for (; k_done + 16 <= K; k_done += 16)
                  transpose16_f32(tile + k_done * L, L, dW + c0 * K + k_done, K);
              }
            }
            for (int64_t l = 0; l < w; ++l) {
              const int64_t e0 = (c0 + l) * K;
              for (int64_t k = k_done; k < K; ++k) {
                const A v = tile[k * L + l];
                if constexpr (kSame) {
                  A* o = reinterpret_cast<A*>(dW) + e0 + k;
                  *o = first ? v : *o + v;
                } else if (chunks > 1) {
                  A& p = partial[e0 + k];
                  p = first ? v : p + v;
                  if (last) dW[e0 + k] = Elem<E>::store(p);
                } else {
                  dW[e0 + k] = Elem<E>::store(v);
                }
              }
            }
          }
        }
      }
    }
  }
}

// dyT[c * NB + i] = dy[n0 + i, c0 + c] for c < cc, i < nr; zero for nr <= i < NB.
template <typename E, typename A, int64_t NB>
void stage_dy(const E* dy, int64_t C, int64_t n0, int64_t nr, int64_t c0, int64_t cc, A* dyT) {
  constexpr int64_t kT = 16;  // labels per tile: the tile's NB-row pieces of dyT stay in L1
  for (int64_t t0 = 0; t0 < cc; t0 += kT) {
    const int64_t t1 = std::min(cc, t0 + kT);
    if constexpr (std::is_same_v<E, float> && NB % 16 == 0) {
      if (nr == NB && t1 - t0 == 16) {
        for (int64_t r = 0; r < NB; r += 16)
          transpose16_f32(dy + (n0 + r) * C + c0 + t0, C, dyT + t0 * NB + r, NB);
        continue;
      }
    }
    for (int64_t i = 0; i < nr; ++i) {
      const E* row = dy + (n0 + i) * C + c0;
      for (int64_t c = t0; c < t1; ++c) dyT[c * NB + i] = Elem<E>::load(row[c]);
    }
    for (int64_t c = t0; c < t1; ++c)
      for (int64_t i = nr; i < NB; ++i) dyT[c * NB + i] = A(0);
  }
}

template <typename E, typename D>
void backward_input_impl(const E* dy, const E* W, const int32_t* I, E* dx, int64_t N, int64_t H, int64_t C,
                         int64_t K, int64_t G, int nthreads) {
  using A = typename D::A;
  constexpr int64_t NB = D::NB;
  constexpr bool kSame = std::is_same_v<E, A>;
  if (N == 0 || H == 0) return;
  const int64_t Q = num_groups(C, G);
  const int64_t blocks = (N + NB - 1) / NB;
  // Split the groups too when there are fewer row blocks than threads.
  const int64_t splits =
      blocks >= nthreads ? 1 : std::min<int64_t>((nthreads + blocks - 1) / blocks, std::max<int64_t>(Q, 1));
  const int64_t items = blocks * splits;
  const int64_t acc_elems = H * NB;
  const int64_t stage_groups = std::max<int64_t>(1, kDxStageLabels / G);
  const int64_t stage_labels = std::max<int64_t>(1, std::min(stage_groups * G, C));
  const int64_t staging = stage_labels * NB + (kSame ? 0 : stage_labels * K);
  const int64_t accumulators = splits == 1 ? nthreads : items;
  const Scratch mem({sizeof(A) * acc_elems * accumulators, sizeof(A) * staging * nthreads});
  A* const acc = mem.get<A>(0);
  A* const stage = mem.get<A>(1);

  auto write_rows = [&](int64_t n0, int64_t nr, int64_t j0, int64_t j1, auto&& value) {
    for (int64_t i = 0; i < nr; ++i) {
      E* row = dx + (n0 + i) * H;
      for (int64_t j = j0; j < j1; ++j) row[j] = Elem<E>::store(value(j, i));
    }
  };

#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    A* dyT = stage + staging * tid;
    A* wbuf = dyT + stage_labels * NB;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / splits, s = item % splits;
      const int64_t n0 = b * NB, nr = std::min(NB, N - n0);
      const int64_t qs = Q * s / splits, qe = Q * (s + 1) / splits;
      A* dxT = acc + acc_elems * (splits == 1 ? tid : item);
      std::fill(dxT, dxT + acc_elems, A(0));
      for (int64_t q0 = qs; q0 < qe; q0 += stage_groups) {
        const int64_t q1 = std::min(qe, q0 + stage_groups);
        const int64_t c0 = q0 * G, cc = std::min(C, q1 * G) - c0;
        stage_dy<E, A, NB>(dy, C, n0, nr, c0, cc, dyT);
        // The dy block kDxPrefetchStages stages ahead is fetched into L2 while this one computes.
        const int64_t pq0 = q0 + kDxPrefetchStages * stage_groups;
        if (pq0 < qe) {
          const int64_t pc1 = std::min(C, std::min(qe, pq0 + stage_groups) * G);
          for (int64_t i = 0; i < nr; ++i) prefetch_row(dy + (n0 + i) * C, pq0 * G, pc1);
        }
        const A* w;
        if constexpr (kSame) {
          w = W + c0 * K;
        } else {
          for (int64_t e = 0; e < cc * K; ++e) wbuf[e] = Elem<E>::load(W[c0 * K + e]);
          w = wbuf;
        }
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t off = q * G - c0, Gq = std::min(G, C - q * G);
          D::group(dyT + off * NB, Gq, w + off * K, K, I + q * K, dxT);
        }
      }
      if (splits == 1) write_rows(n0, nr, 0, H, [&](int64_t j, int64_t i) { return dxT[j * NB + i]; });
    }
    if (splits > 1) {
      // Sum the partial accumulators of each row block, in column blocks so every thread has work.
      constexpr int64_t kJ = 256;
      const int64_t jblocks = (H + kJ - 1) / kJ;
#pragma omp for schedule(dynamic, 4)
      for (int64_t task = 0; task < blocks * jblocks; ++task) {
        const int64_t b = task / jblocks, j0 = (task % jblocks) * kJ, j1 = std::min(H, j0 + kJ);
        const int64_t n0 = b * NB, nr = std::min(NB, N - n0);
        const A* first = acc + acc_elems * (b * splits);
        write_rows(n0, nr, j0, j1, [&](int64_t j, int64_t i) {
          A sum = 0;
          for (int64_t s = 0; s < splits; ++s) sum += first[acc_elems * s + j * NB + i];
          return sum;
        });
      }
    }
  }
}

}  // namespace

void ffi_group_forward_cpu(CpuDtype dtype, const void* x, const void* values, const int32_t* indices,
                           const void* bias, void* y, int64_t N, int64_t H, int64_t C, int64_t K, int64_t G,
                           int num_threads) {
  const int nt = clamp_threads(num_threads);
  const bool wide = G > 8;
  switch (dtype) {
    case CpuDtype::kFloat32: {
      const auto* xx = static_cast<const float*>(x);
      const auto* w = static_cast<const float*>(values);
      const auto* b = static_cast<const float*>(bias);
      auto* out = static_cast<float*>(y);
      if (wide) return forward_impl<float, SliceF32x16>(xx, w, indices, b, out, N, H, C, K, G, nt);
      return forward_impl<float, SliceF32x8>(xx, w, indices, b, out, N, H, C, K, G, nt);
    }
    case CpuDtype::kBFloat16: {
      const auto* xx = static_cast<const uint16_t*>(x);
      const auto* w = static_cast<const uint16_t*>(values);
      const auto* b = static_cast<const uint16_t*>(bias);
      auto* out = static_cast<uint16_t*>(y);
      if (wide) return forward_impl<uint16_t, SliceF32x16>(xx, w, indices, b, out, N, H, C, K, G, nt);
      return forward_impl<uint16_t, SliceF32x8>(xx, w, indices, b, out, N, H, C, K, G, nt);
    }
    case CpuDtype::kFloat64:
      return forward_impl<double, SliceF64x8>(static_cast<const double*>(x),
                                              static_cast<const double*>(values), indices,
                                              static_cast<const double*>(bias), static_cast<double*>(y), N, H,
                                              C, K, G, nt);
  }
}

void ffi_group_backward_input_cpu(CpuDtype dtype, const void* grad_y, const void* values,
                                  const int32_t* indices, void* grad_x, int64_t N, int64_t H, int64_t C,
                                  int64_t K, int64_t G, int num_threads) {
  const int nt = clamp_threads(num_threads);
  switch (dtype) {
    case CpuDtype::kFloat32:
      return backward_input_impl<float, DxF32>(static_cast<const float*>(grad_y),
                                               static_cast<const float*>(values), indices,
                                               static_cast<float*>(grad_x), N, H, C, K, G, nt);
    case CpuDtype::kBFloat16:
      return backward_input_impl<uint16_t, DxF32>(static_cast<const uint16_t*>(grad_y),
                                                  static_cast<const uint16_t*>(values), indices,
                                                  static_cast<uint16_t*>(grad_x), N, H, C, K, G, nt);
    case CpuDtype::kFloat64:
      return backward_input_impl<double, DxF64>(static_cast<const double*>(grad_y),
                                                static_cast<const double*>(values), indices,
                                                static_cast<double*>(grad_x), N, H, C, K, G, nt);
  }
}

void ffi_group_backward_weight_cpu(CpuDtype dtype, const void* grad_y, const void* x, const int32_t* indices,
                                   void* grad_values, int64_t N, int64_t H, int64_t C, int64_t K, int64_t G,
                                   int num_threads) {
  const int nt = clamp_threads(num_threads);
  const bool wide = G > 8;
  switch (dtype) {
    case CpuDtype::kFloat32: {
      const auto* d = static_cast<const float*>(grad_y);
      const auto* xx = static_cast<const float*>(x);
      auto* out = static_cast<float*>(grad_values);
      if (wide) return backward_weight_impl<float, SliceF32x16>(d, xx, indices, out, N, H, C, K, G, nt);
      return backward_weight_impl<float, SliceF32x8>(d, xx, indices, out, N, H, C, K, G, nt);
    }
    case CpuDtype::kBFloat16: {
      const auto* d = static_cast<const uint16_t*>(grad_y);
      const auto* xx = static_cast<const uint16_t*>(x);
      auto* out = static_cast<uint16_t*>(grad_values);
      if (wide) return backward_weight_impl<uint16_t, SliceF32x16>(d, xx, indices, out, N, H, C, K, G, nt);
      return backward_weight_impl<uint16_t, SliceF32x8>(d, xx, indices, out, N, H, C, K, G, nt);
    }
    case CpuDtype::kFloat64:
      return backward_weight_impl<double, SliceF64x8>(static_cast<const double*>(grad_y),
                                                      static_cast<const double*>(x), indices,
                                                      static_cast<double*>(grad_values), N, H, C, K, G, nt);
  }
}

}  // namespace xmc

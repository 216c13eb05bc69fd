// Streaming bandwidth of the GPU's L2 and HBM, the bound of the FFI kernels.
//
// The FFI forward, dW and dx each move N*C*K elements between the SMs and the L2 (gathers of rows of
// an L2-resident operand, or float atomics into one): with random fan-in there is no reuse inside an
// SM, so no implementation can beat bytes / L2 bandwidth. This measures that bandwidth the easiest
// way for the hardware: every thread reads consecutive 16-byte words (coalesced), loads marked
// cache-global (ld.global.cg: served by the L2, not by the SM's L1, which would otherwise hold a
// repeated read), a buffer that stays in the L2, read again and again. The same for red.global.add
// (float4, as our dx atomics) into an L2-resident buffer, and a read of a buffer 8x the L2 (HBM).
//
//   nvcc -O3 -arch=sm_90 launch/l2_bandwidth.cu -o /tmp/l2_bandwidth && /tmp/l2_bandwidth
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(call)                                                                       \
  do {                                                                                    \
    cudaError_t err_ = (call);                                                            \
    if (err_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(err_));                  \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

__global__ void read_kernel(const float4* __restrict__ buf, size_t n4, int reps, float* __restrict__ sink) {
  float acc = 0.0f;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (int r = 0; r < reps; ++r) {
    for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4; i += stride) {
      const float4 v = __ldcg(buf + i);
      acc += v.x + v.y + v.z + v.w;
    }
  }
  if (acc == 1234.5f) *sink = acc;  // keeps the loads; never true for the zero-filled buffer
}

// 16-byte float reductions (sm_90), as the FFI dx kernels issue them.
__global__ void atomic_kernel(float4* __restrict__ buf, size_t n4, int reps) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (int r = 0; r < reps; ++r) {
    for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4; i += stride) {
      atomicAdd(buf + i, make_float4(1.0f, 1.0f, 1.0f, 1.0f));  // result unused: red.global.add.v4.f32
    }
  }
}

template <typename Launch>
double median_seconds(Launch launch) {
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  launch();  // warm-up, and brings the buffer into the L2
  CHECK(cudaDeviceSynchronize());
  std::vector<float> ms;
  for (int i = 0; i < 7; ++i) {
    CHECK(cudaEventRecord(start));
    launch();
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    float t = 0;
    CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
  return ms[ms.size() / 2] / 1e3;
}

int main() {
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  int sms = prop.multiProcessorCount, threads = 512, per_sm = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, read_kernel, threads, 0));
  const int blocks = sms * per_sm;
  const size_t l2 = static_cast<size_t>(prop.l2CacheSize);
  std::printf("%s: %d SMs, L2 %.0f MiB, %d blocks x %d threads\n", prop.name, sms, l2 / 1048576.0, blocks,
              threads);
  float* sink = nullptr;
  CHECK(cudaMalloc(&sink, sizeof(float)));
  // L2-resident sizes (a quarter and a half of the L2), then 8x the L2 for HBM.
  const size_t sizes[] = {l2 / 4, l2 / 2, l2 * 8};
  for (size_t bytes : sizes) {
    bytes = bytes / 16 * 16;
    float* buf = nullptr;
    CHECK(cudaMalloc(&buf, bytes));
    CHECK(cudaMemset(buf, 0, bytes));
    const int reps = std::max<int>(1, static_cast<int>((size_t{4} << 30) / bytes));  // ~4 GB per launch
    const double read_s = median_seconds(
        [&] { read_kernel<<<blocks, threads>>>(reinterpret_cast<const float4*>(buf), bytes / 16, reps, sink); });
    std::printf("read   %8.1f MiB x %4d: %6.2f TB/s\n", bytes / 1048576.0, reps, bytes * reps / read_s / 1e12);
    if (bytes < l2) {
      const int atomic_reps = std::max(1, reps / 4);
      const double atomic_s =
          median_seconds([&] { atomic_kernel<<<blocks, threads>>>(reinterpret_cast<float4*>(buf), bytes / 16, atomic_reps); });
      std::printf("atomic %8.1f MiB x %4d: %6.2f TB/s of float4 red.add\n", bytes / 1048576.0, atomic_reps,
                  bytes * atomic_reps / atomic_s / 1e12);
    }
    CHECK(cudaGetLastError());
    CHECK(cudaFree(buf));
  }
  CHECK(cudaFree(sink));
  return 0;
}

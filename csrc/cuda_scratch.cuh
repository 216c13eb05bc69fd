// What the CUDA kernel files share: error checks and one stream-ordered scratch pool per device.
//
// The pool keeps freed memory (release threshold: unlimited) so a steady training loop does not remap
// its scratch; the functions are inline, so every kernel file draws from the same pool.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>

namespace xmc {
namespace cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("xmc FFI CUDA: ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

inline cudaMemPool_t scratch_pool(int dev) {
  static std::mutex mu;
  static cudaMemPool_t pools[64] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (dev < 0 || dev >= 64) throw std::runtime_error("xmc FFI CUDA: device ordinal out of range");
  if (pools[dev] == nullptr) {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = dev;
    cudaMemPool_t pool = nullptr;
    check(cudaMemPoolCreate(&pool, &props), "cudaMemPoolCreate");
    unsigned long long keep = ~0ull;
    check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute");
    pools[dev] = pool;
  }
  return pools[dev];
}

// Scratch buffer from the pool, freed (stream-ordered) when it leaves scope, also when a later launch throws.
class Scratch {
 public:
  Scratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaMallocFromPoolAsync(&ptr_, std::max<size_t>(bytes, 256), scratch_pool(dev), stream),
          "cudaMallocFromPoolAsync (scratch of the FFI kernels)");
  }
  ~Scratch() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename P>
  P* as() const {
    return static_cast<P*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace cuda
}  // namespace xmc

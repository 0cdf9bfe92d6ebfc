#include <cuda_runtime.h>

#include <string>

#include "backend/cuda/cuda_device.h"

namespace diffuse::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

std::string device_description(int i) {
  cudaDeviceProp p{};
  cudaError_t e = cudaGetDeviceProperties(&p, i);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  return std::string(p.name) + ", " + std::to_string(double(p.totalGlobalMem) / (1 << 30)).substr(0, 5) +
         " GiB, sm_" + std::to_string(p.major) + std::to_string(p.minor);
}

}  // namespace diffuse::cuda

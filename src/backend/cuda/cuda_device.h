// CUDA device discovery (only built with -DDIFFUSE_CUDA=ON).
#pragma once
#include <string>

namespace diffuse::cuda {

// Number of CUDA devices visible (0 when there is no driver or GPU).
int device_count();
// "NVIDIA H100 80GB HBM3, 79.1 GiB, sm_90" for device i, or the CUDA error text.
std::string device_description(int i);

}  // namespace diffuse::cuda

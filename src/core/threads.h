// Thread count and CPU feature detection.
#pragma once
#include <string>

namespace diffuse {

// Physical cores available to this process (affinity mask, hyperthreads counted once).
int physical_cores();
// Threads used by every heavy op (OpenMP and oneDNN). 0 = physical_cores().
void set_num_threads(int n);
int num_threads();

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false;
  bool avx512_bf16 = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;  // hardware + OS (XCR0) support
  bool bf16_fast() const { return amx_bf16 || avx512_bf16; }
  std::string str() const;  // "avx2 avx512f ... amx_bf16"
};
const CpuFeatures& cpu_features();

// Ask Linux for permission to use AMX tile data (once per process). False if refused.
bool enable_amx();

}  // namespace diffuse

// Thread count and CPU feature detection.
#pragma once
#include <string>

namespace diffuse {

// Physical cores available to this process (affinity mask, hyperthreads counted once).
int physical_cores();
// Threads used by every heavy op (OpenMP and oneDNN). 0 = physical_cores().
void set_num_threads(int n);
int num_threads();

// libgomp's idle workers spin (GOMP_SPINCOUNT, 300k iterations by default) before they sleep: with
// two busy processes on the same cores (`ctest -j2`, a busy server, two generations at once) each
// spends the other's CPU time spinning, and a 2-thread run was measured 4-5x slower instead of the
// fair 2x. libgomp reads its settings once, when it is loaded, so a program that wants short spins
// must be started with them: unless the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY, this sets
// GOMP_SPINCOUNT=1000 and executes the program again with the same arguments (returns only when
// nothing was done, or the exec failed). The CLI calls it first thing; library users set the
// variable themselves.
void reexec_with_short_omp_spin(char** argv);
// How idle OpenMP workers wait in this process: "GOMP_SPINCOUNT=N", "OMP_WAIT_POLICY=P" or
// "libgomp default" (benchmarks report it beside their figures).
std::string omp_wait_setting();

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

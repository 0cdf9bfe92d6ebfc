#include "core/threads.h"

#include <cpuid.h>
#include <omp.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <mutex>
#include <set>
#include <utility>

namespace diffuse {

int physical_cores() {
  static int cached = [] {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
    std::set<std::pair<int, int>> cores;
    int logical = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (!CPU_ISSET(cpu, &set)) continue;
      ++logical;
      std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
      std::ifstream c(base + "core_id"), p(base + "physical_package_id");
      int core = -1, pkg = -1;
      if (!(c >> core) || !(p >> pkg)) return logical > 0 ? int(CPU_COUNT(&set)) : 1;
      cores.insert({pkg, core});
    }
    return cores.empty() ? 1 : int(cores.size());
  }();
  return cached;
}

void reexec_with_short_omp_spin(char** argv) {
  if (std::getenv("GOMP_SPINCOUNT") || std::getenv("OMP_WAIT_POLICY")) return;
  if (setenv("GOMP_SPINCOUNT", "1000", 0) != 0) return;
  execv("/proc/self/exe", argv);  // returns only on failure: go on with the default spin
}

std::string omp_wait_setting() {
  for (const char* name : {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"}) {
    if (const char* v = std::getenv(name)) {
      std::string out = name;
      out += '=';
      out += v;
      return out;
    }
  }
  return "libgomp default";
}

static int g_threads = 0;

void set_num_threads(int n) {
  g_threads = n > 0 ? n : physical_cores();
  omp_set_num_threads(g_threads);
}

int num_threads() {
  if (g_threads == 0) set_num_threads(0);
  return g_threads;
}

static uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

const CpuFeatures& cpu_features() {
  static CpuFeatures f = [] {
    CpuFeatures r;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return r;
    bool osxsave = c & (1u << 27);
    r.fma = c & (1u << 12);
    r.f16c = c & (1u << 29);
    uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    bool ymm = (xcr0 & 0x6) == 0x6;
    bool zmm = ymm && (xcr0 & 0xe0) == 0xe0;
    bool tiles = (xcr0 & (3ull << 17)) == (3ull << 17);
    if (__get_cpuid_max(0, nullptr) < 7) return r;
    __cpuid_count(7, 0, a, b, c, d);
    r.avx2 = ymm && (b & (1u << 5));
    r.avx512f = zmm && (b & (1u << 16));
    r.avx512bw = zmm && (b & (1u << 30));
    r.avx512vl = zmm && (b & (1u << 31));
    r.amx_bf16 = tiles && (d & (1u << 22));
    r.amx_tile = tiles && (d & (1u << 24));
    r.amx_int8 = tiles && (d & (1u << 25));
    __cpuid_count(7, 1, a, b, c, d);
    r.avx512_bf16 = zmm && (a & (1u << 5));
    return r;
  }();
  return f;
}

std::string CpuFeatures::str() const {
  std::string s;
  auto add = [&](bool on, const char* name) {
    if (on) s += (s.empty() ? "" : " ") + std::string(name);
  };
  add(avx2, "avx2");
  add(fma, "fma");
  add(f16c, "f16c");
  add(avx512f, "avx512f");
  add(avx512bw, "avx512bw");
  add(avx512vl, "avx512vl");
  add(avx512_bf16, "avx512_bf16");
  add(amx_tile, "amx_tile");
  add(amx_bf16, "amx_bf16");
  add(amx_int8, "amx_int8");
  return s.empty() ? "baseline" : s;
}

bool enable_amx() {
  static bool ok = [] {
    if (!cpu_features().amx_tile) return false;
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023;
    constexpr int XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

}  // namespace diffuse

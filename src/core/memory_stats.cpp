#include "core/memory_stats.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace diffuse {

namespace {
// The "<key>:   N kB" line of /proc/self/status, in bytes.
size_t status_kb(const char* key) {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return 0;
  char line[256];
  size_t kb = 0;
  const size_t n = std::strlen(key);
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, key, n) == 0 && line[n] == ':') {
      std::sscanf(line + n + 1, "%zu", &kb);
      break;
    }
  }
  std::fclose(f);
  return kb * 1024;
}
}  // namespace

size_t rss_bytes() { return status_kb("VmRSS"); }
size_t peak_rss_bytes() { return status_kb("VmHWM"); }

void return_free_memory() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

size_t available_memory_bytes() {
  auto field = [](const char* file, const char* key) -> long long {
    std::FILE* f = std::fopen(file, "r");
    if (!f) return -1;
    char line[256];
    long long v = -1;
    const size_t n = std::strlen(key);
    while (std::fgets(line, sizeof line, f))
      if (std::strncmp(line, key, n) == 0) {
        v = std::atoll(line + n);
        break;
      }
    std::fclose(f);
    return v;
  };
  long long avail = field("/proc/meminfo", "MemAvailable:"), swap = field("/proc/meminfo", "SwapFree:");
  if (avail < 0) return 0;
  size_t bytes = size_t(avail + std::max(0LL, swap)) * 1024;
  // cgroup v2 limit (containers): max - current, when set.
  if (std::FILE* f = std::fopen("/sys/fs/cgroup/memory.max", "r")) {
    char buf[64] = {};
    if (std::fgets(buf, sizeof buf, f) && std::strncmp(buf, "max", 3) != 0) {
      const long long limit = std::atoll(buf);
      long long used = 0;
      if (std::FILE* g = std::fopen("/sys/fs/cgroup/memory.current", "r")) {
        if (std::fgets(buf, sizeof buf, g)) used = std::atoll(buf);
        std::fclose(g);
      }
      if (limit > used) bytes = std::min(bytes, size_t(limit - used));
    }
    std::fclose(f);
  }
  return bytes;
}

void tune_allocator() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
#endif
}

}  // namespace diffuse

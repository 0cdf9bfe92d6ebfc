#include "core/memory_stats.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <cstdio>
#include <cstring>

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

void tune_allocator() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
#endif
}

}  // namespace diffuse

// Process memory figures for benchmarks and logs (Linux /proc; zero elsewhere).
#pragma once
#include <cstddef>

namespace diffuse {

size_t rss_bytes();       // resident set size now (VmRSS)
size_t peak_rss_bytes();  // the high-water mark since process start (VmHWM)
// Memory a new allocation can still get: MemAvailable + SwapFree from /proc/meminfo, or the
// cgroup's limit minus its usage when that is smaller; 0 if unknown.
size_t available_memory_bytes();

// Gives the allocator's free memory back to the system (glibc malloc_trim; no-op elsewhere).
// Called after large frees (text encoders released, UNet scratch dropped before the VAE decode).
void return_free_memory();
// Process-wide allocator policy for this workload (glibc): blocks of 1 MiB and more are mapped
// and unmapped directly, so freed weights and activations leave the process at once instead of
// staying in the heap. Call once at startup (the CLI does).
void tune_allocator();

}  // namespace diffuse

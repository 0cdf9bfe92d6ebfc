// libFuzzer: the zip reader (central directory, local headers, bounded inflate) must never crash.
#include <cstddef>
#include <cstdint>

#include "io/zip.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  diffuse::fuzz_zip(data, size);  // swallows diffuse::Error
  return 0;
}

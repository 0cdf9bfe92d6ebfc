// libFuzzer: PNG/JPEG decoding through libpng/libjpeg with our limits must never crash.
#include <cstddef>
#include <cstdint>

#include "core/error.h"
#include "io/image.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    diffuse::Image im = diffuse::decode_image(data, size, "fuzz.png");
    volatile size_t n = im.pixels.size();
    (void)n;
  } catch (const diffuse::Error&) {
  }
  return 0;
}

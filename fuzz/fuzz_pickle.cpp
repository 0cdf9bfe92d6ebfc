// libFuzzer: the restricted unpickler must reject or accept any byte string, never crash or run code.
#include <cstddef>
#include <cstdint>

#include "io/pickle.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  diffuse::fuzz_unpickle(data, size);  // swallows diffuse::Error
  return 0;
}

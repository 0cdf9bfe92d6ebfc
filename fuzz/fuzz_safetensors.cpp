// libFuzzer: the safetensors header/offset validator must reject or accept, never crash.
#include <cstddef>
#include <cstdint>

#include "core/error.h"
#include "io/tensor_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    diffuse::TensorFile f = diffuse::parse_safetensors(data, size, "fuzz.safetensors", nullptr);
    // Touch every tensor's bytes: validation must have kept them inside the buffer.
    volatile uint8_t sink = 0;
    for (const auto& e : f.tensors) {
      const uint8_t* p = static_cast<const uint8_t*>(e.tensor.data());
      if (e.tensor.bytes()) sink ^= p[0] ^ p[e.tensor.bytes() - 1];
    }
    (void)sink;
  } catch (const diffuse::Error&) {
  }
  return 0;
}

#include "backend/backend.h"

namespace diffuse {

const char* precision_name(Precision p) { return p == Precision::BF16 ? "bf16" : "fp32"; }

}  // namespace diffuse

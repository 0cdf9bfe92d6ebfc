#include "backend/backend.h"

namespace diffuse {

const char* precision_name(Precision p) { return p == Precision::BF16 ? "bf16" : "fp32"; }
const char* weight_format_name(WeightFormat f) { return f == WeightFormat::Int8 ? "int8" : "native"; }

}  // namespace diffuse

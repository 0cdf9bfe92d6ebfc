// SHA-256 now lives in core/sha256.h (models use it for A1111's LoRA hashes); the tools keep
// their names for it here.
#pragma once
#include "core/sha256.h"

namespace diffuse::tools {
using diffuse::Sha256;
using diffuse::sha256_file;
}  // namespace diffuse::tools

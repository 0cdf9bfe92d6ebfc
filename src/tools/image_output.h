// Image outputs of the CLI (generate, upscale): -o checked before the work, then written as PNG
// or JPEG by extension ("-": PNG to standard output), through io/output_file.h's safe writes.
#pragma once
#include <string>

#include "io/image.h"

namespace diffuse::tools {

// A regular or new file's extension must be .png/.jpg/.jpeg (`hint` follows "use"), and the place
// writable; devices, FIFOs and symlinks' targets are written in place whatever their name.
void check_image_output(const std::string& path, const std::string& hint);
void write_image_output(const std::string& path, const Image& im);

}  // namespace diffuse::tools

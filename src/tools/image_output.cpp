#include "tools/image_output.h"

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <vector>

#include "core/error.h"
#include "io/output_file.h"

namespace fs = std::filesystem;

namespace diffuse::tools {

namespace {
std::string lower_ext(const std::string& path) {
  std::string e = fs::path(path).extension().string();
  for (char& c : e) c = char(std::tolower(static_cast<unsigned char>(c)));
  return e;
}
}  // namespace

void check_image_output(const std::string& path, const std::string& hint) {
  if (!is_special_output(path)) {
    const std::string ext = lower_ext(path);
    DF_CHECK(ext == ".png" || ext == ".jpg" || ext == ".jpeg", "-o/--output ", path, ": unknown image type '", ext,
             "'; use ", hint);
  }
  check_output_writable(path, "-o/--output");
}

void write_image_output(const std::string& path, const Image& im) {
  if (path == "-") {
    const std::vector<uint8_t> png = encode_png(im);
    DF_CHECK(std::fwrite(png.data(), 1, png.size(), stdout) == png.size() && std::fflush(stdout) == 0,
             "-o -: cannot write to standard output: ", std::strerror(errno));
    return;
  }
  const std::string ext = lower_ext(path);
  if (ext == ".jpg" || ext == ".jpeg") write_jpeg(path, im);
  else write_png(path, im);
}

}  // namespace diffuse::tools

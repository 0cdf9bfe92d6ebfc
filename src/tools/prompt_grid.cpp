#include "tools/prompt_grid.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>

#include "core/error.h"
#include "io/output_file.h"

namespace diffuse::tools {

std::vector<PromptLine> read_prompt_file(const std::string& path) {
  check_input_file(path, "--prompt-file");
  std::ifstream f(path, std::ios::binary);
  DF_CHECK(f.good(), "--prompt-file ", path, ": cannot read: ", std::strerror(errno));
  std::vector<PromptLine> prompts;
  std::string s;
  int line = 0;
  while (std::getline(f, s)) {
    ++line;
    if (line == 1 && s.rfind("\xEF\xBB\xBF", 0) == 0) s.erase(0, 3);  // a UTF-8 byte-order mark (Notepad's)
    const size_t b = s.find_first_not_of(" \t\r"), e = s.find_last_not_of(" \t\r");
    if (b == std::string::npos || s[b] == '#') continue;
    prompts.push_back({s.substr(b, e - b + 1), line});
  }
  DF_CHECK(!f.bad(), "--prompt-file ", path, ": cannot read: ", std::strerror(errno));
  DF_CHECK(!prompts.empty(), "--prompt-file ", path,
           ": no prompts (one a line; blank lines and lines starting with # are skipped)");
  return prompts;
}

int grid_columns(int n, int cols) {
  if (n <= 0) return 1;
  if (cols > 0) return std::min(cols, n);
  int c = int(std::ceil(std::sqrt(double(n))));
  while (c > 1 && (c - 1) * (c - 1) >= n) --c;  // exact for perfect squares whatever the rounding
  return c;
}

Image image_grid(const std::vector<Image>& images, int cols) {
  DF_CHECK(!images.empty(), "--grid: no images");
  const int n = int(images.size());
  cols = grid_columns(n, cols);
  const int rows = (n + cols - 1) / cols;
  int cw = 0, ch = 0;
  for (const Image& im : images) {
    cw = std::max(cw, im.width);
    ch = std::max(ch, im.height);
  }
  DF_CHECK(int64_t(cw) * cols <= kMaxImageSide && int64_t(ch) * rows <= kMaxImageSide, "--grid: ", n, " images of ",
           cw, "x", ch, " in ", cols, " columns make ", int64_t(cw) * cols, "x", int64_t(ch) * rows,
           " pixels, more than ", kMaxImageSide, " on a side; give --grid-cols");
  Image g;
  g.width = cw * cols;
  g.height = ch * rows;
  g.channels = 3;
  g.format = "png";
  g.pixels.assign(size_t(g.width) * size_t(g.height) * 3, 0);
  for (int i = 0; i < n; ++i) {
    const Image rgb = images[size_t(i)].channels == 3 ? Image{} : to_rgb(images[size_t(i)]);
    const Image& im = images[size_t(i)].channels == 3 ? images[size_t(i)] : rgb;
    const int x0 = (i % cols) * cw + (cw - im.width) / 2, y0 = (i / cols) * ch + (ch - im.height) / 2;
    for (int y = 0; y < im.height; ++y)
      std::memcpy(&g.pixels[(size_t(y0 + y) * size_t(g.width) + size_t(x0)) * 3], &im.pixels[size_t(y) * size_t(im.width) * 3],
                  size_t(im.width) * 3);
  }
  g.text = images[0].text;
  return g;
}

}  // namespace diffuse::tools

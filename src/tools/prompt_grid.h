// `diffuse generate --prompt-file` and `--grid`: several prompts in one call (A1111's "prompts from
// file"), and all of a run's images in one PNG grid.
#pragma once
#include <string>
#include <vector>

#include "io/image.h"

namespace diffuse::tools {

// One prompt per line of `path`: blank lines and lines whose first non-blank character is '#' are
// skipped; a line's trailing '\r' (CRLF files) and surrounding blanks, and a leading UTF-8 byte-order
// mark, are dropped. Each prompt
// keeps its line number (1-based) for messages. Throws diffuse::Error naming the file when it
// cannot be read or holds no prompt.
struct PromptLine {
  std::string text;
  int line = 0;
};
std::vector<PromptLine> read_prompt_file(const std::string& path);

// Columns of a grid of n images: `cols` when given (> 0; at most n), else ceil(sqrt(n)).
int grid_columns(int n, int cols);

// The images in row-major cells of the largest image's size (smaller ones centred, the rest
// black), `cols` per row, no border: a grid of cols x ceil(n / cols) cells, RGB. Keeps the first
// image's PNG text (its A1111 parameters), as A1111's grids do. Throws diffuse::Error when a side
// would pass kMaxImageSide.
Image image_grid(const std::vector<Image>& images, int cols);

}  // namespace diffuse::tools

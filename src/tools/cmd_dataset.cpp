// `diffuse dataset …`: synthetic training datasets. `dataset shapes` writes the captioned
// coloured-shapes dataset of train/shapes_dataset.h in the folder layout `diffuse train` reads.
#include <cstdio>
#include <memory>

#include "core/error.h"
#include "train/shapes_dataset.h"
#include "tools/commands.h"

namespace diffuse::tools {

namespace {

struct ShapesFlags {
  train::ShapesDatasetOptions o;
  bool quiet = false;
};

int run_shapes(const ShapesFlags& f) {
  const bool quiet = f.quiet;
  train::write_shapes_dataset(f.o, [quiet](int64_t done, int64_t count) {
    if (!quiet) std::fprintf(stderr, "dataset shapes: %lld/%lld images\n", static_cast<long long>(done),
                             static_cast<long long>(count));
  });
  std::printf("wrote %lld images (%dx%d, seed %llu) with captions and heldout.txt to %s\n",
              static_cast<long long>(f.o.count), f.o.size, f.o.size, static_cast<unsigned long long>(f.o.seed),
              f.o.dir.c_str());
  return 0;
}

}  // namespace

Run add_dataset_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("dataset", "Write synthetic training datasets");
  auto f = std::make_shared<ShapesFlags>();
  CLI::App* shapes = cmd->add_subcommand(
      "shapes", "Coloured circles, squares and triangles on flat backgrounds, with captions (NNNNNN.png + .txt)");
  shapes->add_option("--count", f->o.count, "number of images (1 to 1000000)")->required();
  shapes->add_option("--size", f->o.size, "image side in pixels: 64 (default) or 128");
  shapes->add_option("-o,--output", f->o.dir, "output folder: new or empty (created when missing)")->required();
  shapes->add_option("--seed", f->o.seed, "random seed (default 0): the same seed writes the same files");
  shapes->add_flag("-q,--quiet", f->quiet, "no progress on stderr");
  return [f, shapes] {
    DF_CHECK(shapes->parsed(), "dataset: name the dataset to write: shapes (see diffuse dataset --help)");
    return run_shapes(*f);
  };
}

}  // namespace diffuse::tools

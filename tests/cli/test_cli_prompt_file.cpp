// `diffuse generate --prompt-file` and `--grid` (tools/prompt_grid.h): a 3-prompt file (with a
// byte-order mark, a comment, blank lines and a CRLF line) on the tiny sd1 model writes out.png,
// out_1.png, out_2.png with each prompt and seed + line index, and a 2x2 grid whose cells are those
// images; -b with prompts numbers every image and grids them all; a JPEG or '-' output still gets
// a PNG grid; the flags' errors exit 1 naming the file or option, before the model loads.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "cli_util.h"
#include "io/image.h"

namespace fs = std::filesystem;
using namespace clitest;

namespace {


std::string dir_for(const std::string& name) {
  const std::string d = temp_dir() + "/" + name;
  fs::create_directories(d);
  return d;
}

std::string parameters(const diffuse::Image& im) {
  for (const auto& [k, v] : im.text)
    if (k == "parameters") return v;
  return "";
}

// Whether `cell` sits in `grid` at pixel (x0, y0).
bool cell_is(const diffuse::Image& grid, const diffuse::Image& cell, int x0, int y0) {
  if (grid.channels != 3 || cell.channels != 3 || x0 + cell.width > grid.width || y0 + cell.height > grid.height)
    return false;
  for (int y = 0; y < cell.height; ++y)
    if (std::memcmp(&grid.pixels[(size_t(y0 + y) * grid.width + x0) * 3], &cell.pixels[size_t(y) * cell.width * 3],
                    size_t(cell.width) * 3) != 0)
      return false;
  return true;
}

bool all_black(const diffuse::Image& grid, int x0, int y0, int w, int h) {
  for (int y = y0; y < y0 + h; ++y)
    for (int x = x0 * 3; x < (x0 + w) * 3; ++x)
      if (grid.pixels[size_t(y) * grid.width * 3 + x] != 0) return false;
  return true;
}

std::vector<std::string> gen(const std::string& model, std::vector<std::string> extra) {
  std::vector<std::string> a = {"generate", "-m", model, "-W", "64", "-H", "64", "--steps", "1", "-s", "5"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

}  // namespace

TEST(CliPromptFile, ThreePromptsThreeImagesAndAGrid) {
  const std::string model = tiny_sd1();
  if (model.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  const std::string d = dir_for("prompts3");
  write_file(d + "/prompts.txt", "\xEF\xBB\xBF# my prompts\n\na red fox\n  \n# skipped\na blue bird\r\n  a green frog  \n");
  Result r = run(gen(model, {"--prompt-file", d + "/prompts.txt", "--grid", d + "/grid.png", "-o", d + "/out.png"}), 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const char* prompts[] = {"a red fox", "a blue bird", "a green frog"};
  const std::string names[] = {d + "/out.png", d + "/out_1.png", d + "/out_2.png"};
  std::vector<diffuse::Image> ims;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(fs::exists(names[i])) << names[i] << "\n" << r.err;
    ims.push_back(diffuse::read_image(names[i]));
    EXPECT_EQ(ims.back().width, 64);
    EXPECT_EQ(ims.back().height, 64);
    const std::string p = parameters(ims.back());
    EXPECT_EQ(p.rfind(std::string(prompts[i]) + "\n", 0), 0u) << p;  // the prompt, trimmed
    EXPECT_TRUE(contains(p, "Seed: " + std::to_string(5 + i) + ",")) << p;
    EXPECT_TRUE(contains(r.out, "wrote " + names[i] + " (seed " + std::to_string(5 + i) + ")")) << r.out;
  }
  EXPECT_FALSE(fs::exists(d + "/out_3.png"));
  EXPECT_NE(ims[0].pixels, ims[1].pixels);  // different prompts and seeds
  const diffuse::Image grid = diffuse::read_image(d + "/grid.png");
  EXPECT_EQ(grid.format, "png");
  ASSERT_EQ(grid.width, 128);  // ceil(sqrt(3)) = 2 columns, 2 rows
  ASSERT_EQ(grid.height, 128);
  EXPECT_TRUE(cell_is(grid, ims[0], 0, 0));
  EXPECT_TRUE(cell_is(grid, ims[1], 64, 0));
  EXPECT_TRUE(cell_is(grid, ims[2], 0, 64));
  EXPECT_TRUE(all_black(grid, 64, 64, 64, 64));
  EXPECT_TRUE(contains(r.out, "wrote " + d + "/grid.png (grid of 3 images, 128x128)")) << r.out;
  EXPECT_TRUE(contains(r.err, "prompt 3/3 (line 7): a green frog")) << r.err;

  // Prompt 2 is what -p with seed 6 makes on its own.
  Result one = run(gen(model, {"-p", "a blue bird", "-s", "6", "-o", d + "/single.png"}), 300);
  ASSERT_EQ(one.exit_code, 0) << one.err;
  EXPECT_EQ(diffuse::read_image(d + "/single.png").pixels, ims[1].pixels);
}

TEST(CliPromptFile, BatchesNumberEveryImageAndGridThemAll) {
  const std::string model = tiny_sd1();
  if (model.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  const std::string d = dir_for("prompts-batch");
  write_file(d + "/p.txt", "a red fox\na blue bird\n");
  Result r = run(gen(model, {"--prompt-file", d + "/p.txt", "-b", "2", "--grid", d + "/g.png", "--grid-cols", "4",
                             "-o", d + "/o.jpg", "-q"}),
                 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (int i = 0; i < 4; ++i) {
    const std::string p = d + (i ? "/o_" + std::to_string(i) + ".jpg" : "/o.jpg");
    ASSERT_TRUE(fs::exists(p)) << p;
    EXPECT_EQ(diffuse::read_image(p).format, "jpeg");
    EXPECT_TRUE(contains(r.out, "wrote " + p + " (seed " + std::to_string(5 + i) + ")")) << r.out;  // one long batch
  }
  EXPECT_FALSE(fs::exists(d + "/o_4.jpg"));
  const diffuse::Image grid = diffuse::read_image(d + "/g.png");
  EXPECT_EQ(grid.format, "png");  // the grid is PNG whatever -o is
  EXPECT_EQ(grid.width, 256);
  EXPECT_EQ(grid.height, 64);

  // -b alone (no prompt file) grids the batch; 3 images, default columns 2.
  r = run(gen(model, {"-p", "a cat", "-b", "3", "--grid", d + "/g3.png", "-o", d + "/b.png", "-q"}), 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const diffuse::Image g3 = diffuse::read_image(d + "/g3.png");
  EXPECT_EQ(g3.width, 128);
  EXPECT_EQ(g3.height, 128);
  EXPECT_TRUE(cell_is(g3, diffuse::read_image(d + "/b_2.png"), 0, 64));
}

TEST(CliPromptFile, StandardOutputStillGetsAGridFile) {
  const std::string model = tiny_sd1();
  if (model.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  const std::string d = dir_for("prompts-stdout");
  write_file(d + "/one.txt", "# only one\na lighthouse\n");
  Result r = run(gen(model, {"--prompt-file", d + "/one.txt", "--grid", d + "/g.png", "-o", "-", "-q"}), 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("\x89PNG", 0), 0u);  // standard output carries only the image
  EXPECT_TRUE(contains(r.err, "wrote " + d + "/g.png")) << r.err;
  const diffuse::Image g = diffuse::read_image(d + "/g.png");
  EXPECT_EQ(g.width, 64);
  EXPECT_EQ(g.height, 64);
}

TEST(CliPromptFile, ErrorsNameTheFileOrOption) {
  const std::string model = tiny_sd1();
  if (model.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  const std::string d = dir_for("prompts-errors");
  write_file(d + "/empty.txt", "# nothing here\n\n   \n");
  write_file(d + "/two.txt", "a\nb\n");
  const std::string o = d + "/o.png";
  struct Case {
    std::vector<std::string> flags;
    std::vector<std::string> said;
  };
  const std::vector<Case> cases = {
      {{"--prompt-file", d + "/missing.txt", "-o", o}, {"--prompt-file " + d + "/missing.txt"}},
      {{"--prompt-file", d, "-o", o}, {"--prompt-file " + d}},
      {{"--prompt-file", d + "/empty.txt", "-o", o}, {"--prompt-file " + d + "/empty.txt", "no prompts"}},
      {{"--prompt-file", d + "/two.txt", "-p", "x", "-o", o}, {"--prompt-file", "-p/--prompt"}},
      {{"--prompt-file", d + "/two.txt", "-o", "-"}, {"-o -", "makes 2"}},
      {{"-p", "x", "--grid-cols", "2", "-o", o}, {"--grid-cols", "--grid"}},
      {{"-p", "x", "--grid", d + "/g.png", "--grid-cols", "0", "-o", o}, {"--grid-cols 0"}},
      {{"-p", "x", "--grid", d + "/g.jpg", "-o", o}, {"--grid " + d + "/g.jpg", "PNG"}},
      {{"-p", "x", "--grid", "-", "-o", o}, {"--grid -"}},
      {{"-p", "x", "--grid", d, "-o", o}, {"--grid " + d, "folder"}},
      {{"-p", "x", "--grid", d + "/nowhere/g.png", "-o", o}, {"--grid " + d + "/nowhere/g.png"}},
      {{"--prompt-file", d + "/two.txt", "--grid", d + "/o_1.png", "-o", o}, {"--grid " + d + "/o_1.png", "image output"}},
  };
  for (const Case& c : cases) {
    Result r = run(gen(model, c.flags));
    std::string shown;
    for (const std::string& f : c.flags) shown += f + " ";
    EXPECT_EQ(r.exit_code, 1) << shown << "\n" << r.err;
    EXPECT_TRUE(contains(r.err, "diffuse: error: ")) << shown << "\n" << r.err;
    for (const std::string& s : c.said) EXPECT_TRUE(contains(r.err, s)) << shown << "\n" << r.err;
    EXPECT_FALSE(contains(r.err, "loaded in")) << "loaded the model first: " << shown << "\n" << r.err;
  }
  EXPECT_FALSE(fs::exists(o));
  EXPECT_FALSE(fs::exists(d + "/g.png"));
}

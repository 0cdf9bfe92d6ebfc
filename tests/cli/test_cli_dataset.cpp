// `diffuse dataset shapes`: the files it writes (images, captions, heldout.txt), the same bytes for
// a seed, progress on stderr, and bad arguments (exit 1, a message naming the option).
#include <filesystem>
#include <string>

#include "cli_util.h"
#include "io/image.h"

using namespace clitest;
namespace fs = std::filesystem;

namespace {

std::string out_dir(const std::string& name) {
  const std::string d = temp_dir() + "/" + name;
  fs::remove_all(d);
  return d;
}

}  // namespace

TEST(DatasetShapes, WritesAFolderTrainCanRead) {
  const std::string d = out_dir("shapes_a");
  Result r = run({"dataset", "shapes", "--count", "25", "--size", "64", "-o", d, "--seed", "3"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("25/25"), std::string::npos) << r.err;
  EXPECT_NE(r.out.find("wrote 25 images"), std::string::npos) << r.out;
  int png = 0, txt = 0;
  for (const auto& e : fs::directory_iterator(d)) {
    const std::string ext = e.path().extension().string();
    png += ext == ".png";
    txt += ext == ".txt";
  }
  EXPECT_EQ(png, 25);
  EXPECT_EQ(txt, 26);  // 25 captions + heldout.txt
  const diffuse::Image im = diffuse::read_image(d + "/000024.png");
  EXPECT_EQ(im.width, 64);
  EXPECT_EQ(im.height, 64);
  const std::string caption = slurp(d + "/000024.txt");
  EXPECT_NE(caption.find(" background"), std::string::npos) << caption;
  EXPECT_EQ(caption.find('\n'), caption.size() - 1) << caption;
  const std::string held = slurp(d + "/heldout.txt");
  EXPECT_EQ(held[0], '#');
  EXPECT_NE(held.find("\nred circle top\n"), std::string::npos) << held;

  r = run({"dataset", "shapes", "--count", "3", "--size", "128", "-o", out_dir("shapes_128"), "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err, "");
  EXPECT_EQ(diffuse::read_image(temp_dir() + "/shapes_128/000002.png").width, 128);
}

TEST(DatasetShapes, SameSeedSameBytes) {
  const std::string a = out_dir("shapes_s1"), b = out_dir("shapes_s2"), c = out_dir("shapes_s3");
  ASSERT_EQ(run({"dataset", "shapes", "--count", "10", "-o", a, "--seed", "42"}).exit_code, 0);
  ASSERT_EQ(run({"dataset", "shapes", "--count", "10", "-o", b, "--seed", "42"}).exit_code, 0);
  ASSERT_EQ(run({"dataset", "shapes", "--count", "10", "-o", c, "--seed", "43"}).exit_code, 0);
  int differ = 0;
  for (int i = 0; i < 10; ++i) {
    const std::string n = "/00000" + std::to_string(i);
    EXPECT_EQ(slurp(a + n + ".png"), slurp(b + n + ".png")) << n;
    EXPECT_EQ(slurp(a + n + ".txt"), slurp(b + n + ".txt")) << n;
    differ += slurp(a + n + ".png") != slurp(c + n + ".png");
  }
  EXPECT_EQ(differ, 10);
}

TEST(DatasetShapes, BadArgumentsExitOneNamingTheOption) {
  const std::string d = out_dir("shapes_bad");
  struct Case {
    std::vector<std::string> args;
    std::string needle;
  };
  const std::string file = temp_dir() + "/not_a_folder";
  write_file(file, "x");
  const std::string full = out_dir("shapes_full");
  fs::create_directory(full);
  write_file(full + "/000000.png", "old");
  const std::vector<Case> cases = {
      {{"dataset", "shapes", "--count", "0", "-o", d}, "--count"},
      {{"dataset", "shapes", "--count", "-4", "-o", d}, "--count"},
      {{"dataset", "shapes", "--count", "many", "-o", d}, "--count"},
      {{"dataset", "shapes", "-o", d}, "--count"},
      {{"dataset", "shapes", "--count", "5", "--size", "100", "-o", d}, "--size"},
      {{"dataset", "shapes", "--count", "5"}, "--output"},
      {{"dataset", "shapes", "--count", "5", "-o", file}, "-o/--output"},
      {{"dataset", "shapes", "--count", "5", "-o", full}, "not empty"},
      {{"dataset"}, "shapes"},
  };
  for (const Case& c : cases) {
    Result r = run(c.args);
    std::string line;
    for (const auto& a : c.args) line += a + " ";
    EXPECT_EQ(r.exit_code, 1) << line << r.err;
    EXPECT_NE(r.err.find(c.needle), std::string::npos) << line << "\n" << r.err;
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << line << "\n" << r.err;  // one line
  }
  EXPECT_NE(run({"dataset", "shapes", "--count", "5", "-o", file}).err.find("not a folder"), std::string::npos);
  EXPECT_FALSE(fs::exists(d));
}

// The training dataset (train/dataset.h): kohya's <repeats>_<class words> folders, caption files
// and their fallbacks, skipped / unreadable entries, tag frequencies, caption shuffling, aspect-
// ratio buckets and the training pixels of one image. Every dataset is built here from PNG files
// written into a fresh temporary folder.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/image.h"
#include "models/controlnet.h"
#include "train/dataset.h"
#include "train/reg_data.h"

using namespace diffuse;
using namespace diffuse::train;
namespace fs = std::filesystem;

namespace {

class DatasetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("diffuse_test_train_dataset_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  // An RGB PNG of w × h (pixel values from x and y) at dir_/rel.
  std::string png(const std::string& rel, int w = 8, int h = 8) {
    Image im;
    im.width = w;
    im.height = h;
    im.channels = 3;
    im.pixels.resize(size_t(w) * h * 3);
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) {
        uint8_t* p = &im.pixels[(size_t(y) * w + x) * 3];
        p[0] = uint8_t(x * 6 % 256);
        p[1] = 100;
        p[2] = uint8_t(y * 12 % 256);
      }
    fs::path p = dir_ / rel;
    fs::create_directories(p.parent_path());
    write_png(p.string(), im);
    return p.string();
  }
  void text(const std::string& rel, const std::string& content) {
    fs::path p = dir_ / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p, std::ios::binary) << content;
  }
  const DatasetItem& item(const Dataset& ds, const std::string& rel) {
    std::string want = (dir_ / rel).string();
    for (const auto& it : ds.items)
      if (it.image_path == want) return it;
    ADD_FAILURE() << "no item " << want;
    static DatasetItem none;
    return none;
  }
  static bool any_warning(const Dataset& ds, const std::string& a, const std::string& b = "") {
    for (const auto& w : ds.warnings)
      if (w.find(a) != std::string::npos && w.find(b) != std::string::npos) return true;
    return false;
  }
  fs::path dir_;
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

TEST_F(DatasetTest, KohyaSubfoldersRepeatsClassWordsAndCaptions) {
  png("10_sks dog/a.png");
  text("10_sks dog/a.txt", "  from txt, red  \nsecond line\n");
  text("10_sks dog/a.caption", "from caption");
  png("10_sks dog/b.PNG");
  text("10_sks dog/b.caption", "only caption");
  png("10_sks dog/c.png");  // no caption: class words
  png("3_cat_photo/d.png");
  png("abc/e.png");         // no numeric prefix: skipped
  png("0_zero/f.png");      // repeats < 1: skipped
  png("stray.png");         // directly in DIR beside kohya folders: ignored
  text("10_sks dog/notes.txt", "not an image");

  Dataset ds = scan_dataset(dir_.string(), DatasetOptions{});
  ASSERT_EQ(ds.items.size(), 4u);
  for (size_t i = 1; i < ds.items.size(); ++i) EXPECT_LT(ds.items[i - 1].image_path, ds.items[i].image_path);
  EXPECT_EQ(item(ds, "10_sks dog/a.png").caption, "from txt, red");  // .txt first, first line, trimmed
  EXPECT_EQ(item(ds, "10_sks dog/b.PNG").caption, "only caption");
  EXPECT_EQ(item(ds, "10_sks dog/c.png").caption, "sks dog");
  EXPECT_EQ(item(ds, "3_cat_photo/d.png").caption, "cat_photo");  // everything after the first '_'
  EXPECT_EQ(item(ds, "10_sks dog/a.png").repeats, 10);
  EXPECT_EQ(item(ds, "3_cat_photo/d.png").repeats, 3);
  EXPECT_EQ(ds.epoch_length(), 10 + 10 + 10 + 3);
  for (const auto& it : ds.items) {
    EXPECT_FALSE(it.is_reg);
    EXPECT_EQ(it.width, 512);
    EXPECT_EQ(it.height, 512);
    EXPECT_EQ(it.orig_width, 8);
    EXPECT_EQ(it.orig_height, 8);
  }
  EXPECT_TRUE(any_warning(ds, (dir_ / "abc").string(), "skipped"));
  EXPECT_TRUE(any_warning(ds, (dir_ / "0_zero").string(), "skipped"));
  EXPECT_TRUE(any_warning(ds, "1 images directly in"));
  EXPECT_FALSE(any_warning(ds, "no caption file"));  // every image has a caption or class words

  // The order of caption extensions decides; a missing dot is added.
  DatasetOptions o;
  o.caption_extensions = {"caption", ".txt"};
  o.is_reg = true;
  Dataset ds2 = scan_dataset(dir_.string(), o);
  EXPECT_EQ(item(ds2, "10_sks dog/a.png").caption, "from caption");
  for (const auto& it : ds2.items) EXPECT_TRUE(it.is_reg);
}

TEST_F(DatasetTest, FlatFolderMissingCaptionsAndTagFrequency) {
  png("flat/a.png");
  text("flat/a.txt", "tag1, tag2 ,tag3");
  png("flat/b.png");
  text("flat/b.txt", "tag2, tag2,, tag4");
  png("flat/c.png");
  png("flat/d.jpg");  // a PNG with a .jpg name: the format comes from the bytes
  png("flat/sub/e.png");  // not searched
  Dataset ds = scan_dataset((dir_ / "flat").string(), DatasetOptions{});
  ASSERT_EQ(ds.items.size(), 4u);
  EXPECT_EQ(ds.epoch_length(), 4);
  for (const auto& it : ds.items) EXPECT_EQ(it.repeats, 1);
  EXPECT_EQ(item(ds, "flat/c.png").caption, "");
  EXPECT_EQ(item(ds, "flat/d.jpg").caption, "");
  EXPECT_TRUE(any_warning(ds, "2 images have no caption file (.txt/.caption) and no class words"));
  EXPECT_TRUE(any_warning(ds, (dir_ / "flat" / "sub").string(), "skipped"));

  ASSERT_EQ(ds.tag_frequency.count("flat"), 1u);
  const auto& f = ds.tag_frequency.at("flat");
  EXPECT_EQ(f.size(), 4u);
  EXPECT_EQ(f.at("tag1"), 1);
  EXPECT_EQ(f.at("tag2"), 3);  // every occurrence counted
  EXPECT_EQ(f.at("tag3"), 1);
  EXPECT_EQ(f.at("tag4"), 1);

  // Kohya folders: keyed by folder name; class-word captions count as tags.
  png("k/5_sks dog/a.png");
  png("k/5_sks dog/b.png");
  text("k/5_sks dog/b.txt", "sks dog, grass");
  Dataset dk = scan_dataset((dir_ / "k").string(), DatasetOptions{});
  const auto& fk = dk.tag_frequency.at("5_sks dog");
  EXPECT_EQ(fk.at("sks dog"), 2);
  EXPECT_EQ(fk.at("grass"), 1);
  EXPECT_EQ(dk.epoch_length(), 10);
}

TEST_F(DatasetTest, CorruptAndUnsupportedImages) {
  png("1_x/good.png");
  std::mt19937 gen(7);
  std::string junk(300, '\0');
  for (char& c : junk) c = char(gen() & 0xff);
  text("1_x/bad.png", junk);
  text("1_x/pic.webp", "RIFF....WEBPVP8 ");
  Dataset ds = scan_dataset(dir_.string(), DatasetOptions{});
  ASSERT_EQ(ds.items.size(), 1u);
  EXPECT_TRUE(any_warning(ds, (dir_ / "1_x" / "bad.png").string(), "cannot read"));
  EXPECT_TRUE(any_warning(ds, (dir_ / "1_x" / "pic.webp").string(), "cannot read"));

  DatasetOptions strict;
  strict.strict = true;
  std::string e = error_of([&] { scan_dataset(dir_.string(), strict); });
  EXPECT_NE(e.find("bad.png"), std::string::npos) << e;
  EXPECT_THROW(scan_dataset(dir_.string(), strict), FileError);

  // Only unreadable images: no usable image, an error naming the folder.
  fs::remove(dir_ / "1_x" / "good.png");
  e = error_of([&] { scan_dataset(dir_.string(), DatasetOptions{}); });
  EXPECT_NE(e.find(dir_.string()), std::string::npos) << e;
}

TEST_F(DatasetTest, FolderAndOptionErrors) {
  fs::create_directories(dir_ / "empty");
  std::string e = error_of([&] { scan_dataset((dir_ / "empty").string(), DatasetOptions{}); });
  EXPECT_NE(e.find((dir_ / "empty").string()), std::string::npos) << e;
  EXPECT_NE(e.find("no usable training images"), std::string::npos) << e;

  e = error_of([&] { scan_dataset((dir_ / "missing").string(), DatasetOptions{}); });
  EXPECT_NE(e.find((dir_ / "missing").string() + ": not a folder"), std::string::npos) << e;
  std::string file = png("file.png");
  e = error_of([&] { scan_dataset(file, DatasetOptions{}); });
  EXPECT_NE(e.find("not a folder"), std::string::npos) << e;

  DatasetOptions o;
  o.resolution = 100;
  e = error_of([&] { scan_dataset(dir_.string(), o); });
  EXPECT_NE(e.find("--resolution 100"), std::string::npos) << e;
}

TEST(DatasetCaption, ShuffleKeepsLeadingTagsDeterministicPermutation) {
  const std::string cap = "k1, k2 ,t1, t2, t3, t4, t5, t6, t7";
  DatasetOptions o;
  std::mt19937_64 rng(1);
  EXPECT_EQ(caption_for_step(cap, o, rng), cap);  // no shuffling: unchanged

  o.shuffle_captions = true;
  o.keep_tokens = 2;
  const std::vector<std::string> rest = {"t1", "t2", "t3", "t4", "t5", "t6", "t7"};
  std::set<std::string> seen;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    std::mt19937_64 a(seed), b(seed);
    std::string s = caption_for_step(cap, o, a);
    EXPECT_EQ(s, caption_for_step(cap, o, b));  // same seed, same caption
    seen.insert(s);
    std::vector<std::string> tags;
    size_t start = 0;
    while (true) {
      size_t end = s.find(", ", start);
      tags.push_back(s.substr(start, end == std::string::npos ? std::string::npos : end - start));
      if (end == std::string::npos) break;
      start = end + 2;
    }
    ASSERT_EQ(tags.size(), 9u) << s;
    EXPECT_EQ(tags[0], "k1");
    EXPECT_EQ(tags[1], "k2");
    std::vector<std::string> r(tags.begin() + 2, tags.end());
    std::sort(r.begin(), r.end());
    EXPECT_EQ(r, rest) << s;
  }
  EXPECT_GT(seen.size(), 10u);  // 7! orders: 20 seeds give many distinct ones

  // keep_tokens past the tag count, and a single tag: nothing to shuffle.
  o.keep_tokens = 20;
  EXPECT_EQ(caption_for_step("a,b , c", o, rng), "a, b, c");
  o.keep_tokens = 0;
  EXPECT_EQ(caption_for_step("solo", o, rng), "solo");
  EXPECT_EQ(caption_for_step("", o, rng), "");
}

TEST(DatasetBuckets, KohyaBucketList) {
  auto b = bucket_resolutions(512, 256, 1024);
  std::set<std::pair<int, int>> s(b.begin(), b.end());
  EXPECT_EQ(s.size(), b.size());  // deduplicated
  EXPECT_TRUE(std::is_sorted(b.begin(), b.end()));
  EXPECT_TRUE(s.count({512, 512}));
  for (auto [w, h] : b) {
    EXPECT_LE(int64_t(w) * h, 512 * 512) << w << "x" << h;
    EXPECT_EQ(w % 64, 0);
    EXPECT_EQ(h % 64, 0);
    EXPECT_GE(w, 256);
    EXPECT_LE(w, 1024);
    EXPECT_GE(h, 256);
    EXPECT_LE(h, 1024);
    EXPECT_TRUE(s.count({h, w})) << w << "x" << h;
  }
  // Known members (widths 256..1024: height = floor(262144 / w / 64) * 64 capped at 1024).
  for (auto p : std::vector<std::pair<int, int>>{{256, 1024}, {320, 768}, {384, 640}, {448, 576}, {704, 320},
                                                 {1024, 256}, {832, 256}})
    EXPECT_TRUE(s.count(p)) << p.first << "x" << p.second;
  EXPECT_EQ(b.size(), 17u);  // 8 non-square shapes × 2 orientations + the square

  EXPECT_EQ(bucket_resolutions(128, 128, 1024), (std::vector<std::pair<int, int>>{{128, 128}}));
}

TEST_F(DatasetTest, BucketAssignmentNearestAspectRatio) {
  png("wide.png", 300, 150);
  png("tall.png", 150, 500);
  png("square.png", 64, 64);
  DatasetOptions o;
  o.buckets = true;
  Dataset ds = scan_dataset(dir_.string(), o);
  ASSERT_EQ(ds.items.size(), 3u);
  auto buckets = bucket_resolutions(512, 256, 1024);
  auto check_nearest = [&](const DatasetItem& it) {
    double ar = double(it.orig_width) / it.orig_height;
    double mine = std::fabs(double(it.width) / it.height - ar);
    for (auto [w, h] : buckets) EXPECT_LE(mine, std::fabs(double(w) / h - ar) + 1e-12) << w << "x" << h;
    EXPECT_TRUE(std::count(buckets.begin(), buckets.end(), std::make_pair(it.width, it.height)));
  };
  const DatasetItem& wide = item(ds, "wide.png");
  EXPECT_EQ(wide.width, 704);  // AR 2.2 (nearest to 2; next 1.667 and 2.4)
  EXPECT_EQ(wide.height, 320);
  // Covering 704×320 from 300×150: width matches (704/300), height 352, 16 rows cropped each side.
  EXPECT_EQ(wide.crop_left, 0);
  EXPECT_EQ(wide.crop_top, 16);
  check_nearest(wide);
  const DatasetItem& tall = item(ds, "tall.png");
  EXPECT_EQ(tall.width, 256);  // AR 0.3: 256×832 (0.308) beats 256×896 (0.286) and 256×1024
  EXPECT_EQ(tall.height, 832);
  EXPECT_EQ(tall.crop_left, 0);  // covering: width matches (256/150), height 853
  EXPECT_EQ(tall.crop_top, 10);
  check_nearest(tall);
  const DatasetItem& sq = item(ds, "square.png");
  EXPECT_EQ(sq.width, 512);
  EXPECT_EQ(sq.height, 512);
}

TEST_F(DatasetTest, LoadTrainingImageCoversAndCentreCrops) {
  std::string path = png("g.png", 40, 20);  // R = 6x, G = 100, B = 12y
  DatasetItem it;
  it.image_path = path;
  it.width = it.height = 16;
  Tensor t = load_training_image(it);
  ASSERT_EQ(t.shape(), (Shape{1, 16, 16, 3}));
  EXPECT_EQ(it.orig_width, 40);
  EXPECT_EQ(it.orig_height, 20);
  // 40×20 covering 16×16: height matches (scale 0.8) → 32×16, 8 columns cropped on each side.
  EXPECT_EQ(it.crop_left, 8);
  EXPECT_EQ(it.crop_top, 0);
  const float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) {
    EXPECT_GE(p[i], -1.0f);
    EXPECT_LE(p[i], 1.0f);
  }
  // Exactly the Lanczos-resized image's centre.
  Image src = read_image(path);
  Image rs = resize_lanczos(src, 32, 16);
  for (int y = 0; y < 16; ++y)
    for (int x = 0; x < 16; ++x)
      for (int c = 0; c < 3; ++c)
        ASSERT_EQ(p[(y * 16 + x) * 3 + c], float(rs.pixels[(size_t(y) * 32 + x + 8) * 3 + c]) / 127.5f - 1.0f);
  // And against the gradient itself: output column x of the crop is resized column x + 8, whose
  // centre lies at source column (x + 8.5) / 0.8 − 0.5 (≥ 4 px from either edge, so the Lanczos
  // window stays inside); R = 6 · that, to within Lanczos' small deviation from linear.
  for (int x : {0, 5, 11, 15}) {
    double src_x = (x + 8.5) / 0.8 - 0.5;
    double want = 6.0 * src_x / 127.5 - 1.0;
    EXPECT_NEAR(p[(7 * 16 + x) * 3 + 0], want, 2.0 / 127.5) << "column " << x;
    EXPECT_FLOAT_EQ(p[(7 * 16 + x) * 3 + 1], 100.0f / 127.5f - 1.0f);
  }
  // A left-aligned crop would start near R = 6·0.6: the centre crop starts near 6·10.1.
  EXPECT_GT(p[0], (6.0 * 9.0) / 127.5 - 1.0);

  // A non-square target from a square image: width matches, rows cropped.
  std::string sq = png("s.png", 20, 20);
  DatasetItem it2;
  it2.image_path = sq;
  it2.width = 16;
  it2.height = 8;
  Tensor t2 = load_training_image(it2);
  ASSERT_EQ(t2.shape(), (Shape{1, 8, 16, 3}));
  EXPECT_EQ(it2.crop_left, 0);
  EXPECT_EQ(it2.crop_top, 4);

  DatasetItem bad;
  bad.image_path = (dir_ / "nope.png").string();
  bad.width = bad.height = 16;
  EXPECT_THROW(load_training_image(bad), FileError);
}

// ---- regularisation images (train/reg_data.h): kohya's repeat matching ----

std::vector<DatasetItem> reg_items(const std::vector<int>& repeats) {
  std::vector<DatasetItem> v;
  for (size_t i = 0; i < repeats.size(); ++i) {
    DatasetItem it;
    it.image_path = "reg/" + std::to_string(i) + ".png";
    it.repeats = repeats[i];
    it.is_reg = true;
    v.push_back(it);
  }
  return v;
}
std::vector<int> repeats_of(const std::vector<DatasetItem>& v) {
  std::vector<int> r;
  for (const auto& it : v) r.push_back(it.repeats);
  return r;
}

TEST(RegMatch, FewerRegImagesAreRepeatedInTurnToTheTrainingCount) {
  auto reg = reg_items({1, 1, 1});
  EXPECT_EQ(match_reg_repeats(reg, 10), 0);
  // First pass 1+1+1 = 3, then one more each in turn: +3, +3, +1 -> 4, 3, 3.
  EXPECT_EQ(repeats_of(reg), (std::vector<int>{4, 3, 3}));

  auto mixed = reg_items({1, 2});  // first pass 3; then img0, img1, img0, img1 -> 7
  EXPECT_EQ(match_reg_repeats(mixed, 7), 0);
  EXPECT_EQ(repeats_of(mixed), (std::vector<int>{3, 4}));

  auto exact = reg_items({2, 2});
  EXPECT_EQ(match_reg_repeats(exact, 4), 0);
  EXPECT_EQ(repeats_of(exact), (std::vector<int>{2, 2}));
}

TEST(RegMatch, SurplusRegImagesAreDroppedInScanOrder) {
  auto reg = reg_items({1, 1, 1, 1, 1});
  EXPECT_EQ(match_reg_repeats(reg, 3), 2);
  ASSERT_EQ(reg.size(), 3u);
  EXPECT_EQ(repeats_of(reg), (std::vector<int>{1, 1, 1}));
  EXPECT_EQ(reg[2].image_path, "reg/2.png");

  // Folder repeats 3, 5 training samples: kohya's first pass takes whole images (3, then 6 >= 5),
  // overshooting by one; the third image is unused.
  auto big = reg_items({3, 3, 3});
  EXPECT_EQ(match_reg_repeats(big, 5), 1);
  EXPECT_EQ(repeats_of(big), (std::vector<int>{3, 3}));

  auto none = reg_items({});
  EXPECT_EQ(match_reg_repeats(none, 5), 0);
  EXPECT_TRUE(none.empty());
}

TEST_F(DatasetTest, RegDataJoinsTheEpochMatchedToTheTrainingImages) {
  png("train/10_sks/a.png");
  png("train/10_sks/b.png");
  text("train/10_sks/a.txt", "sks, dog");
  png("reg/1_dog/x.png");
  png("reg/1_dog/y.png");
  png("reg/1_dog/z.png");
  text("reg/1_dog/x.txt", "dog");
  Dataset ds = scan_dataset((dir_ / "train").string(), DatasetOptions{});
  ASSERT_EQ(ds.epoch_length(), 20);
  RegInfo info = add_reg_data(ds, (dir_ / "reg").string(), DatasetOptions{});
  EXPECT_EQ(info.num_reg_images, 3);
  EXPECT_EQ(info.matched, 20);
  EXPECT_EQ(info.unused, 0);
  ASSERT_EQ(info.folders.size(), 1u);
  EXPECT_EQ(info.folders.at("1_dog").repeats, 1);
  EXPECT_EQ(info.folders.at("1_dog").images, 3);
  ASSERT_EQ(ds.items.size(), 5u);
  // The training items first, then the reg items (scan order), flagged and re-counted.
  EXPECT_FALSE(ds.items[0].is_reg);
  EXPECT_FALSE(ds.items[1].is_reg);
  for (size_t i = 2; i < 5; ++i) EXPECT_TRUE(ds.items[i].is_reg) << i;
  EXPECT_EQ(ds.items[2].image_path, (dir_ / "reg/1_dog/x.png").string());
  EXPECT_EQ(ds.items[2].caption, "dog");
  EXPECT_EQ(ds.items[3].caption, "dog");  // the class words
  EXPECT_EQ(ds.items[2].repeats + ds.items[3].repeats + ds.items[4].repeats, 20);
  EXPECT_EQ(ds.items[2].repeats, 7);
  EXPECT_EQ(ds.items[4].repeats, 6);
  EXPECT_EQ(ds.epoch_length(), 40);
  EXPECT_EQ(samples_per_epoch(ds, false), 20);
  EXPECT_EQ(samples_per_epoch(ds, true), 20);
  EXPECT_EQ(ds.tag_frequency.at("1_dog").at("dog"), 3);
  EXPECT_EQ(ds.tag_frequency.at("10_sks").at("sks"), 2);  // a's caption and b's class words
  EXPECT_EQ(ds.tag_frequency.at("10_sks").at("dog"), 1);

  auto md = reg_metadata(info, 1.0);
  EXPECT_EQ(md.at("ss_num_reg_images"), "3");
  EXPECT_EQ(md.at("ss_reg_dataset_dirs"), R"({"1_dog":{"img_count":3,"n_repeats":1}})");
  EXPECT_EQ(md.at("ss_prior_loss_weight"), "1.0");
  auto none = reg_metadata(RegInfo{}, 0.5);
  EXPECT_EQ(none.at("ss_num_reg_images"), "0");
  EXPECT_EQ(none.at("ss_reg_dataset_dirs"), "{}");
  EXPECT_EQ(none.at("ss_prior_loss_weight"), "0.5");
}

TEST_F(DatasetTest, RegDataSurplusIsWarnedAndBadFoldersNamed) {
  png("train/1_sks/a.png");
  for (const char* n : {"p", "q", "r"}) png(std::string("reg/2_dog/") + n + ".png");
  Dataset ds = scan_dataset((dir_ / "train").string(), DatasetOptions{});
  RegInfo info = add_reg_data(ds, (dir_ / "reg").string(), DatasetOptions{});
  EXPECT_EQ(info.num_reg_images, 6);
  EXPECT_EQ(info.unused, 2);
  EXPECT_EQ(info.matched, 2);  // one image at its folder's 2 repeats covers the single sample
  ASSERT_EQ(ds.items.size(), 2u);
  EXPECT_EQ(ds.items[1].image_path, (dir_ / "reg/2_dog/p.png").string());
  EXPECT_TRUE(any_warning(ds, "reg data: 2 of 3 images in " + (dir_ / "reg").string(), "not used"));

  EXPECT_NE(error_of([&] { add_reg_data(ds, (dir_ / "missing").string(), DatasetOptions{}); })
                .find((dir_ / "missing").string()),
            std::string::npos);
  fs::create_directories(dir_ / "empty");
  EXPECT_NE(error_of([&] { add_reg_data(ds, (dir_ / "empty").string(), DatasetOptions{}); })
                .find((dir_ / "empty").string()),
            std::string::npos);
}

TEST(RegMatch, PriorLossWeightScalesRegSamplesOnly) {
  EXPECT_EQ(with_prior_loss_weight({1.0f, 0.5f, 2.0f}, {false, true, true}, 0.25),
            (std::vector<float>{1.0f, 0.125f, 0.5f}));
  EXPECT_EQ(with_prior_loss_weight({0.7f}, {false}, 0.0), (std::vector<float>{0.7f}));
  EXPECT_NE(error_of([] { with_prior_loss_weight({1.0f}, {true, false}, 1.0); }).find("2 samples"), std::string::npos);
  EXPECT_NO_THROW(check_prior_loss_weight(0));
  EXPECT_NE(error_of([] { check_prior_loss_weight(-1); }).find("--prior-loss-weight -1"), std::string::npos);
  EXPECT_NE(error_of([] { check_prior_loss_weight(NAN); }).find("--prior-loss-weight"), std::string::npos);
}

TEST(RegMatch, PythonFloatText) {
  EXPECT_EQ(python_float(1.0), "1.0");
  EXPECT_EQ(python_float(0.5), "0.5");
  EXPECT_EQ(python_float(0.1), "0.1");
  EXPECT_EQ(python_float(100.0), "100.0");
  EXPECT_EQ(python_float(123.456), "123.456");
  EXPECT_EQ(python_float(1e-05), "1e-05");
  EXPECT_EQ(python_float(0.0001), "0.0001");
  EXPECT_EQ(python_float(1e16), "1e+16");
  EXPECT_EQ(python_float(0.0), "0.0");
  EXPECT_EQ(python_float(-2.5), "-2.5");
}

}  // namespace

// The training dataset (see dataset.h).
#include "train/dataset.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <system_error>

#include "core/error.h"
#include "io/image.h"
#include "models/controlnet.h"

namespace diffuse::train {

namespace fs = std::filesystem;

namespace {

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string trim(const std::string& s) {
  const char* ws = " \t\r\n\f\v";
  size_t a = s.find_first_not_of(ws);
  if (a == std::string::npos) return "";
  size_t b = s.find_last_not_of(ws);
  return s.substr(a, b - a + 1);
}

bool is_image_name(const fs::path& p) {
  static const char* exts[] = {".png", ".jpg", ".jpeg", ".webp", ".bmp"};
  std::string e = lower(p.extension().string());
  for (const char* x : exts)
    if (e == x) return true;
  return false;
}

bool hidden(const fs::path& p) {
  std::string n = p.filename().string();
  return !n.empty() && n[0] == '.';
}

// Split on ',' and trim; empty tags dropped.
std::vector<std::string> split_tags(const std::string& caption) {
  std::vector<std::string> tags;
  size_t start = 0;
  while (start <= caption.size()) {
    size_t end = caption.find(',', start);
    if (end == std::string::npos) end = caption.size();
    std::string t = trim(caption.substr(start, end - start));
    if (!t.empty()) tags.push_back(std::move(t));
    start = end + 1;
  }
  return tags;
}

// The entries of a folder, sorted by name; errors name the folder.
void list_folder(const fs::path& dir, std::vector<fs::path>& files, std::vector<fs::path>& folders) {
  std::error_code ec;
  fs::directory_iterator it(dir, ec), end;
  if (ec) throw FileError(cat(dir.string(), ": cannot list the folder: ", ec.message()));
  for (; it != end; it.increment(ec)) {
    if (ec) throw FileError(cat(dir.string(), ": cannot list the folder: ", ec.message()));
    const fs::path& p = it->path();
    if (hidden(p)) continue;
    std::error_code ec2;
    if (fs::is_directory(p, ec2))
      folders.push_back(p);
    else if (fs::is_regular_file(p, ec2) && is_image_name(p))
      files.push_back(p);
  }
  if (ec) throw FileError(cat(dir.string(), ": cannot list the folder: ", ec.message()));
  std::sort(files.begin(), files.end());
  std::sort(folders.begin(), folders.end());
}

// "<repeats>_<class words>" (or "<repeats>"): true with the parts when the first '_'-separated
// token is all digits.
bool parse_kohya_name(const std::string& name, int& repeats, std::string& class_words) {
  size_t us = name.find('_');
  std::string num = name.substr(0, us);
  if (num.empty() || num.size() > 9 || !std::all_of(num.begin(), num.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return false;
  repeats = std::stoi(num);
  class_words = us == std::string::npos ? "" : name.substr(us + 1);
  return true;
}

// The caption file's first line (trimmed, UTF-8 BOM dropped); false when no caption file exists.
bool read_caption(const fs::path& image, const std::vector<std::string>& exts, std::string& caption,
                  std::string& caption_path) {
  for (std::string e : exts) {
    if (e.empty()) continue;
    if (e[0] != '.') e = "." + e;
    fs::path cp = image;
    cp.replace_extension(e);
    std::error_code ec;
    if (!fs::is_regular_file(cp, ec)) continue;
    std::ifstream f(cp, std::ios::binary);
    if (!f) throw FileError(cat(cp.string(), ": cannot open the caption file"));
    std::string line;
    std::getline(f, line);
    if (line.size() >= 3 && line.compare(0, 3, "\xEF\xBB\xBF") == 0) line.erase(0, 3);
    caption = trim(line);
    caption_path = cp.string();
    return true;
  }
  return false;
}

struct Subset {
  fs::path dir;
  std::string name;  // folder name (tag_frequency key)
  int repeats = 1;
  std::string class_words;
  std::vector<fs::path> images;
};

}  // namespace

int64_t Dataset::epoch_length() const {
  int64_t n = 0;
  for (const auto& it : items) n += it.repeats;
  return n;
}

std::vector<std::pair<int, int>> bucket_resolutions(int resolution, int min_side, int max_side, int step) {
  DF_CHECK(resolution > 0 && step > 0 && min_side > 0 && max_side >= min_side,
           "bucket_resolutions: bad arguments (resolution ", resolution, ", sides ", min_side, "..", max_side,
           ", step ", step, ")");
  const int64_t area = int64_t(resolution) * resolution;
  std::vector<std::pair<int, int>> out;
  int sq = int(std::floor(std::sqrt(double(area)) / step)) * step;
  if (sq > 0) out.emplace_back(sq, sq);
  for (int w = min_side; w <= max_side; w += step) {
    int h = std::min<int64_t>(max_side, (area / w / step) * step);
    if (h >= min_side) {
      out.emplace_back(w, h);
      out.emplace_back(h, w);
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::pair<int, int> select_bucket(const std::vector<std::pair<int, int>>& buckets, int width, int height) {
  DF_CHECK(!buckets.empty() && width > 0 && height > 0, "select_bucket: no buckets or an empty image");
  const double ar = double(width) / height;
  size_t best = 0;
  double best_err = INFINITY;
  for (size_t i = 0; i < buckets.size(); ++i) {
    double err = std::fabs(double(buckets[i].first) / buckets[i].second - ar);
    if (err < best_err) best_err = err, best = i;
  }
  return buckets[best];
}

std::pair<int, int> cover_size(int width, int height, int target_w, int target_h) {
  DF_CHECK(width > 0 && height > 0 && target_w > 0 && target_h > 0, "cover_size: empty size");
  double scale = double(width) / height > double(target_w) / target_h ? double(target_h) / height
                                                                        : double(target_w) / width;
  int w = int(width * scale + 0.5), h = int(height * scale + 0.5);
  return {std::max(w, target_w), std::max(h, target_h)};
}

Dataset scan_dataset(const std::string& dir, const DatasetOptions& o) {
  DF_CHECK(o.resolution > 0 && o.resolution % 8 == 0, "--resolution ", o.resolution,
           " must be a positive multiple of 8");
  DF_CHECK(o.keep_tokens >= 0, "--keep-tokens ", o.keep_tokens, " must be 0 or more");
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw FileError(cat(dir, ": not a folder"));

  Dataset ds;
  std::vector<fs::path> top_files, top_folders;
  list_folder(dir, top_files, top_folders);

  // Subsets: the kohya subfolders when there are any, else DIR itself.
  std::vector<Subset> subsets;
  bool kohya = false;
  for (const auto& f : top_folders) {
    int r = 0;
    std::string cw;
    if (parse_kohya_name(f.filename().string(), r, cw)) kohya = true;
  }
  for (const auto& f : top_folders) {
    std::string name = f.filename().string();
    Subset s;
    if (!parse_kohya_name(name, s.repeats, s.class_words)) {
      ds.warnings.push_back(cat("folder ", f.string(), " skipped: its name is not <repeats>_<class words> (e.g. 10_sks dog)"));
      continue;
    }
    if (s.repeats < 1) {
      ds.warnings.push_back(cat("folder ", f.string(), " skipped: repeats ", s.repeats, " is below 1"));
      continue;
    }
    s.dir = f;
    s.name = name;
    std::vector<fs::path> sub_folders;
    list_folder(f, s.images, sub_folders);
    if (s.images.empty()) {
      ds.warnings.push_back(cat("folder ", f.string(), " has no images (subfolders are not searched)"));
      continue;
    }
    subsets.push_back(std::move(s));
  }
  if (kohya && !top_files.empty())
    ds.warnings.push_back(cat(top_files.size(), " images directly in ", dir,
                              " ignored: it has <repeats>_<class words> subfolders"));
  if (!kohya) {
    Subset s;
    s.dir = fs::path(dir);
    s.name = fs::path(dir).lexically_normal().filename().string();
    if (s.name.empty()) s.name = fs::path(dir).lexically_normal().parent_path().filename().string();
    s.images = top_files;
    subsets.push_back(std::move(s));
  }

  std::vector<std::pair<int, int>> buckets;
  if (o.buckets) {
    const int step = std::min(64, o.resolution);
    buckets = bucket_resolutions(o.resolution, std::min(256, o.resolution), std::max(1024, o.resolution), step);
  }

  int no_caption = 0, unreadable = 0;
  std::string first_no_caption;
  for (const Subset& s : subsets) {
    auto& freq = ds.tag_frequency[s.name];
    for (const fs::path& p : s.images) {
      DatasetItem it;
      it.image_path = p.string();
      it.repeats = s.repeats;
      it.is_reg = o.is_reg;
      try {
        Image im = read_image(it.image_path);
        it.orig_width = im.width;
        it.orig_height = im.height;
      } catch (const Error& e) {
        std::string ext = lower(p.extension().string());
        std::string why = (ext == ".webp" || ext == ".bmp") ? " (diffuse reads PNG and JPEG only)" : "";
        if (o.strict) throw FileError(cat(it.image_path, ": cannot read the image", why, ": ", e.what()));
        ds.warnings.push_back(cat("skipped ", it.image_path, ": cannot read", why, ": ", e.what()));
        ++unreadable;
        continue;
      }
      std::string cap_path;
      if (!read_caption(p, o.caption_extensions, it.caption, cap_path)) {
        it.caption = s.class_words;
        if (it.caption.empty()) {
          if (no_caption++ == 0) first_no_caption = it.image_path;
        }
      }
      for (const std::string& t : split_tags(it.caption)) ++freq[t];
      if (o.buckets) {
        auto b = select_bucket(buckets, it.orig_width, it.orig_height);
        it.width = b.first;
        it.height = b.second;
      } else {
        it.width = it.height = o.resolution;
      }
      auto cs = cover_size(it.orig_width, it.orig_height, it.width, it.height);
      it.crop_left = (cs.first - it.width) / 2;
      it.crop_top = (cs.second - it.height) / 2;
      ds.items.push_back(std::move(it));
    }
  }
  if (no_caption > 0) {
    std::string exts;
    for (const auto& e : o.caption_extensions) exts += (exts.empty() ? "" : "/") + e;
    ds.warnings.push_back(cat(no_caption, " image", no_caption == 1 ? " has" : "s have", " no caption file (",
                              exts, ") and no class words: trained with an empty caption (first: ",
                              first_no_caption, ")"));
  }
  if (ds.items.empty())
    fail(dir, ": no usable training images (.png/.jpg/.jpeg", unreadable ? "; every image found was unreadable" : "",
         kohya ? " in its <repeats>_<class words> subfolders" : "", ")");
  std::sort(ds.items.begin(), ds.items.end(),
            [](const DatasetItem& a, const DatasetItem& b) { return a.image_path < b.image_path; });
  return ds;
}

Tensor load_training_image(DatasetItem& item) {
  DF_CHECK(item.width > 0 && item.height > 0, item.image_path, ": training size ", item.width, "x", item.height,
           " is not set");
  Image im;
  try {
    im = to_rgb(read_image(item.image_path));
  } catch (const FileError&) {
    throw;
  } catch (const Error& e) {
    throw FileError(e.what());
  }
  item.orig_width = im.width;
  item.orig_height = im.height;
  auto cs = cover_size(im.width, im.height, item.width, item.height);
  if (cs.first != im.width || cs.second != im.height) im = resize_lanczos(im, cs.first, cs.second);
  item.crop_left = (cs.first - item.width) / 2;
  item.crop_top = (cs.second - item.height) / 2;
  Tensor t = Tensor::empty({1, item.height, item.width, 3});
  float* dst = t.f32();
  for (int y = 0; y < item.height; ++y) {
    const uint8_t* row = im.pixels.data() + (size_t(y + item.crop_top) * im.width + item.crop_left) * 3;
    float* out = dst + size_t(y) * item.width * 3;
    for (int i = 0; i < item.width * 3; ++i) out[i] = float(row[i]) / 127.5f - 1.0f;
  }
  return t;
}

std::string caption_for_step(const std::string& caption, const DatasetOptions& o, std::mt19937_64& rng) {
  if (!o.shuffle_captions) return caption;
  std::vector<std::string> tags = split_tags(caption);
  const size_t keep = std::min(tags.size(), size_t(std::max(0, o.keep_tokens)));
  // Fisher-Yates over tags[keep..): the draws come straight from mt19937_64, whose output the
  // standard fixes, so the order is the same everywhere (std::shuffle's is not).
  for (size_t n = tags.size() - keep; n > 1; --n) {
    size_t j = size_t(rng() % n);
    std::swap(tags[keep + n - 1], tags[keep + j]);
  }
  std::string out;
  for (size_t i = 0; i < tags.size(); ++i) out += (i ? ", " : "") + tags[i];
  return out;
}

}  // namespace diffuse::train

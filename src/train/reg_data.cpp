// Regularisation images (see reg_data.h).
#include "train/reg_data.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace diffuse::train {

namespace fs = std::filesystem;

int match_reg_repeats(std::vector<DatasetItem>& reg, int64_t train_count) {
  if (reg.empty() || train_count <= 0) {
    const int dropped = int(reg.size());
    reg.clear();
    return dropped;
  }
  // First pass: whole images with their own repeats, until the count reaches train_count.
  int64_t n = 0;
  size_t used = 0;
  while (used < reg.size() && n < train_count) n += reg[used++].repeats;
  const int dropped = int(reg.size() - used);
  reg.resize(used);
  // Later passes: one more repeat for each image in turn.
  for (size_t i = 0; n < train_count; i = (i + 1) % reg.size()) {
    ++reg[i].repeats;
    ++n;
  }
  return dropped;
}

int64_t samples_per_epoch(const Dataset& data, bool is_reg) {
  int64_t n = 0;
  for (const DatasetItem& it : data.items)
    if (it.is_reg == is_reg) n += it.repeats;
  return n;
}

namespace {

// Folder name -> (repeats, image count) of scanned items, as ss_*dataset_dirs record them.
std::map<std::string, RegFolderInfo> folder_infos(const std::vector<DatasetItem>& items) {
  std::map<std::string, RegFolderInfo> out;
  for (const DatasetItem& it : items) {
    RegFolderInfo& f = out[fs::path(it.image_path).parent_path().filename().string()];
    f.repeats = it.repeats;
    ++f.images;
  }
  return out;
}

}  // namespace

RegInfo add_reg_data(Dataset& data, const std::string& reg_dir, DatasetOptions options) {
  options.is_reg = true;
  Dataset reg = scan_dataset(reg_dir, options);
  RegInfo info;
  info.dir = reg_dir;
  info.num_reg_images = reg.epoch_length();
  info.folders = folder_infos(reg.items);
  for (const std::string& w : reg.warnings) data.warnings.push_back("reg data: " + w);
  for (const auto& [folder, tags] : reg.tag_frequency)
    for (const auto& [tag, n] : tags) data.tag_frequency[folder][tag] += n;

  const int64_t train = samples_per_epoch(data, false);
  info.unused = match_reg_repeats(reg.items, train);
  if (info.unused > 0)
    data.warnings.push_back(cat("reg data: ", info.unused, " of ", info.unused + int(reg.items.size()), " images in ",
                                reg_dir, " are not used: ", info.num_reg_images,
                                " reg samples per epoch are more than the ", train, " training samples"));
  for (DatasetItem& it : reg.items) {
    info.matched += it.repeats;
    data.items.push_back(std::move(it));
  }
  return info;
}

void check_prior_loss_weight(double w) {
  DF_CHECK(std::isfinite(w) && w >= 0, "--prior-loss-weight ", w, ": must be a finite number >= 0");
}

std::vector<float> with_prior_loss_weight(std::vector<float> w, const std::vector<bool>& is_reg,
                                          double prior_loss_weight) {
  DF_CHECK(w.size() == is_reg.size(), "with_prior_loss_weight: ", w.size(), " weights for ", is_reg.size(),
           " samples");
  for (size_t k = 0; k < w.size(); ++k)
    if (is_reg[k]) w[k] = float(double(w[k]) * prior_loss_weight);
  return w;
}

std::map<std::string, std::string> reg_metadata(const RegInfo& reg, double prior_loss_weight) {
  nlohmann::json dirs = nlohmann::json::object();
  for (const auto& [folder, f] : reg.folders) dirs[folder] = {{"n_repeats", f.repeats}, {"img_count", f.images}};
  return {{"ss_num_reg_images", std::to_string(reg.num_reg_images)},
          {"ss_reg_dataset_dirs", dirs.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)},
          {"ss_prior_loss_weight", python_float(prior_loss_weight)}};
}

std::string python_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char b[64];
  int p = 1;  // the fewest significant digits that read back exactly
  for (; p < 17; ++p) {
    std::snprintf(b, sizeof b, "%.*e", p - 1, v);
    if (std::strtod(b, nullptr) == v) break;
  }
  std::snprintf(b, sizeof b, "%.*e", p - 1, v);
  const int e = std::atoi(std::strchr(b, 'e') + 1);
  if (e < -4 || e >= 16) return b;  // Python's repr switches to exponent form there
  std::snprintf(b, sizeof b, "%.*f", std::max(p - 1 - e, 0), v);
  std::string s = b;
  if (s.find('.') == std::string::npos) s += ".0";
  return s;
}

}  // namespace diffuse::train

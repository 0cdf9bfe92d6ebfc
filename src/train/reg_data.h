// Regularisation ("prior preservation") images for LoRA training: kohya's --reg_data_dir.
//
// The reg folder follows the training data's folder convention (train/dataset.h) and its items
// are flagged is_reg. As kohya's DreamBoothDataset does, the reg images are then re-counted so
// that, with repeats, they match the training images with repeats: a first pass takes each reg
// image (in scan order) with its folder's repeats until the count reaches the training count
// (images after that point are unused, with a warning); while still short, further passes add one
// repeat to each image in turn. With folder repeats > 1 the first pass may overshoot the target
// by less than one image's repeats, as in kohya. The matched reg items join the training items,
// so an epoch includes them; a reg sample's per-sample loss weight is multiplied by
// --prior-loss-weight.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "train/dataset.h"

namespace diffuse::train {

struct RegFolderInfo {
  int repeats = 1;  // the folder's own repeats (before matching)
  int images = 0;
};

// What the run's metadata records about its reg data.
struct RegInfo {
  std::string dir;               // --reg-data as given ("" when none)
  int64_t num_reg_images = 0;    // Σ repeats × images as scanned (kohya's ss_num_reg_images)
  int64_t matched = 0;           // reg samples per epoch after matching
  int unused = 0;                // reg images left out by the matching
  std::map<std::string, RegFolderInfo> folders;  // folder name -> (repeats, images) (ss_reg_dataset_dirs)
};

// kohya's matching (see the top of this file) of `reg` (scan order) against `train_count`
// training samples per epoch: rewrites the items' repeats and drops the unused ones. Returns how
// many were dropped. An empty `reg` or train_count <= 0 leaves nothing.
int match_reg_repeats(std::vector<DatasetItem>& reg, int64_t train_count);

// Training samples per epoch (Σ repeats) of the items that are (is_reg) or are not reg images.
int64_t samples_per_epoch(const Dataset& data, bool is_reg);

// Scans `reg_dir` with `options` (is_reg set), matches it against `data`'s training samples and
// appends the matched items after the training items (the trainer's validation takes training
// items only), its tag frequencies (added into folders of the same name, as kohya)
// and its warnings (each prefixed "reg data: ") to `data`. Throws diffuse::Error naming reg_dir as
// scan_dataset does (not a folder, no usable images).
RegInfo add_reg_data(Dataset& data, const std::string& reg_dir, DatasetOptions options);

// --prior-loss-weight: finite and >= 0, else diffuse::Error naming the option.
void check_prior_loss_weight(double w);

// Per-sample loss weights with the prior loss weight on reg samples: w[k] × prior_loss_weight
// where is_reg[k]. The sizes must agree.
std::vector<float> with_prior_loss_weight(std::vector<float> w, const std::vector<bool>& is_reg,
                                          double prior_loss_weight);

// kohya's metadata for reg data, strings as kohya writes them: ss_num_reg_images (the scanned
// count, "0" without reg data), ss_reg_dataset_dirs (JSON {"folder": {"n_repeats": N,
// "img_count": M}}, "{}" without), ss_prior_loss_weight (Python's str() of a float: "1.0").
std::map<std::string, std::string> reg_metadata(const RegInfo& reg, double prior_loss_weight);

// Python's str() of a float: the shortest text that reads back as the same double, with ".0"
// when it would look like an integer ("1.0", "0.5", "1e-05", "inf", "nan").
std::string python_float(double v);

}  // namespace diffuse::train

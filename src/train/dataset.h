// The training dataset: kohya's "DreamBooth-style" folder convention (sd-scripts), captions,
// aspect-ratio buckets and the pixels of one training image.
//
// Folder layout (--train_data_dir DIR):
//  - subfolders named <repeats>_<class words> (e.g. "10_sks dog"): each is a subset whose images
//    are seen <repeats> times per epoch; <class words> (everything after the first '_') is the
//    caption of an image without a caption file. A subfolder without a numeric prefix, or with
//    repeats < 1, is skipped with a warning; subfolders are not searched recursively.
//  - no such subfolders: the images directly in DIR, repeats 1, no class words.
// Captions: a sidecar file with the image's name and a caption extension (the first existing of
// DatasetOptions::caption_extensions); its first line, trimmed.
// Buckets (kohya's --enable_bucket): see bucket_resolutions and DatasetOptions::buckets.
#pragma once
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace diffuse::train {

struct DatasetOptions {
  int resolution = 512;  // square side; a multiple of 8
  // Aspect-ratio buckets (kohya): area <= resolution², sides multiples of 64 (of the resolution
  // itself when it is below 64) in [min(256, resolution), max(1024, resolution)]; each image gets
  // the bucket with the nearest aspect ratio, is scaled to cover it and centre-cropped.
  bool buckets = false;
  // Caption sidecar extensions, first existing wins ("txt" is read as ".txt").
  std::vector<std::string> caption_extensions = {".txt", ".caption"};
  bool shuffle_captions = false;  // shuffle comma-separated tags at each use (caption_for_step)
  int keep_tokens = 0;            // the first keep_tokens tags stay in place
  bool strict = false;            // an unreadable image is an error (else skipped with a warning)
  bool is_reg = false;            // regularisation folder (prior loss weight applies)
};

struct DatasetItem {
  std::string image_path;
  std::string caption;  // the caption file's first line (trimmed), or the class words, or ""
  int repeats = 1;
  bool is_reg = false;
  int width = 0, height = 0;  // the training size (resolution × resolution, or its bucket)
  // For SDXL's time ids: the image's own size, and the crop offset in the resized (covering)
  // image's pixels (filled by scan_dataset and again by load_training_image).
  int orig_width = 0, orig_height = 0, crop_left = 0, crop_top = 0;
};

struct Dataset {
  std::vector<DatasetItem> items;     // sorted by image path
  std::vector<std::string> warnings;  // one line each (skipped images / folders, missing captions)
  // kohya's ss_tag_frequency: folder name -> tag -> count (captions split on ',', tags trimmed,
  // empty tags ignored; every occurrence in every image counted once, repeats not applied).
  std::map<std::string, std::map<std::string, int>> tag_frequency;
  int64_t epoch_length() const;  // Σ repeats over the items
};

// Scans `dir` (see the top of this file). Image extensions .png .jpg .jpeg .webp .bmp (any case);
// every image is decoded once (read_image) to learn its size: unreadable files (including WebP
// and BMP, which diffuse cannot decode) are skipped with a warning naming them, or with
// options.strict raise diffuse::FileError naming them. Throws diffuse::Error naming `dir` when it
// is not a folder or holds no usable image, and naming --resolution when that is not a positive
// multiple of 8.
Dataset scan_dataset(const std::string& dir, const DatasetOptions& options);

// The training pixels of one item: RGB (alpha dropped), resized with resize_lanczos so that it
// covers item.width × item.height keeping its aspect ratio (sides rounded to nearest), then
// centre-cropped; f32 [1, H, W, 3] NHWC with values x/127.5 − 1 in [−1, 1]. Refreshes the item's
// orig_width/orig_height and crop_left/crop_top. Throws diffuse::FileError for an unreadable file.
Tensor load_training_image(DatasetItem& item);

// The caption for one use. Without options.shuffle_captions: `caption` unchanged. With it: the
// tags (split on ',', trimmed, empty ones dropped) after the first keep_tokens are shuffled
// (Fisher-Yates driven by `rng`, so a seed gives the same order on every platform) and all are
// re-joined with ", ".
std::string caption_for_step(const std::string& caption, const DatasetOptions& options,
                             std::mt19937_64& rng);

// Bucket resolutions as kohya's make_bucket_resolutions: max_area = resolution²; the square side
// floor(√area / step)·step always; for width = min_side..max_side in `step` increments, height =
// min(max_side, floor(area / width / step)·step), and if height >= min_side both (w, h) and (h, w).
// Deduplicated, sorted by (width, height).
std::vector<std::pair<int, int>> bucket_resolutions(int resolution, int min_side, int max_side, int step = 64);

// The bucket (from `buckets`) whose aspect ratio w/h is nearest to width/height (the first such
// in the list on a tie).
std::pair<int, int> select_bucket(const std::vector<std::pair<int, int>>& buckets, int width, int height);

// The size an image of width × height is resized to so that it covers target_w × target_h with
// its aspect ratio kept (kohya: match the height when the image is relatively wider than the
// target, else the width; sides rounded to nearest, never below the target).
std::pair<int, int> cover_size(int width, int height, int target_w, int target_h);

}  // namespace diffuse::train

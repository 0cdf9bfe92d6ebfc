// `diffuse generate`: flag parsing and output files only; the run is the engine's (api/engine.h).
// txt2img, img2img (-i) and inpainting (-i --mask) to PNG (with A1111's `parameters` text chunk)
// or JPEG files, optionally the final latents as safetensors.
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "api/engine.h"
#include "api/inpaint_request.h"
#include "core/error.h"
#include "io/image.h"
#include "io/output_file.h"
#include "io/tensor_file.h"
#include "pipeline/preview.h"
#include "tools/commands.h"
#include "tools/image_output.h"
#include "tools/prompt_grid.h"

namespace diffuse::tools {
namespace {

namespace fs = std::filesystem;

struct GenOptions {
  std::string model, prompt, negative;
  std::string prompt_file;  // --prompt-file: one run per prompt (tools/prompt_grid.h)
  std::string grid;         // --grid: all images in one PNG
  int grid_cols = 0;        // --grid-cols (0: ceil(sqrt(n)))
  bool prompt_given = false, grid_cols_given = false;
  int width = 0, height = 0, steps = 20;
  double cfg = 7.0;
  std::string seed;  // -s: empty or negative = random; else 0 .. 2^64-1
  std::string sampler = "euler_a", schedule = "default";
  int batch = 1, clip_skip = 0, threads = 0;
  std::string rng = "cuda", precision = "auto", prediction;
  std::string weights = "native";  // --weights native|int8
  std::string init, mask;
  double strength = -1.0;  // < 0: not given
  // A1111's inpainting controls and outpainting (api/inpaint_request.h).
  std::string outpaint, masked_content;  // --outpaint L,R,T,B; --masked-content
  int mask_blur = -1, only_masked_padding = 32;
  bool invert_mask = false, only_masked = false;
  std::string out = "out.png", save_latent;
  bool quiet = false;
  bool width_given = false, height_given = false, strength_given = false;
  std::vector<std::string> loras;  // --lora PATH[:MULT], repeatable
  std::string lora_dir;            // --lora-model-dir: where <lora:NAME:MULT> prompt tags are looked up
  std::string unet;  // --unet: a UNet-only file instead of the checkpoint's UNet
  std::string vae;  // --vae: a standalone VAE instead of the checkpoint's
  std::string refiner;          // --refiner: an SDXL refiner continuing the latent
  double refiner_switch = 0.8;  // --refiner-switch
  std::string embeddings_dir;  // --embeddings-dir: textual inversions used by name in the prompts
  std::string subseed = "-1";     // --subseed: A1111's variation seed (-1: random)
  double subseed_strength = 0;    // --subseed-strength: 0 (off) to 1
  double hires_scale = 0, hires_denoise = 0.7;  // --hires-*: A1111's hires fix (pipeline/hires.h)
  int hires_width = 0, hires_height = 0, hires_steps = 0;
  std::string hires_upscaler = "latent", hires_upscaler_model;
  // ControlNet units: one --control-image per --control-net; strength/start/end: one value for
  // every unit or one per unit.
  std::vector<std::string> control_nets, control_images;
  std::vector<double> control_strengths, control_starts, control_ends;
  bool guess_mode = false;
  bool canny = false;
  bool vae_tiling = false, no_vae_tiling = false;  // neither: automatic (above 1024² pixels)
  int vae_tile_size = 0;                             // 0: VAETiling's default
  int canny_low = 100, canny_high = 200;
  int preview_every = 0;      // --preview-every N: write the live preview every N steps (0: never)
  std::string preview_file;   // --preview-file P (default: OUT's name with .preview.png)
  std::string taesd;          // --taesd DIR|FILE: full-size TAESD previews instead of the cheap ones
};

// "path/to/file.safetensors:0.8" -> (path, 0.8); "file.safetensors" -> (file, 1). Only a suffix
// that parses as a number is a multiplier, so paths containing ':' still work.
api::LoraSpec split_lora_flag(const std::string& v) {
  std::error_code ec;
  size_t colon = v.rfind(':');
  if (colon != std::string::npos && colon + 1 < v.size() && !fs::exists(v, ec)) {
    char* end = nullptr;
    std::string tail = v.substr(colon + 1);
    float m = std::strtof(tail.c_str(), &end);
    if (end && *end == '\0') {
      DF_CHECK(std::isfinite(m), "--lora ", v, ": multiplier ", tail, " cannot be represented as a 32-bit float");
      return {v.substr(0, colon), m};
    }
    // FILE:abc where FILE exists: a multiplier that is not a number, not a file name with a colon.
    DF_CHECK(!fs::is_regular_file(v.substr(0, colon), ec), "--lora ", v, ": multiplier '", tail, "' is not a number");
  }
  return {v, 1.0f};
}

// The ControlNet units of --control-net/--control-image/--control-strength/-start/-end (a per-unit
// value: one for every unit or one per --control-net), --guess-mode and --canny; images are read later.
std::vector<api::ControlUnitRequest> control_units(const GenOptions& o) {
  const size_t n = o.control_nets.size();
  DF_CHECK(o.control_images.size() == n, n ? "--control-net" : "--control-image", ": ", n, " --control-net and ",
           o.control_images.size(), " --control-image: give one --control-image IMG per --control-net PATH");
  DF_CHECK(n > 0 || (!o.canny && !o.guess_mode && o.control_strengths.empty() && o.control_starts.empty() &&
                     o.control_ends.empty()),
           o.canny ? "--canny" : o.guess_mode ? "--guess-mode" : "--control-strength/--control-start/--control-end",
           " needs --control-net and --control-image");
  auto per_unit = [&](const std::vector<double>& v, const char* flag, double def, size_t i) {
    DF_CHECK(v.size() <= 1 || v.size() == n, flag, ": ", v.size(), " values for ", n,
             " --control-net: give one for every unit or one per --control-net");
    return v.empty() ? def : v.size() == 1 ? v[0] : v[i];
  };
  std::vector<api::ControlUnitRequest> units(n);
  for (size_t i = 0; i < n; ++i) {
    api::ControlUnitRequest& u = units[i];
    u.net = o.control_nets[i];
    u.strength = per_unit(o.control_strengths, "--control-strength", 1.0, i);
    u.start = per_unit(o.control_starts, "--control-start", 0.0, i);
    u.end = per_unit(o.control_ends, "--control-end", 1.0, i);
    u.guess_mode = o.guess_mode;
    u.canny = o.canny;
    u.canny_low = o.canny_low;
    u.canny_high = o.canny_high;
  }
  return units;
}

// -s as typed: a decimal integer in [0, 2^64 - 1] (torch seeds are uint64); empty or negative
// (A1111's -1) means random.
std::optional<uint64_t> parse_seed(const std::string& v, const char* flag = "-s/--seed") {
  if (v.empty() || v[0] == '-') {
    if (v.empty()) return std::nullopt;
    char* end = nullptr;
    errno = 0;
    std::strtoll(v.c_str(), &end, 10);
    DF_CHECK(end && *end == '\0' && errno == 0, flag, " ", v, ": not an integer");
    return std::nullopt;
  }
  DF_CHECK(v.find_first_not_of("0123456789") == std::string::npos, flag, " ", v,
           ": not an integer (0 to 18446744073709551615, or -1 for random)");
  errno = 0;
  const unsigned long long s = std::strtoull(v.c_str(), nullptr, 10);
  DF_CHECK(errno != ERANGE, flag, " ", v, ": larger than 18446744073709551615 (2^64 - 1)");
  return uint64_t(s);
}

// out.png, out_1.png, out_2.png, ...
std::string batch_path(const std::string& out, int i) {
  if (i == 0) return out;
  fs::path p(out);
  fs::path name = p.stem().string() + "_" + std::to_string(i) + p.extension().string();
  return (p.parent_path() / name).string();
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// Whether two output paths name the same file (existing or not).
bool same_file(const std::string& a, const std::string& b) {
  std::error_code ec;
  return fs::exists(a, ec) && fs::exists(b, ec) ? fs::equivalent(a, b, ec)
                                                : fs::weakly_canonical(a, ec) == fs::weakly_canonical(b, ec);
}

// -o before the run (`images`: how many the run writes): a folder, an unwritable place, or (for a
// regular or new file) an extension other than .png/.jpg/.jpeg is an error now rather than after
// the work.
void check_output(const std::string& out, int images, const std::string& save_latent) {
  std::error_code ec;
  DF_CHECK(!out.empty(), "-o/--output: empty path");
  if (out == "-") {  // standard output: one PNG, for pipes
    DF_CHECK(images == 1, "-o -: standard output takes one image (this run makes ", images,
             "); give -b 1 and one prompt, or a file name");
    DF_CHECK(save_latent != "-", "--save-latent -: standard output already carries the image");
    return;
  }
  DF_CHECK(!fs::is_directory(out, ec), "-o/--output ", out, ": is a folder; give a file name such as ",
           (fs::path(out) / "out.png").string());
  for (int i = 0; i < images; ++i) {
    const std::string path = batch_path(out, i);
    check_image_output(path, ".png (with the A1111 parameters) or .jpg");
    DF_CHECK(save_latent.empty() || !same_file(path, save_latent), "--save-latent ", save_latent,
             ": is also an image output (-o ", path, "); give the latents their own file");
  }
}

// --grid before the run: a PNG file of its own (not standard output, not an image or latent output).
void check_grid_output(const GenOptions& o, int images) {
  DF_CHECK(!o.grid_cols_given || !o.grid.empty(), "--grid-cols ", o.grid_cols, ": give --grid PATH too");
  DF_CHECK(!o.grid_cols_given || o.grid_cols >= 1, "--grid-cols ", o.grid_cols, ": must be at least 1");
  if (o.grid.empty()) return;
  DF_CHECK(o.grid != "-", "--grid -: the grid needs a file name (standard output is for -o -)");
  std::error_code ec;
  DF_CHECK(!fs::is_directory(o.grid, ec), "--grid ", o.grid, ": is a folder; give a file name such as ",
           (fs::path(o.grid) / "grid.png").string());
  if (!is_special_output(o.grid)) {
    std::string ext = fs::path(o.grid).extension().string();
    for (char& c : ext) c = char(std::tolower(static_cast<unsigned char>(c)));
    DF_CHECK(ext == ".png", "--grid ", o.grid, ": the grid is written as PNG; give a .png name");
  }
  check_output_writable(o.grid, "--grid");
  for (int i = 0; o.out != "-" && i < images; ++i)
    DF_CHECK(!same_file(o.grid, batch_path(o.out, i)), "--grid ", o.grid, ": is also an image output (-o ",
             batch_path(o.out, i), "); give the grid its own file");
  DF_CHECK(o.save_latent.empty() || !same_file(o.grid, o.save_latent), "--grid ", o.grid,
           ": is also the --save-latent file; give the grid its own file");
}

// Progress on stderr: a \r-updated line on a terminal, plain lines otherwise.
class Progress {
 public:
  Progress(bool quiet) : quiet_(quiet), tty_(isatty(2) == 1) {}
  void operator()(Stage s, int done, int total) {
    if (quiet_) return;
    auto now = std::chrono::steady_clock::now();
    if (s == Stage::Encode) {
      if (done == 0) std::fprintf(stderr, "encoding the prompt\n");
      start_ = now;  // the denoising loop starts when encoding ends
      return;
    }
    if (s == Stage::Decode) {
      if (done < total) std::fprintf(stderr, "VAE decode %d/%d\n", done + 1, total);
      return;
    }
    if (done == 1) first_ = now;  // the first step includes one-time set-up; rates count from its end
    double el = std::chrono::duration<double>(now - first_).count();
    double tot = std::chrono::duration<double>(now - start_).count();
    char rate[48] = "";
    double per = done > 1 ? el / (done - 1) : tot;  // seconds per step
    if (per > 0) {
      if (per < 1.0) std::snprintf(rate, sizeof rate, "%.2f it/s", 1.0 / per);
      else std::snprintf(rate, sizeof rate, "%.2f s/it", per);
    }
    int eta = int(std::lround(per * (total - done)));
    char line[160];
    std::snprintf(line, sizeof line, "step %d/%d  %s  ETA %d:%02d", done, total, rate, eta / 60, eta % 60);
    if (tty_) {
      const int width = 30;
      int fill = total > 0 ? done * width / total : width;
      std::string bar = "[" + std::string(size_t(fill), '#') + std::string(size_t(width - fill), ' ') + "] ";
      std::fprintf(stderr, "\r%s%s\033[K%s", bar.c_str(), line, done == total ? "\n" : "");
    } else {
      std::fprintf(stderr, "%s\n", line);
    }
    std::fflush(stderr);
  }

 private:
  bool quiet_, tty_;
  std::chrono::steady_clock::time_point start_{}, first_{};
};

// --outpaint L,R,T,B: four pixel counts into the request.
void parse_outpaint(const std::string& v, api::Request& r) {
  int* sides[] = {&r.outpaint_left, &r.outpaint_right, &r.outpaint_top, &r.outpaint_bottom};
  size_t pos = 0;
  for (int i = 0; i < 4; ++i) {
    const size_t end = i < 3 ? v.find(',', pos) : v.size();
    const std::string part = end == std::string::npos ? "" : v.substr(pos, end - pos);
    char* stop = nullptr;
    errno = 0;
    const long n = part.empty() ? 0 : std::strtol(part.c_str(), &stop, 10);
    DF_CHECK(!part.empty() && *stop == 0 && errno == 0 && std::abs(n) <= kMaxImageSide, "--outpaint ", v,
             ": expected L,R,T,B, four pixel counts (e.g. 128,128,0,0)");
    *sides[i] = int(n);
    pos = end + 1;
  }
  DF_CHECK(r.outpaint_left >= 0 && r.outpaint_right >= 0 && r.outpaint_top >= 0 && r.outpaint_bottom >= 0,
           "--outpaint ", v, ": padding must be >= 0 pixels");
  DF_CHECK(r.outpaint(), "--outpaint ", v, ": give some padding (all four are 0)");
}

// Reads an image flag's file as RGB (masks keep their channels: the pipeline takes their grey).
Image read_flag_image(const std::string& path, bool rgb) {
  Image im = read_image(path);
  return rgb ? to_rgb(im) : im;
}

// The run's prompts: -p's, or --prompt-file's lines (not both).
std::vector<PromptLine> run_prompts(const GenOptions& o) {
  if (o.prompt_file.empty()) return {{o.prompt, 0}};
  DF_CHECK(!o.prompt_given, "--prompt-file ", o.prompt_file,
           " and -p/--prompt: give one (each line of the file is a prompt)");
  return read_prompt_file(o.prompt_file);
}

// Every setting of `r` with each prompt (a prompt file's problems name the file and line).
void validate_prompts(api::Request r, const std::vector<PromptLine>& prompts, const std::string& prompt_file,
                      api::Engine::ImagesGiven given) {
  if (prompt_file.empty()) return api::Engine::validate_settings(r, given);
  r.prompt.clear();
  api::Engine::validate_settings(r, given);  // the other settings' errors stand on their own
  for (const PromptLine& p : prompts) {
    r.prompt = p.text;
    try {
      api::Engine::validate_settings(r, given);
    } catch (const Error& e) {
      throw Error(cat("--prompt-file ", prompt_file, " line ", p.line, ": ", e.what()));
    }
  }
}

// --save-latent: every image's final latent, [N, 4, h, w].
void save_latents(const std::string& path, const std::vector<Tensor>& latents) {
  const Tensor& l0 = latents[0];
  Tensor all = Tensor::empty({int64_t(latents.size()), l0.dim(1), l0.dim(2), l0.dim(3)});
  for (size_t i = 0; i < latents.size(); ++i) {
    DF_CHECK(latents[i].bytes() == l0.bytes(), "--save-latent ", path, ": the images' latents differ in size");
    std::memcpy(all.f32() + int64_t(i) * l0.numel(), latents[i].f32(), l0.bytes());
  }
  save_safetensors(path, {{"latent", all}});
  std::printf("wrote %s (latent f32 %s, NCHW, before dividing by the VAE scaling factor)\n", path.c_str(),
              all.shape().str().c_str());
}

int run_generate(const GenOptions& o) {
  // Everything cheap is checked before the model loads.
  DF_CHECK(!(o.vae_tiling && o.no_vae_tiling), "--vae-tiling and --no-vae-tiling contradict each other: give one");
  const std::vector<PromptLine> prompts = run_prompts(o);
  const bool several = prompts.size() > 1;
  api::Request r;
  r.model = o.model;
  r.prompt = prompts[0].text;
  r.negative = o.negative;
  r.width = o.width_given ? o.width : 0;
  r.height = o.height_given ? o.height : 0;
  if (o.width_given) DF_CHECK(o.width > 0 && o.width % 8 == 0, "-W/--width ", o.width, ": must be a positive multiple of 8");
  if (o.height_given)
    DF_CHECK(o.height > 0 && o.height % 8 == 0, "-H/--height ", o.height, ": must be a positive multiple of 8");
  r.steps = o.steps;
  r.cfg = o.cfg;
  r.seed = parse_seed(o.seed);
  r.subseed = parse_seed(o.subseed, "--subseed");
  r.subseed_strength = o.subseed_strength;
  r.sampler = o.sampler;
  r.schedule = o.schedule;
  r.batch = o.batch;
  r.clip_skip = o.clip_skip;
  r.rng = o.rng;
  r.prediction = o.prediction;
  r.strength = o.strength_given ? o.strength : -1.0;
  if (!o.outpaint.empty()) parse_outpaint(o.outpaint, r);
  r.mask_blur = o.mask_blur;
  r.invert_mask = o.invert_mask;
  r.masked_content = o.masked_content;
  r.only_masked = o.only_masked;
  r.only_masked_padding = o.only_masked_padding;
  for (const std::string& v : o.loras) r.loras.push_back(split_lora_flag(v));
  r.vae = o.vae;
  r.unet = o.unet;
  r.refiner = o.refiner;
  r.refiner_switch = o.refiner_switch;
  r.embeddings_dir = o.embeddings_dir;
  r.hires_scale = o.hires_scale;
  r.hires_width = o.hires_width;
  r.hires_height = o.hires_height;
  r.hires_steps = o.hires_steps;
  r.hires_denoise = o.hires_denoise;
  r.hires_upscaler = o.hires_upscaler;
  r.hires_upscaler_model = o.hires_upscaler_model;
  r.controls = control_units(o);
  r.vae_tiling.mode = o.vae_tiling ? VAETiling::Mode::On : o.no_vae_tiling ? VAETiling::Mode::Off : VAETiling::Mode::Auto;
  if (o.vae_tile_size) r.vae_tiling.tile_px = o.vae_tile_size;
  validate_prompts(r, prompts, o.prompt_file, {!o.init.empty(), !o.mask.empty(), false});
  DF_CHECK(prompts.size() <= size_t(1000000 / o.batch), "--prompt-file ", o.prompt_file, ": ", prompts.size(),
           " prompts x ", o.batch, " images is more than a million images");
  const int images = int(prompts.size()) * o.batch;  // -b was checked: 1 or more
  check_output(o.out, images, o.save_latent);
  check_grid_output(o, images);
  DF_CHECK(o.preview_file.empty() || o.preview_every > 0, "--preview-file ", o.preview_file,
           ": give --preview-every N too (steps between previews)");
  std::string preview = o.preview_file;
  if (o.preview_every > 0) {
    if (preview.empty()) {
      const fs::path out = o.out == "-" ? fs::path("out.png") : fs::path(o.out);
      preview = (out.parent_path() / out.stem()).string() + ".preview.png";
    }
    check_output_writable(preview, "--preview-file");
  }
  DF_CHECK(o.taesd.empty() || o.preview_every > 0, "--taesd ", o.taesd,
           ": give --preview-every N too (TAESD decodes the live previews)");
  if (!o.save_latent.empty()) check_output_writable(o.save_latent, "--save-latent");
  DF_CHECK(!o.strength_given || (std::isfinite(o.strength) && o.strength >= 0 && o.strength <= 1), "--strength ",
           o.strength, ": must be in [0, 1]");
  if (!o.init.empty()) check_input_file(o.init, "-i/--init");
  if (!o.mask.empty()) check_input_file(o.mask, "--mask");
  for (const std::string& c : o.control_images) check_input_file(c, "--control-image");

  if (!o.init.empty()) {
    r.init = read_flag_image(o.init, true);
  }
  if (!o.init.empty() && api::inpaint_resizes(r)) {
    api::check_inpaint_images(r);  // cropped (only masked) or padded (outpainting): any size
  } else if (!o.init.empty()) {
    if (!o.width_given) DF_CHECK(r.init.width % 8 == 0 && r.init.height % 8 == 0, "-i/--init ", o.init, " is ",
                                 r.init.width, "x", r.init.height, ": width and height must be multiples of 8");
    const int w = o.width_given ? o.width : r.init.width, h = o.height_given ? o.height : r.init.height;
    DF_CHECK(r.init.width == w && r.init.height == h, "-i/--init ", o.init, " is ", r.init.width, "x", r.init.height,
             " but the output size is ", w, "x", h,
             ": images are not resized; give an image of the output size (or leave -W/-H out)");
  }
  if (!o.mask.empty()) {
    r.mask = read_flag_image(o.mask, false);
    DF_CHECK(r.mask.width == r.init.width && r.mask.height == r.init.height, "--mask ", o.mask, " is ", r.mask.width,
             "x", r.mask.height, " but the init image is ", r.init.width, "x", r.init.height,
             ": they must be the same size");
  }
  for (size_t i = 0; i < o.control_images.size(); ++i) r.controls[i].image = read_flag_image(o.control_images[i], true);

  api::EngineOptions eo;
  eo.threads = o.threads;
  eo.precision = o.precision;
  eo.weights = o.weights;
  eo.lora_dir = o.lora_dir;
  eo.one_shot = !several;  // several prompts: the model stays loaded between them
  api::Engine engine(eo);
  Progress progress(o.quiet);
  api::Callbacks cb;
  cb.log = [&](const std::string& line, bool warning) {
    if (!o.quiet || warning) std::fprintf(stderr, "%s\n", line.c_str());
  };
  cb.progress = [&](Stage s, int done, int total) {
    progress(s, done, total);
    return true;
  };
  // Each image is written as soon as it is decoded: a later failure in the batch loses nothing.
  // Prompt k's images follow the earlier prompts' (out_<k * batch + i>.png).
  int first_index = 0;
  cb.on_image = [&](const api::GeneratedImage& g, int i) {
    const std::string path = batch_path(o.out, first_index + i);
    write_image_output(path, g.image);
    // With -o - standard output is the PNG: the note goes to stderr.
    std::fprintf(path == "-" ? stderr : stdout, "wrote %s (seed %llu)\n", path == "-" ? "standard output" : path.c_str(),
                 static_cast<unsigned long long>(g.seed));
    std::fflush(stdout);
  };
  if (o.preview_every > 0) {
    // The cheap latent → RGB approximation the server's progress shows (pipeline/preview.h), of
    // the batch's first image, at 1/8 of the output size.
    const Family family = engine.family_of(r.model);
    // --taesd: the tiny autoencoder's full-size decode instead (pipeline/preview.h, models/taesd.h).
    std::shared_ptr<TaesdPreviewer> taesd;
    if (!o.taesd.empty()) {
      try {
        taesd = make_taesd_previewer(o.taesd, family, o.precision);
      } catch (const Error& e) {
        throw FileError(cat("--taesd: ", e.what()));
      }
      const std::string warn = taesd_family_warning(taesd->taesd.origin(), family);
      if (!warn.empty()) cb.log("--taesd " + warn, true);
    }
    cb.on_latent = [preview, family, taesd, &o](const Tensor& latent, int step, int steps) {
      if (step % o.preview_every == 0 || step == steps)
        write_png(preview, taesd ? (*taesd)(latent, 0) : latent_preview(latent, 0, family));
    };
  }
  // Several prompts: prompt k's images take the seeds after the earlier prompts' (seed + k × batch,
  // as one long batch, and A1111's "iterate seed every line"); likewise a variation seed.
  if (several && !r.seed) r.seed = api::random_seed();
  if (several && r.subseed_strength > 0 && !r.subseed) r.subseed = api::random_seed();
  const std::optional<uint64_t> seed0 = r.seed, subseed0 = r.subseed;
  std::vector<Tensor> latents;
  std::vector<Image> grid;
  double generate_s = 0;
  uint64_t run_seed = 0;
  for (size_t k = 0; k < prompts.size(); ++k) {
    const uint64_t offset = uint64_t(k) * uint64_t(o.batch);
    r.prompt = prompts[k].text;
    if (seed0) r.seed = *seed0 + offset;
    if (subseed0) r.subseed = *subseed0 + offset;
    first_index = int(offset);
    if (several && !o.quiet)
      std::fprintf(stderr, "prompt %zu/%zu (line %d): %s\n", k + 1, prompts.size(), prompts[k].line,
                   prompts[k].text.c_str());
    api::RunResult res = engine.generate(r, cb);
    generate_s += res.generate_s;
    if (k == 0) run_seed = res.seed;
    for (api::GeneratedImage& g : res.images) {
      if (!o.save_latent.empty()) latents.push_back(std::move(g.latent));
      if (!o.grid.empty()) grid.push_back(std::move(g.image));
    }
  }

  if (!o.save_latent.empty()) save_latents(o.save_latent, latents);
  if (!o.grid.empty()) {
    const Image g = image_grid(grid, o.grid_cols);
    write_png(o.grid, g);
    std::fprintf(o.out == "-" ? stderr : stdout, "wrote %s (grid of %zu images, %dx%d)\n", o.grid.c_str(), grid.size(),
                 g.width, g.height);
    std::fflush(stdout);
  }
  if (!o.quiet)
    std::fprintf(stderr, "done in %.1f s (seed %llu)\n", generate_s, static_cast<unsigned long long>(run_seed));
  return 0;
}

}  // namespace

Run add_generate_command(CLI::App& app) {
  auto o = std::make_shared<GenOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate images: txt2img, img2img (-i), inpainting (-i --mask)");
  cmd->option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  cmd->add_option("-m,--model", o->model, "model: .safetensors, .ckpt or a diffusers folder");
  auto* popt = cmd->add_option("-p,--prompt", o->prompt, "prompt (A1111 weighting: (word:1.3), [word], BREAK)");
  cmd->add_option("--prompt-file", o->prompt_file,
                  "one prompt per line (blank lines and lines starting with # skipped) instead of -p: an image (or "
                  "-b images) per prompt, same settings, prompt k from seed + k x batch; out.png, out_1.png, ...");
  cmd->add_option("--grid", o->grid, "also write all the run's images (every prompt and batch image) as one PNG grid");
  auto* gopt = cmd->add_option("--grid-cols", o->grid_cols, "columns of the --grid (default: ceil(sqrt(images)))");
  cmd->add_option("-n,--negative", o->negative, "negative prompt");
  auto* wopt = cmd->add_option("-W,--width", o->width,
                               "width in pixels, a multiple of 8 (default: the model's native size: its "
                               "modelspec.resolution metadata, else the family's)");
  auto* hopt = cmd->add_option("-H,--height", o->height, "height in pixels, a multiple of 8");
  cmd->add_option("--steps", o->steps, "sampling steps (default 20)");
  cmd->add_option("--cfg-scale", o->cfg, "classifier-free guidance scale (default 7; 1: no guidance)");
  cmd->add_option("-s,--seed", o->seed, "seed, 0 to 2^64-1 (default or -1: random, printed)");
  cmd->add_option("--sampler", o->sampler, "sampler (default euler_a): " + join(sampler_names()));
  cmd->add_option("--scheduler", o->schedule, "schedule: default, karras, trailing");
  cmd->add_option("-b,--batch", o->batch, "images per run (default 1)");
  cmd->add_option("--clip-skip", o->clip_skip, "A1111 clip skip (2: penultimate text encoder layer)");
  cmd->add_option("--rng", o->rng, "cpu (diffusers' torch CPU generator) or cuda (A1111's default, seed + i per image)");
  cmd->add_option("--precision", o->precision, "fp32, bf16 or auto (bf16 where the CPU has fast bf16)");
  cmd->add_option("--weights", o->weights, "native (the compute type) or int8 (per-channel, dequantised per layer)");
  cmd->add_option("-t,--threads", o->threads, "threads (default: physical cores)")->check(CLI::Range(0, 1024));
  cmd->add_option("-i,--init", o->init, "init image for img2img/inpainting (PNG/JPEG, the output size)");
  auto* sopt = cmd->add_option("--strength", o->strength, "img2img strength in [0, 1] (default 0.75; 1 for inpainting models)");
  cmd->add_option("--mask", o->mask, "inpainting mask, white = repaint (the init image's size)");
  cmd->add_option("--mask-blur", o->mask_blur,
                  "Gaussian blur of the mask in pixels, 0-64 (A1111's mask blur; default 0, 4 with --outpaint); "
                  "the result is composited over the init image through the blurred mask");
  cmd->add_flag("--invert-mask", o->invert_mask, "repaint what the mask leaves black (A1111's \"inpaint not masked\")");
  cmd->add_option("--masked-content", o->masked_content,
                  "what the masked area starts from: original (default), fill (colours of the surroundings, "
                  "default with --outpaint), latent-noise, latent-nothing");
  cmd->add_flag("--inpaint-only-masked", o->only_masked,
                "inpaint only the mask's box (grown by --only-masked-padding, then to the output's aspect) at the "
                "output size (-W/-H, default the init's), pasted back into the init image at its own size");
  cmd->add_option("--only-masked-padding", o->only_masked_padding,
                  "pixels around the mask's box for --inpaint-only-masked, 0-256 (default 32)");
  cmd->add_option("--outpaint", o->outpaint,
                  "outpainting with -i: L,R,T,B pixels added on each side (the output is the init's size plus "
                  "these; -W/-H do not apply); the padding is inpainted through a feathered mask");
  cmd->add_option("--prediction", o->prediction, "eps or v (default: from the model)");
  cmd->add_option("-o,--output", o->out, "output .png or .jpg (batches: out.png, out_1.png, ...; - : PNG to standard output)");
  cmd->add_option("--save-latent", o->save_latent, "also save the final latents (safetensors, 'latent' [B,4,h,w])");
  cmd->add_option("--lora", o->loras, "LoRA file[:multiplier], repeatable (kohya/A1111 or diffusers/PEFT)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--lora-model-dir", o->lora_dir, "folder where prompt tags <lora:NAME:MULT> find NAME.safetensors");
  cmd->add_option("--subseed", o->subseed, "variation seed (A1111's): blend each image's noise towards this seed's "
                  "(image i: SUBSEED + i); -1: random")
      ->capture_default_str();
  cmd->add_option("--subseed-strength", o->subseed_strength, "how far towards the variation seed, 0 (off) to 1")
      ->capture_default_str();
  cmd->add_option("--hires-scale", o->hires_scale,
                  "hires fix (A1111's two passes): generate, upscale by S (1 to 8), then img2img at the larger size");
  cmd->add_option("--hires-width", o->hires_width, "hires fix to this width instead of a scale (0: from the height's ratio)");
  cmd->add_option("--hires-height", o->hires_height, "hires fix to this height instead of a scale (0: from the width's ratio)");
  cmd->add_option("--hires-steps", o->hires_steps, "steps of the hires pass (0: the same as --steps)");
  cmd->add_option("--hires-denoise", o->hires_denoise, "denoising strength of the hires pass, (0, 1]")->capture_default_str();
  cmd->add_option("--hires-upscaler", o->hires_upscaler,
                  "latent | latent-antialiased | latent-bicubic | latent-nearest | latent-nearest-exact (A1111's Latent "
                  "modes) | lanczos | nearest | esrgan (with --hires-upscaler-model)")
      ->capture_default_str();
  cmd->add_option("--hires-upscaler-model", o->hires_upscaler_model,
                  "ESRGAN / Real-ESRGAN model for --hires-upscaler esrgan (e.g. RealESRGAN_x4plus.pth)");
  cmd->add_option("--embeddings-dir", o->embeddings_dir,
                  "textual-inversion embeddings (.pt, .safetensors, .bin) used by file name in the prompts, as A1111 "
                  "(also embedding:NAME); default: an 'embeddings' folder beside the model, else the model's folder");
  cmd->add_option("--unet", o->unet,
                  "UNet-only file (ComfyUI's unet / diffusion_models files: bare ldm names, model.diffusion_model.*, "
                  "or diffusers names) instead of the checkpoint's UNet; the checkpoint gives the text encoders and VAE");
  cmd->add_option("--vae", o->vae, "standalone VAE file (ldm, first_stage_model. or diffusers names) instead of the "
                  "checkpoint's (default: MODEL.vae.safetensors beside the model, if any)");
  cmd->add_option("--refiner", o->refiner,
                  "SDXL refiner checkpoint (e.g. sd_xl_refiner_1.0.safetensors): from --refiner-switch of the schedule "
                  "it continues the base model's latent with its own text encoder, as A1111's Refiner");
  cmd->add_option("--refiner-switch", o->refiner_switch,
                  "share of the schedule (by timestep, A1111's 'Switch at') after which the refiner takes over "
                  "(default 0.8; 1: never)");
  cmd->add_option("--control-net", o->control_nets,
                  "ControlNet: diffusers folder or single .safetensors/.pth file; repeatable (several units, their "
                  "residuals summed), each with its --control-image")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--control-image", o->control_images,
                  "ControlNet hint image (resized to the output size), one per --control-net, in order")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--control-strength", o->control_strengths,
                  "ControlNet conditioning scale (default 1): one for every unit or one per --control-net")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--control-start", o->control_starts,
                  "share of the steps after which a unit starts (A1111's Guidance Start, default 0; active while "
                  "start <= step/steps <= end): one for every unit or one per --control-net")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--control-end", o->control_ends,
                  "share of the steps after which a unit stops (A1111's Guidance End, default 1): one for every "
                  "unit or one per --control-net")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_flag("--guess-mode", o->guess_mode,
                "ControlNet guess mode (diffusers'): only the conditional pass gets control, residuals scaled from "
                "0.1 (first skip) to 1 (mid block)");
  cmd->add_flag("--canny", o->canny, "turn the control images into Canny edge maps first");
  cmd->add_option("--canny-low", o->canny_low, "Canny low threshold (default 100, OpenCV scale)");
  cmd->add_option("--canny-high", o->canny_high, "Canny high threshold (default 200)");
  cmd->add_flag("--vae-tiling", o->vae_tiling, "decode/encode the VAE in overlapping tiles (default: above 1024x1024 pixels)");
  cmd->add_flag("--no-vae-tiling", o->no_vae_tiling, "never tile the VAE");
  cmd->add_option("--vae-tile-size", o->vae_tile_size, "largest VAE tile side in pixels (default 640, multiple of 8, >= 256)");
  cmd->add_flag("-q,--quiet", o->quiet, "no progress output");
  cmd->add_option("--preview-every", o->preview_every,
                  "write a live preview every N steps (the latent's cheap RGB approximation at 1/8 size, or "
                  "with --taesd the tiny autoencoder's full-size decode)")
      ->check(CLI::Range(0, 100000));
  cmd->add_option("--preview-file", o->preview_file, "where the preview goes (default: OUT.preview.png)");
  cmd->add_option("--taesd", o->taesd,
                  "TAESD decoder for full-size previews: a file (taesd_decoder.* / taesdxl_decoder.*, .pth or "
                  ".safetensors, or diffusers AutoencoderTiny) or a folder holding the model family's one");
  return [o, wopt, hopt, sopt, popt, gopt] {
    o->prompt_given = popt->count() > 0;
    o->grid_cols_given = gopt->count() > 0;
    o->width_given = wopt->count() > 0;
    o->height_given = hopt->count() > 0;
    o->strength_given = sopt->count() > 0;
    return run_generate(*o);
  };
}

}  // namespace diffuse::tools

// `diffuse upscale`: an image through an ESRGAN / Real-ESRGAN model (pipeline/upscale.h), tiled,
// to PNG or JPEG by the output's extension.
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "core/memory_stats.h"
#include "core/threads.h"
#include "io/image.h"
#include "io/output_file.h"
#include "pipeline/upscale.h"
#include "tools/commands.h"
#include "tools/image_output.h"

namespace diffuse::tools {
namespace {

namespace fs = std::filesystem;

struct UpscaleFlags {
  std::string model, input, out;
  double scale = 0;  // when scale_given; else the model's own
  bool scale_given = false;
  int tile = UpscaleOptions{}.tile, overlap = UpscaleOptions{}.overlap, threads = 0;
  std::string precision = "auto";
  bool quiet = false;
};

// -o before the work: a folder, an unwritable place or an unknown extension fails now.
void check_output(const std::string& out) {
  DF_CHECK(!out.empty(), "-o/--output: empty path");
  if (out == "-") return;  // standard output: PNG
  std::error_code ec;
  DF_CHECK(!fs::is_directory(out, ec), "-o/--output ", out, ": is a folder; give a file name such as ",
           (fs::path(out) / "out.png").string());
  check_image_output(out, ".png or .jpg");
}

// A1111's extras tag ("Postprocess upscale by: 4, Postprocess upscaler: NAME") after any earlier one.
void tag_output(Image& im, double by, const std::string& model) {
  char num[32];
  std::snprintf(num, sizeof num, "%g", by);
  const std::string tag = std::string("Postprocess upscale by: ") + num + ", Postprocess upscaler: " +
                          fs::path(model).stem().string();
  for (auto& [k, v] : im.text)
    if (k == "postprocessing") {
      v += "\n" + tag;
      return;
    }
  im.text.emplace_back("postprocessing", tag);
}

int run_upscale(const UpscaleFlags& f) {
  DF_CHECK(!f.model.empty(), "-m/--model: give an ESRGAN / Real-ESRGAN model (.pth or .safetensors)");
  DF_CHECK(!f.input.empty(), "-i/--input: give the image to upscale (PNG or JPEG)");
  DF_CHECK(f.precision == "fp32" || f.precision == "bf16" || f.precision == "auto", "--precision ", f.precision,
           ": unknown; allowed: fp32, bf16, auto");
  DF_CHECK(!f.scale_given || (std::isfinite(f.scale) && f.scale > 0 && f.scale <= 16), "--scale ", f.scale,
           ": must be in (0, 16] (default: the model's own factor)");
  DF_CHECK(f.tile >= 0, "--tile ", f.tile, ": must be >= 0 (0: the whole image in one pass)");
  DF_CHECK(f.overlap >= 0, "--tile-overlap ", f.overlap, ": must be >= 0");
  check_input_file(f.model, "-m/--model");
  check_input_file(f.input, "-i/--input");
  check_output(f.out);
  set_num_threads(f.threads);

  const Image in = read_image(f.input);
  const Precision prec =
      f.precision == "bf16" || (f.precision == "auto" && cpu_features().bf16_fast()) ? Precision::BF16 : Precision::F32;
  std::unique_ptr<Backend> be = make_cpu_backend(prec);
  const auto t0 = std::chrono::steady_clock::now();
  const RRDBNet net = load_rrdbnet(f.model, *be);
  const RRDBNetConfig& k = net.config();
  const int s = k.scale();
  const double by = f.scale_given ? f.scale : double(s);
  const int64_t tw = std::llround(in.width * by), th = std::llround(in.height * by);
  DF_CHECK(tw >= 1 && th >= 1 && tw <= kMaxImageSide && th <= kMaxImageSide, "--scale ", by, ": ", in.width, "x",
           in.height, " would become ", tw, "x", th, "; sides must be 1 to ", kMaxImageSide, " pixels");
  if (!f.quiet)
    std::fprintf(stderr, "upscaler %s: %s layout, x%d, %d blocks of %d features (grow %d)%s; %s on cpu, %d threads\n",
                 f.model.c_str(), rrdb_layout_name(net.layout()), s, k.num_block, k.num_feat, k.num_grow_ch,
                 k.unshuffle > 1 ? (", pixel-unshuffle " + std::to_string(k.unshuffle)).c_str() : "",
                 precision_name(be->effective_precision()), num_threads());

  UpscaleOptions o;
  o.tile = f.tile;
  o.overlap = f.overlap;
  const bool tty = isatty(2) == 1;
  if (!f.quiet)
    o.progress = [tty](int done, int total, int pass) {
      if (tty) std::fprintf(stderr, "\rpass %d: tile %d/%d\033[K%s", pass + 1, done, total, done == total ? "\n" : "");
      else std::fprintf(stderr, "pass %d: tile %d/%d\n", pass + 1, done, total);
      std::fflush(stderr);
    };
  Image out = upscale_image_to(net, *be, in, int(tw), int(th), o);
  tag_output(out, by, f.model);
  write_image_output(f.out, out);
  if (!f.quiet) {
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "%dx%d -> %dx%d in %.1f s, peak RSS %.0f MiB -> %s\n", in.width, in.height, out.width,
                 out.height, secs, double(peak_rss_bytes()) / (1 << 20), f.out.c_str());
  }
  return 0;
}

}  // namespace

Run add_upscale_command(CLI::App& app) {
  auto f = std::make_shared<UpscaleFlags>();
  CLI::App* cmd = app.add_subcommand("upscale", "Upscale an image with an ESRGAN / Real-ESRGAN model (RRDBNet)");
  cmd->option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  cmd->add_option("-m,--model", f->model,
                  "upscaler: RRDBNet .pth or .safetensors (Real-ESRGAN / BasicSR params_ema, ESRGAN, old ESRGAN names)")
      ->required();
  cmd->add_option("-i,--input", f->input, "image to upscale (PNG or JPEG)")->required();
  cmd->add_option("-o,--output", f->out, "output .png or .jpg (- : PNG to standard output)")->required();
  CLI::Option* scale = cmd->add_option("--scale", f->scale,
                  "output size as a factor of the input (default: the model's, e.g. 4): more model passes while "
                  "smaller, then Lanczos to the exact size");
  cmd->add_option("--tile", f->tile, "largest tile side in input pixels (default 192; 0: no tiling)");
  cmd->add_option("--tile-overlap", f->overlap, "context around each tile in input pixels (default 16)");
  cmd->add_option("-t,--threads", f->threads, "threads (default: physical cores)")->check(CLI::Range(0, 1024));
  cmd->add_option("--precision", f->precision, "fp32, bf16 or auto (bf16 where the CPU has fast bf16)");
  cmd->add_flag("-q,--quiet", f->quiet, "no progress output");
  return [f, scale] {
    f->scale_given = scale->count() > 0;
    return run_upscale(*f);
  };
}

}  // namespace diffuse::tools

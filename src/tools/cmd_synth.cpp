// `diffuse synth`: write a random-weight checkpoint with a real model's tensor layout (from the
// layout manifests), for benchmarks and binding checks on machines without real weights.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "models/synthetic.h"
#include "tools/commands.h"

namespace diffuse::tools {

// Where "sd15"/"sd21"/"sdxl" are looked for: $DIFFUSE_MANIFEST_DIR, then the source tree this
// binary was built from (tests/data/manifests, and the shared reference folder beside it).
std::vector<std::string> manifest_dirs() {
  std::vector<std::string> dirs;
  if (const char* env = std::getenv("DIFFUSE_MANIFEST_DIR")) dirs.push_back(env);
  std::string src = __FILE__;  // <root>/src/tools/cmd_synth.cpp
  const std::string tail = "src/tools/cmd_synth.cpp";
  if (src.size() > tail.size() && src.compare(src.size() - tail.size(), tail.size(), tail) == 0 && src[0] == '/') {
    std::string root = src.substr(0, src.size() - tail.size());
    dirs.push_back(root + "tests/data/manifests");
    dirs.push_back(root + "../shared/manifests");
  }
#ifdef DIFFUSE_SHARED_DIR
  dirs.push_back(std::string(DIFFUSE_SHARED_DIR) + "/manifests");
#endif
  return dirs;
}

namespace {

struct SynthOptions {
  std::string manifest;
  std::string layout;
  std::string out;
  std::string dtype = "f16";
  uint64_t seed = 0;
  bool quiet = false;
};

DType parse_dtype(const std::string& s) {
  if (s == "f16" || s == "fp16") return DType::F16;
  if (s == "bf16") return DType::BF16;
  if (s == "f32" || s == "fp32") return DType::F32;
  fail("--dtype '", s, "' is not f16, bf16 or f32");
}

int run_synth(const SynthOptions& o) {
  const DType dtype = parse_dtype(o.dtype);
  const std::string tsv = find_manifest(o.manifest, manifest_dirs());
  const std::vector<ManifestRow> rows = read_manifest(tsv);
  const std::string config = manifest_config_path(tsv);
  if (!o.quiet)
    std::fprintf(stderr, "synth: %s (%s layout, %s, seed %llu) -> %s\n", tsv.c_str(), o.layout.c_str(),
                 dtype_name(dtype), static_cast<unsigned long long>(o.seed), o.out.c_str());
  auto t0 = std::chrono::steady_clock::now();
  SynthStats s = write_synthetic_checkpoint(rows, o.layout, o.out, dtype, o.seed, config, !o.quiet);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("wrote %s: %lld tensors, %.3f B parameters, %.2f GB of %s data (%s layout, seed %llu) in %.1f s\n",
              o.out.c_str(), static_cast<long long>(s.tensors), double(s.parameters) / 1e9, double(s.bytes) / 1e9,
              dtype_name(dtype), o.layout.c_str(), static_cast<unsigned long long>(o.seed), secs);
  return 0;
}

}  // namespace

Run add_synth_command(CLI::App& app) {
  auto o = std::make_shared<SynthOptions>();
  CLI::App* cmd = app.add_subcommand(
      "synth", "Write a random-weight checkpoint with a real model's layout (for benchmarks; not a trained model)");
  cmd->add_option("--manifest", o->manifest, "sd15, sd21, sdxl, or a layout manifest PATH.tsv")->required();
  cmd->add_option("--layout", o->layout, "ldm (one .safetensors file) or diffusers (a folder)")
      ->required()
      ->check(CLI::IsMember({"ldm", "diffusers"}));
  cmd->add_option("-o,--output", o->out, "output file (ldm) or folder (diffusers)")->required();
  cmd->add_option("--dtype", o->dtype, "f16 (default), bf16 or f32")->check(CLI::IsMember({"f16", "bf16", "f32"}));
  cmd->add_option("--seed", o->seed, "random seed (default 0)");
  cmd->add_flag("-q,--quiet", o->quiet, "no progress on stderr");
  return [o] { return run_synth(*o); };
}

}  // namespace diffuse::tools

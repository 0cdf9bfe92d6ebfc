// `diffuse synth`: write a random-weight checkpoint with a real model's tensor layout (from the
// layout manifests), for benchmarks and binding checks on machines without real weights.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "models/sd_arch.h"
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
  std::string arch;  // --arch: an SD 1.x architecture (JSON file, or "demo") instead of a manifest
  std::string from;  // --from: a trained checkpoint whose matching tensors the --arch file takes
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

// The architecture --arch names: "demo" (SdArch's defaults: the demo model's) or a JSON file.
SdArch read_arch(const std::string& a) {
  if (a == "demo") return SdArch{};
  std::ifstream f(a, std::ios::binary);
  DF_CHECK(f, a, ": cannot read the architecture file (give \"demo\" or a JSON file)");
  std::stringstream ss;
  ss << f.rdbuf();
  return SdArch::from_json(ss.str(), a);
}

// --arch A --from FILE: A's checkpoint with FILE's tensors wherever name and shape match.
int run_grow(const SynthOptions& o, DType dtype) {
  DF_CHECK(o.layout == "ldm", "--from: writes the original single-file (ldm) layout only, not '", o.layout, "'");
  const SdArch arch = read_arch(o.arch);
  const std::string res = std::to_string(arch.resolution);
  std::string base = o.from;
  if (size_t slash = base.find_last_of('/'); slash != std::string::npos) base = base.substr(slash + 1);
  const std::map<std::string, std::string> meta = {{"modelspec.resolution", res + "x" + res},
                                                   {"diffuse_architecture", arch.to_json()},
                                                   {"diffuse_grown_from", base}};
  if (!o.quiet) std::fprintf(stderr, "synth: architecture %s from %s -> %s\n", arch.to_json().c_str(), o.from.c_str(), o.out.c_str());
  const GrowStats st = write_grown_checkpoint(arch, o.from, o.out, dtype, o.seed, meta);
  std::printf("wrote %s: %lld tensors from %s, %lld new (initialised for training, seed %llu)",
              o.out.c_str(), static_cast<long long>(st.copied), o.from.c_str(), static_cast<long long>(st.initialised),
              static_cast<unsigned long long>(o.seed));
  if (!st.reshaped.empty()) std::printf(", %zu of them with another shape there", st.reshaped.size());
  if (st.unused) std::printf("; %lld of its tensors have no place in the architecture", static_cast<long long>(st.unused));
  std::printf("\n");
  for (size_t i = 0; i < st.reshaped.size() && i < 5; ++i) std::printf("  reshaped: %s\n", st.reshaped[i].c_str());
  return 0;
}

int run_synth(const SynthOptions& o) {
  const DType dtype = parse_dtype(o.dtype);
  DF_CHECK(o.manifest.empty() != o.arch.empty(), "synth: give exactly one of --manifest and --arch");
  DF_CHECK(o.from.empty() || !o.arch.empty(), "--from: needs --arch (the architecture to grow into)");
  if (!o.from.empty()) return run_grow(o, dtype);
  std::vector<ManifestRow> rows;
  std::string source, config;
  std::map<std::string, std::string> meta;
  if (!o.arch.empty()) {
    DF_CHECK(o.layout == "ldm", "--arch: writes the original single-file (ldm) layout only, not '", o.layout, "'");
    const SdArch arch = read_arch(o.arch);
    rows = sd1_ldm_rows(arch);
    source = "architecture " + arch.to_json();
    const std::string res = std::to_string(arch.resolution);
    meta = {{"modelspec.resolution", res + "x" + res}, {"diffuse_architecture", arch.to_json()}};
  } else {
    const std::string tsv = find_manifest(o.manifest, manifest_dirs());
    rows = read_manifest(tsv);
    config = manifest_config_path(tsv);
    source = tsv;
  }
  if (!o.quiet)
    std::fprintf(stderr, "synth: %s (%s layout, %s, seed %llu) -> %s\n", source.c_str(), o.layout.c_str(),
                 dtype_name(dtype), static_cast<unsigned long long>(o.seed), o.out.c_str());
  auto t0 = std::chrono::steady_clock::now();
  SynthStats s = write_synthetic_checkpoint(rows, o.layout, o.out, dtype, o.seed, config, !o.quiet, meta);
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
  cmd->add_option("--manifest", o->manifest, "sd15, sd21, sdxl, or a layout manifest PATH.tsv");
  cmd->add_option("--arch", o->arch,
                  "instead of a manifest: an SD 1.x architecture at any widths, \"demo\" (the demo model's) or a "
                  "JSON file (fields of src/models/sd_arch.h); weights initialised for training from scratch");
  cmd->add_option("--from", o->from,
                  "with --arch: take every tensor this trained checkpoint has at the same name and shape (growing "
                  "a model: added modules start as the identity)");
  cmd->add_option("--layout", o->layout, "ldm (one .safetensors file) or diffusers (a folder)")
      ->default_val("ldm")
      ->check(CLI::IsMember({"ldm", "diffusers"}));
  cmd->add_option("-o,--output", o->out, "output file (ldm) or folder (diffusers)")->required();
  cmd->add_option("--dtype", o->dtype, "f16 (default), bf16 or f32")->check(CLI::IsMember({"f16", "bf16", "f32"}));
  cmd->add_option("--seed", o->seed, "random seed (default 0)");
  cmd->add_flag("-q,--quiet", o->quiet, "no progress on stderr");
  return [o] { return run_synth(*o); };
}

}  // namespace diffuse::tools

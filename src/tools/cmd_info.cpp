// `diffuse info PATH`: what a model file or an image holds.
#include <cstdio>
#include <fstream>
#include <map>
#include <optional>
#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"
#include "core/text.h"
#include "io/image.h"
#include "io/output_file.h"
#include "io/tensor_file.h"
#include "models/family.h"
#include "models/lora.h"
#include "tools/commands.h"
#include "tools/info_embeddings.h"

namespace diffuse::tools {
namespace {

struct InfoOptions {
  std::string path;
  bool json = false;
  bool list_tensors = false;
};

bool looks_like_image(const std::string& path) {
  auto ends = [&](const char* ext) {
    size_t n = std::strlen(ext);
    if (path.size() < n) return false;
    for (size_t i = 0; i < n; ++i)
      if (std::tolower(static_cast<unsigned char>(path[path.size() - n + i])) != ext[i]) return false;
    return true;
  };
  if (ends(".png") || ends(".jpg") || ends(".jpeg")) return true;
  std::ifstream f(path, std::ios::binary);
  unsigned char magic[4] = {0, 0, 0, 0};
  f.read(reinterpret_cast<char*>(magic), 4);
  return (magic[0] == 0x89 && magic[1] == 'P' && magic[2] == 'N' && magic[3] == 'G') ||
         (magic[0] == 0xff && magic[1] == 0xd8 && magic[2] == 0xff);
}

std::string human(int64_t n) {
  char buf[32];
  if (n >= 1000000000) std::snprintf(buf, sizeof buf, "%.2fB", double(n) / 1e9);
  else if (n >= 1000000) std::snprintf(buf, sizeof buf, "%.2fM", double(n) / 1e6);
  else if (n >= 1000) std::snprintf(buf, sizeof buf, "%.1fK", double(n) / 1e3);
  else std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(n));
  return buf;
}

int image_info(const InfoOptions& o) {
  Image im = read_image(o.path);
  const char* layout[] = {"", "grey", "grey+alpha", "RGB", "RGBA"};
  if (o.json) {
    nlohmann::json j = {{"file", o.path}, {"kind", "image"}, {"format", im.format},
                        {"width", im.width}, {"height", im.height}, {"channels", im.channels}};
    nlohmann::json text = nlohmann::json::object();
    for (auto& [k, v] : im.text) text[k] = v;
    j["text"] = text;
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("file:     %s\nformat:   %s\nsize:     %dx%d, %s\n", o.path.c_str(), im.format.c_str(),
              im.width, im.height, layout[im.channels]);
  bool any = false;
  for (auto& [k, v] : im.text) {
    if (k == "parameters") {
      std::printf("generation parameters:\n%s\n", printable(v, true).c_str());
      any = true;
    } else {
      std::printf("text %s: %s\n", printable(k, true).c_str(), printable(v, true).c_str());
    }
  }
  if (!any) std::printf("generation parameters: none\n");
  return 0;
}

// "630 (f16: 420, f32: 210)": the tensor count and how many of each dtype.
std::string tensor_counts(const TensorFile& f, const std::map<std::string, int64_t>& dtypes) {
  std::string s = cat(f.size(), " (");
  bool first = true;
  for (auto& [d, n] : dtypes) {
    s += cat(first ? "" : ", ", d, ": ", n);
    first = false;
  }
  return s + ")";
}

nlohmann::json tensor_list(const TensorFile& f) {
  nlohmann::json list = nlohmann::json::array();
  for (const TensorEntry& e : f.tensors)
    list.push_back({{"name", e.name}, {"dtype", dtype_name(e.tensor.dtype())}, {"shape", e.tensor.shape().vec()}});
  return list;
}

void print_metadata(const TensorFile& f) {
  for (auto& [k, v] : f.metadata)
    if (k.find("config.json") == std::string::npos && k != "model_index.json")
      std::printf("metadata %s: %s\n", printable(k, true).c_str(),
                  printable(v.size() > 200 ? v.substr(0, 200) + "…" : v, true).c_str());
}

void print_tensors(const TensorFile& f) {
  for (const TensorEntry& e : f.tensors) std::printf("  %s %s\n", e.tensor.str().c_str(), e.name.c_str());
}

// A LoRA / LyCORIS file: what its modules are, what targets they have, what will not apply.
int lora_info(const InfoOptions& o, const TensorFile& f, const LoraFile& lf,
              const std::map<std::string, int64_t>& dtypes) {
  const std::vector<std::pair<std::string, int>> sum = lora_summary(lf);
  std::string types, targets;
  nlohmann::json jtypes = nlohmann::json::object(), jtargets = nlohmann::json::object();
  bool lycoris = false;
  for (const auto& [label, n] : sum) {
    const bool target = label == "unet" || label == "text_encoder" || label == "text_encoder_2";
    std::string& list = target ? targets : types;
    list += cat(list.empty() ? "" : ", ", label, " ", n);
    (target ? jtargets : jtypes)[label] = n;
    lycoris = lycoris || (!target && label != "LoRA");
  }
  if (o.json) {
    nlohmann::json j = {{"file", o.path}, {"kind", "lora"}, {"format", f.format}, {"lycoris", lycoris},
                        {"modules", lf.entries.size()}, {"types", jtypes}, {"targets", jtargets},
                        {"alpha_from_metadata", lf.metadata_alphas}, {"not_applied", lf.unknown},
                        {"tensors", f.size()}, {"dtypes", dtypes}};
    if (o.list_tensors) j["tensor_list"] = tensor_list(f);
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("file:       %s\nformat:     %s\n", o.path.c_str(), f.format.c_str());
  std::printf("kind:       %s file, %zu modules: %s (%s)\n", lycoris ? "LyCORIS" : "LoRA", lf.entries.size(),
              types.c_str(), targets.c_str());
  std::printf("tensors:    %s\n", tensor_counts(f, dtypes).c_str());
  if (lf.metadata_alphas)
    std::printf("scale:      lora_alpha / r from lora_adapter_metadata (%d modules)\n", lf.metadata_alphas);
  print_metadata(f);
  if (lf.unknown.empty()) std::printf("not applied: none\n");
  for (const std::string& u : lf.unknown) std::printf("not applied: %s\n", printable(u, true).c_str());
  if (o.list_tensors) print_tensors(f);
  return 0;
}

int model_info(const InfoOptions& o) {
  TensorFile f = open_model_file(o.path);
  ModelSummary s = summarize_model(f);
  std::map<std::string, int64_t> dtypes;
  for (const TensorEntry& e : f.tensors) dtypes[dtype_name(e.tensor.dtype())]++;
  if (s.family == Family::Unknown && f.format != "diffusers") {
    std::optional<LoraFile> lf;
    try {
      lf.emplace(load_lora(o.path));
    } catch (const Error&) {  // not a LoRA file either: described as a model, with its problems
    }
    if (lf) return lora_info(o, f, *lf, dtypes);
  }
  std::vector<std::string> problems = f.warnings;
  problems.insert(problems.end(), s.problems.begin(), s.problems.end());

  if (o.json) {
    nlohmann::json j = {{"file", o.path}, {"kind", "model"}, {"format", f.format},
                        {"family", model_kind_name(s)}, {"layout", s.layout},
                        {"unet_in_channels", s.unet_in_channels}, {"context_dim", s.context_dim},
                        {"tensors", f.size()}, {"dtypes", dtypes}, {"problems", problems}};
    nlohmann::json comps = nlohmann::json::object();
    for (const ComponentSummary& c : s.components)
      comps[component_name(c.component)] = {{"tensors", c.tensors}, {"parameters", c.parameters}};
    j["components"] = comps;
    if (o.list_tensors) j["tensor_list"] = tensor_list(f);
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("file:       %s\nformat:     %s\n", o.path.c_str(), f.format.c_str());
  std::printf("family:     %s (layout %s", model_kind_name(s).c_str(), s.layout.c_str());
  if (s.unet_in_channels) std::printf(", UNet in_channels %d", s.unet_in_channels);
  if (s.context_dim) std::printf(", context %d", s.context_dim);
  std::printf(")\ntensors:    %s\ncomponents:\n", tensor_counts(f, dtypes).c_str());
  for (const ComponentSummary& c : s.components)
    std::printf("  %-15s %6lld tensors  %10s parameters\n", component_name(c.component),
                static_cast<long long>(c.tensors), human(c.parameters).c_str());
  print_metadata(f);
  if (problems.empty()) std::printf("problems:   none\n");
  for (const std::string& p : problems) std::printf("problem:    %s\n", p.c_str());
  if (o.list_tensors) print_tensors(f);
  return 0;
}

}  // namespace

Run add_info_command(CLI::App& app) {
  auto o = std::make_shared<InfoOptions>();
  CLI::App* cmd = app.add_subcommand("info", "Describe a model (safetensors, .ckpt, diffusers folder), a LoRA, an embedding or a folder of them, or an image");
  cmd->add_option("path", o->path, "model file, diffusers folder, LoRA, embedding file or folder, or image")->required();
  cmd->add_flag("--json", o->json, "print JSON");
  cmd->add_flag("--tensors", o->list_tensors, "list every tensor");
  return [o] {
    check_input_file(o->path, "info", true);  // a FIFO or device would block or never end
    if (is_embeddings_dir(o->path)) return embeddings_dir_info(o->path, o->json);
    if (looks_like_image(o->path)) return image_info(*o);
    if (is_embedding_file(o->path)) return embedding_file_info(o->path, o->json);
    return model_info(*o);
  };
}

}  // namespace diffuse::tools

// The checkpoints and LoRAs a server offers: files found under --models-dir (single files and
// diffusers folders, subfolders included) and --lora-dir, with A1111's names for them, and the
// one place where a name sent by a client becomes a path. Names never leave their folder:
// absolute paths, `..` and symlinks pointing outside are refused (RequestError 400 naming the
// field or the <lora:…> tag).
#pragma once
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace diffuse::server {

struct ModelInfo {
  std::string title;       // "sub/name.safetensors [abcdef1234]" (no hash part for folders)
  std::string model_name;  // "sub_name" (relative path without extension, / and \ → _)
  std::string rel;         // path relative to the models folder ("sub/name.safetensors")
  std::string filename;    // absolute path
  std::string hash;        // A1111 short hash (10 hex) or ""
  std::string sha256;      // full sha256 or "" (folders)
  bool folder = false;     // a diffusers folder
};

struct LoraInfo {
  std::string name;   // file stem ("sub/x.safetensors" → "x"), what <lora:NAME:W> uses
  std::string alias;  // ss_output_name from the file's metadata, else name
  std::string path;   // absolute
  std::string rel;    // relative to the LoRA folder
  nlohmann::json metadata = nlohmann::json::object();  // the safetensors __metadata__
};

class ModelRegistry {
 public:
  // sha256_of(path) gives a file's full sha256 (the engine's hash cache); models_dir may be "",
  // extra_model (--model) is listed first when given (it may lie outside models_dir).
  ModelRegistry(std::string models_dir, std::string lora_dir, std::string extra_model,
                std::function<std::string(const std::string&)> sha256_of, std::string controlnet_dir = "");

  void refresh_models();  // re-scan (A1111 refresh-checkpoints)
  void refresh_loras();   // re-scan (A1111 refresh-loras)
  std::vector<ModelInfo> models() const;
  std::vector<LoraInfo> loras() const;

  // Any A1111 alias of a checkpoint: title (with or without " [hash]"), rel path, file name,
  // model_name, short hash, full sha256. nullopt when unknown; RequestError(400, field) when
  // the name tries to leave the folder (absolute, `..`, a symlink out).
  std::optional<ModelInfo> find_model(const std::string& alias, const std::string& field) const;

  // A <lora:NAME:W> name: NAME or a relative path under the LoRA folder, with or without
  // extension. nullopt when unknown (the caller skips it with a warning, as A1111);
  // RequestError(400, "<lora:NAME>") when it tries to leave the folder.
  std::optional<LoraInfo> find_lora(const std::string& name) const;

  // ControlNets under --controlnet-dir (default: <models-dir>/ControlNet): names as the A1111
  // ControlNet extension lists them ("name [shorthash]" accepted with or without the hash, or
  // the file name / stem). Same escape rules as models. The extension's hash is A1111's old
  // 8-hex model hash (ModelInfo::hash here; sha256 stays "": ControlNets are not fully hashed).
  std::vector<ModelInfo> controlnets() const;
  std::optional<ModelInfo> find_controlnet(const std::string& name, const std::string& field) const;

  const std::string& models_dir() const { return models_dir_; }
  const std::string& lora_dir() const { return lora_dir_; }

 private:
  std::string models_dir_, lora_dir_, extra_model_, controlnet_dir_;
  std::function<std::string(const std::string&)> sha256_of_;
  mutable std::mutex mu_;
  std::vector<ModelInfo> models_;
  std::vector<LoraInfo> loras_;
  std::vector<ModelInfo> controlnets_;
  std::vector<std::string> old_hashes_;  // A1111's old 8-hex hash of each models_ entry ("" folders)
};

}  // namespace diffuse::server

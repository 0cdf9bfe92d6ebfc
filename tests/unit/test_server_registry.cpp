// The server's model registry (server/model_registry.h) on a folder tree made here: what it lists
// (single files in subfolders, diffusers folders, not what it must skip), A1111's names and every
// alias form, and names that try to leave their folder (`..`, absolute paths, symlinks pointing
// out, for checkpoints, LoRAs and ControlNets): a 400 naming the field, never a file.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "core/sha256.h"
#include "core/text.h"
#include "server/model_registry.h"
#include "server/request.h"

namespace fs = std::filesystem;
using namespace diffuse;
using diffuse::server::LoraInfo;
using diffuse::server::ModelInfo;
using diffuse::server::ModelRegistry;
using diffuse::server::RequestError;

namespace {

void write(const fs::path& p, const std::string& bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream f(p, std::ios::binary);
  f << bytes;
}

// A minimal safetensors file: one F32 tensor and the given __metadata__ (JSON object text).
std::string safetensors_bytes(const std::string& metadata) {
  std::string header =
      "{\"__metadata__\":" + metadata + ",\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int k = 0; k < 8; ++k) out[size_t(k)] = char((n >> (8 * k)) & 0xff);
  return out + header + std::string(4, '\0');
}

std::string upper(std::string s) {
  for (char& c : s) c = char(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

std::string sha256_hex(const std::string& bytes) {
  Sha256 s;
  s.update(bytes.data(), bytes.size());
  return s.hex();
}

// A1111's old 8-hex model hash, worked out here from the bytes.
std::string old_hash_of(const std::string& bytes) {
  std::string part = bytes.size() > 0x100000 ? bytes.substr(0x100000, 0x10000) : "";
  return sha256_hex(part).substr(0, 8);
}

class Registry : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    root_ = fs::temp_directory_path() / ("diffuse_test_registry_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(root_);
    models_ = root_ / "models";
    loras_ = root_ / "loras";
    outside_ = root_ / "outside";

    write(models_ / "a.safetensors", "abc");
    big_.assign(0x100000 + 0x10000 + 17, '\0');
    for (size_t i = 0; i < big_.size(); ++i) big_[i] = char((i * 131 + 7) & 0xff);
    write(models_ / "sub" / "dir" / "b.ckpt", big_);
    write(models_ / "sub" / "c.pt", "not a checkpoint extension");
    write(models_ / "readme.txt", "text");
    write(models_ / ".hidden" / "d.safetensors", "hidden");
    // A diffusers pipeline: one entry, not its component files.
    write(models_ / "pipe" / "model_index.json", "{}");
    write(models_ / "pipe" / "unet" / "config.json", "{}");
    write(models_ / "pipe" / "unet" / "diffusion_pytorch_model.safetensors", "u");
    // A lone component folder (a VAE): neither it nor its weights are checkpoints.
    write(models_ / "vae_only" / "config.json", "{}");
    write(models_ / "vae_only" / "diffusion_pytorch_model.safetensors", "v");
    // ControlNets under the default <models>/ControlNet: theirs, not checkpoints.
    write(models_ / "ControlNet" / "cn.safetensors", "cn");
    write(models_ / "ControlNet" / "sub" / "cn2.pth", big_);
    write(models_ / "ControlNet" / "cn_diffusers" / "config.json", "{}");
    write(models_ / "ControlNet" / "cn_diffusers" / "diffusion_pytorch_model.safetensors", "d");
    write(outside_ / "secret.safetensors", "secret");
    write(outside_ / "secret.pth", "secret");
    fs::create_directory_symlink(outside_, models_ / "linkdir");
    fs::create_symlink(outside_ / "secret.safetensors", models_ / "evil.safetensors");
    fs::create_symlink(models_ / "a.safetensors", models_ / "inlink.safetensors");  // inside: listed
    // A sibling whose path starts with the folder's ("models2" after "models"): still outside.
    write(root_ / "models2" / "p.safetensors", "p");
    fs::create_symlink(root_ / "models2" / "p.safetensors", models_ / "prefix.safetensors");
    fs::create_symlink(outside_ / "secret.pth", models_ / "ControlNet" / "evilcn.pth");
    fs::create_symlink(models_ / "nowhere.safetensors", models_ / "dangling.safetensors");

    write(loras_ / "x.safetensors", safetensors_bytes("{\"ss_output_name\":\"fancy\",\"ss_network_dim\":\"4\"}"));
    write(loras_ / "sub" / "y.pt", "pt");
    write(loras_ / "plain.safetensors", safetensors_bytes("{\"other\":\"1\"}"));
    // A header length of 2^40 bytes: not read (capped), listed without metadata.
    std::string huge(8, '\0');
    huge[5] = 1;
    write(loras_ / "huge.safetensors", huge + "{}");
    write(loras_ / "garbage.safetensors", std::string("\x04\0\0\0\0\0\0\0{{{{", 12));
    fs::create_symlink(outside_ / "secret.safetensors", loras_ / "evil.safetensors");
    fs::create_directory_symlink(outside_, loras_ / "linkdir");
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }
  ModelRegistry make(const std::string& extra = "") const {
    return ModelRegistry(models_.string(), loras_.string(), extra, [](const std::string& p) { return sha256_file(p); });
  }
  static std::vector<std::string> rels(const std::vector<ModelInfo>& v) {
    std::vector<std::string> out;
    for (const ModelInfo& m : v) out.push_back(m.rel);
    return out;
  }

  fs::path root_, models_, loras_, outside_;
  std::string big_;
};

// The escape checks: status 400, the field given, and a message that names it (and is UTF-8).
template <typename F>
void expect_refused(F&& f, const std::string& field, const std::string& why) {
  try {
    f();
    ADD_FAILURE() << "no RequestError for " << field << " (" << why << ")";
  } catch (const RequestError& e) {
    EXPECT_EQ(e.status, 400) << e.what();
    EXPECT_EQ(e.field, field) << e.what();
    EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
    EXPECT_TRUE(valid_utf8(e.what())) << e.what();
  }
}

}  // namespace

TEST_F(Registry, ListsCheckpointsWithA1111Names) {
  ModelRegistry r = make();
  std::vector<ModelInfo> ms = r.models();
  EXPECT_EQ(rels(ms), (std::vector<std::string>{"a.safetensors", "inlink.safetensors", "pipe", "sub/dir/b.ckpt"}));
  ASSERT_EQ(ms.size(), 4u);
  const ModelInfo& a = ms[0];
  const std::string sha_abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
  EXPECT_EQ(a.sha256, sha_abc);
  EXPECT_EQ(a.hash, "ba7816bf8f");
  EXPECT_EQ(a.title, "a.safetensors [ba7816bf8f]");
  EXPECT_EQ(a.model_name, "a");
  EXPECT_EQ(fs::path(a.filename), fs::absolute(models_ / "a.safetensors"));
  EXPECT_FALSE(a.folder);
  const ModelInfo& pipe = ms[2];
  EXPECT_TRUE(pipe.folder);
  EXPECT_EQ(pipe.title, "pipe");
  EXPECT_EQ(pipe.model_name, "pipe");
  EXPECT_EQ(pipe.hash, "");
  EXPECT_EQ(pipe.sha256, "");
  const ModelInfo& b = ms[3];
  EXPECT_EQ(b.sha256, sha256_hex(big_));
  EXPECT_EQ(b.title, "sub/dir/b.ckpt [" + sha256_hex(big_).substr(0, 10) + "]");
  EXPECT_EQ(b.model_name, "sub_dir_b");
  // No hash function: titles without the hash part.
  ModelRegistry nohash(models_.string(), loras_.string(), "", nullptr);
  EXPECT_EQ(nohash.models()[0].title, "a.safetensors");
  EXPECT_EQ(nohash.models()[0].hash, "");
  // A hash function that fails leaves that file without a hash, still listed.
  ModelRegistry failing(models_.string(), "", "",
                        [](const std::string&) -> std::string { throw std::runtime_error("x"); });
  EXPECT_EQ(failing.models().size(), 4u);
  EXPECT_EQ(failing.models()[0].title, "a.safetensors");
}

TEST_F(Registry, EveryAliasFormResolves) {
  ModelRegistry r = make();
  const std::string sha_b = sha256_hex(big_);
  const std::string old_b = old_hash_of(big_);
  for (const std::string& alias :
       {"sub/dir/b.ckpt [" + sha_b.substr(0, 10) + "]", std::string("sub/dir/b.ckpt"), std::string("sub\\dir\\b.ckpt"),
        std::string("sub/dir/b.ckpt [0000000000]"), std::string("b.ckpt"), std::string("sub_dir_b"), std::string("b"),
        sha_b.substr(0, 10), sha_b, upper(sha_b.substr(0, 10)), old_b, "sub/dir/b.ckpt [" + old_b + "]",
        "b [" + sha_b.substr(0, 10) + "]"}) {
    std::optional<ModelInfo> m = r.find_model(alias, "sd_model_checkpoint");
    ASSERT_TRUE(m.has_value()) << alias;
    EXPECT_EQ(m->rel, "sub/dir/b.ckpt") << alias;
  }
  std::optional<ModelInfo> pipe = r.find_model("pipe", "sd_model_checkpoint");
  ASSERT_TRUE(pipe.has_value());
  EXPECT_TRUE(pipe->folder);
  ASSERT_TRUE(r.find_model("a.safetensors [ba7816bf8f]", "f").has_value());
  EXPECT_EQ(r.find_model("a", "f")->rel, "a.safetensors");
}

TEST_F(Registry, UnknownNamesAreNotFound) {
  ModelRegistry r = make();
  for (const char* alias :
       {"", "nope.safetensors", "0123456789", "sub/c.pt", "readme.txt", ".hidden/d.safetensors", "vae_only",
        "vae_only/diffusion_pytorch_model.safetensors", "pipe/unet/diffusion_pytorch_model.safetensors",
        "ControlNet/cn.safetensors", "cn", "dangling.safetensors", "sub", "sub/dir", "."})
    EXPECT_FALSE(r.find_model(alias, "sd_model_checkpoint").has_value()) << alias;
}

TEST_F(Registry, NamesLeavingTheFolderAreRefused) {
  ModelRegistry r = make();
  const std::string f = "override_settings.sd_model_checkpoint";
  auto find = [&](const std::string& n) { return [&r, n, &f] { r.find_model(n, f); }; };
  expect_refused(find("../outside/secret.safetensors"), f, "..");
  expect_refused(find("sub/../../outside/secret.safetensors"), f, "..");
  expect_refused(find("sub/../a.safetensors"), f, "..");  // even when it would stay inside
  expect_refused(find("..\\outside\\secret.safetensors"), f, "..");
  expect_refused(find(".."), f, "..");
  expect_refused(find("/etc/passwd"), f, "absolute");
  expect_refused(find((models_ / "a.safetensors").string()), f, "absolute");
  expect_refused(find("\\\\server\\share\\x.safetensors"), f, "absolute");
  expect_refused(find("C:\\models\\x.safetensors"), f, "absolute");
  expect_refused(find(std::string("a.safetensors\0x", 15)), f, "NUL");
  // Symlinks: a file pointing out, a directory pointing out (whether or not the file exists).
  expect_refused(find("evil.safetensors"), f, "outside");
  expect_refused(find("evil.safetensors [0123456789]"), f, "outside");
  expect_refused(find("linkdir/secret.safetensors"), f, "outside");
  expect_refused(find("linkdir/nothing.safetensors"), f, "outside");
  expect_refused(find("linkdir"), f, "outside");
  expect_refused(find("prefix.safetensors"), f, "outside");
  // A name that is not UTF-8: the message still is.
  expect_refused(find("../\xff\xfe.safetensors"), f, "..");
  // Not listed either.
  for (const ModelInfo& m : r.models()) {
    EXPECT_EQ(m.filename.find("outside"), std::string::npos) << m.filename;
    EXPECT_EQ(m.rel.find("evil"), std::string::npos) << m.rel;
    EXPECT_EQ(m.rel.find("linkdir"), std::string::npos) << m.rel;
    EXPECT_EQ(m.rel.find("prefix"), std::string::npos) << m.rel;
  }
}

TEST_F(Registry, LorasWithMetadataAliases) {
  ModelRegistry r = make();
  std::vector<LoraInfo> ls = r.loras();
  std::vector<std::string> names;
  for (const LoraInfo& l : ls) names.push_back(l.rel);
  EXPECT_EQ(names, (std::vector<std::string>{"garbage.safetensors", "huge.safetensors", "plain.safetensors", "sub/y.pt",
                                             "x.safetensors"}));
  ASSERT_EQ(ls.size(), 5u);
  const LoraInfo& x = ls[4];
  EXPECT_EQ(x.name, "x");
  EXPECT_EQ(x.alias, "fancy");
  EXPECT_EQ(x.metadata.value("ss_network_dim", ""), "4");
  EXPECT_EQ(fs::path(x.path), fs::absolute(loras_ / "x.safetensors"));
  EXPECT_EQ(ls[2].alias, "plain");  // no ss_output_name: the name
  EXPECT_EQ(ls[2].metadata.value("other", ""), "1");
  EXPECT_EQ(ls[3].name, "y");
  EXPECT_EQ(ls[3].alias, "y");
  EXPECT_TRUE(ls[1].metadata.empty());  // huge header: not read
  EXPECT_TRUE(ls[0].metadata.empty());  // not JSON

  for (const char* n : {"x", "x.safetensors", "fancy"}) {
    std::optional<LoraInfo> l = r.find_lora(n);
    ASSERT_TRUE(l.has_value()) << n;
    EXPECT_EQ(l->rel, "x.safetensors") << n;
  }
  for (const char* n : {"y", "sub/y", "sub/y.pt", "sub\\y"}) {
    std::optional<LoraInfo> l = r.find_lora(n);
    ASSERT_TRUE(l.has_value()) << n;
    EXPECT_EQ(l->rel, "sub/y.pt") << n;
  }
  for (const char* n : {"", "nope", "x.pt", "sub", "secret"}) EXPECT_FALSE(r.find_lora(n).has_value()) << n;

  auto find = [&](const std::string& n) { return [&r, n] { r.find_lora(n); }; };
  expect_refused(find("../outside/secret"), "<lora:../outside/secret>", "..");
  expect_refused(find("/etc/passwd"), "<lora:/etc/passwd>", "absolute");
  expect_refused(find("evil"), "<lora:evil>", "outside");  // evil.safetensors points out
  expect_refused(find("evil.safetensors"), "<lora:evil.safetensors>", "outside");
  expect_refused(find("linkdir/secret"), "<lora:linkdir/secret>", "outside");
  for (const LoraInfo& l : r.loras()) EXPECT_EQ(l.rel.find("evil"), std::string::npos) << l.rel;
  for (const LoraInfo& l : r.loras()) EXPECT_EQ(l.rel.find("linkdir"), std::string::npos) << l.rel;
}

TEST_F(Registry, ControlNetsAsTheExtensionNamesThem) {
  ModelRegistry r = make();
  std::vector<ModelInfo> cs = r.controlnets();
  EXPECT_EQ(rels(cs), (std::vector<std::string>{"cn.safetensors", "cn_diffusers", "sub/cn2.pth"}));
  ASSERT_EQ(cs.size(), 3u);
  EXPECT_EQ(cs[0].title, "cn [" + old_hash_of("cn") + "]");
  EXPECT_EQ(cs[1].title, "cn_diffusers");
  EXPECT_TRUE(cs[1].folder);
  EXPECT_EQ(cs[2].title, "cn2 [" + old_hash_of(big_) + "]");
  for (const std::string& n : {cs[2].title, std::string("cn2"), std::string("CN2"), std::string("cn2 [d14c016b]"),
                               std::string("cn2.pth"), std::string("sub/cn2.pth"), std::string("sub/cn2")}) {
    std::optional<ModelInfo> m = r.find_controlnet(n, "controlnet.model");
    ASSERT_TRUE(m.has_value()) << n;
    EXPECT_EQ(m->rel, "sub/cn2.pth") << n;
  }
  EXPECT_FALSE(r.find_controlnet("nope [d14c016b]", "controlnet.model").has_value());
  EXPECT_FALSE(r.find_controlnet("evilcn", "controlnet.model").has_value());  // not listed
  auto find = [&](const std::string& n) { return [&r, n] { r.find_controlnet(n, "controlnet.model"); }; };
  expect_refused(find("../../outside/secret.pth"), "controlnet.model", "..");
  expect_refused(find("/tmp/x.pth"), "controlnet.model", "absolute");
  expect_refused(find("evilcn.pth"), "controlnet.model", "outside");
  for (const ModelInfo& m : cs) EXPECT_EQ(m.rel.find("evil"), std::string::npos) << m.rel;
}

TEST_F(Registry, ExtraModelIsListedFirst) {
  write(root_ / "elsewhere" / "solo.safetensors", "solo");
  ModelRegistry r = make((root_ / "elsewhere" / "solo.safetensors").string());
  std::vector<ModelInfo> ms = r.models();
  ASSERT_EQ(ms.size(), 5u);
  EXPECT_EQ(ms[0].rel, "solo.safetensors");
  EXPECT_EQ(ms[0].title, "solo.safetensors [" + sha256_hex("solo").substr(0, 10) + "]");
  EXPECT_TRUE(r.find_model("solo", "f").has_value());
  EXPECT_TRUE(r.find_model(ms[0].title, "f").has_value());
  // Inside the models folder: listed once, first, by its path there.
  ModelRegistry inside = make((models_ / "sub" / "dir" / "b.ckpt").string());
  EXPECT_EQ(rels(inside.models()),
            (std::vector<std::string>{"sub/dir/b.ckpt", "a.safetensors", "inlink.safetensors", "pipe"}));
}

TEST_F(Registry, RefreshPicksUpNewFiles) {
  ModelRegistry r = make();
  EXPECT_FALSE(r.find_model("new", "f").has_value());
  EXPECT_FALSE(r.find_lora("fresh").has_value());
  write(models_ / "more" / "new.safetensors", "new");
  write(loras_ / "fresh.safetensors", safetensors_bytes("{}"));
  EXPECT_FALSE(r.find_model("new", "f").has_value());  // until refreshed
  r.refresh_models();
  r.refresh_loras();
  std::optional<ModelInfo> m = r.find_model("more/new.safetensors", "f");
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->model_name, "more_new");
  EXPECT_TRUE(r.find_lora("fresh").has_value());
  fs::remove(models_ / "a.safetensors");
  r.refresh_models();
  EXPECT_FALSE(r.find_model("a.safetensors", "f").has_value());
}

// Lookups while another thread refreshes (run under TSan/ASan builds this is the race check).
TEST_F(Registry, LookupsDuringRefreshes) {
  ModelRegistry r = make();
  std::atomic<bool> stop{false};
  std::thread t([&] {
    for (int i = 0; i < 30; ++i) {
      r.refresh_models();
      r.refresh_loras();
    }
    stop = true;
  });
  int found = 0;
  while (!stop) {
    found += r.find_model("b", "f").has_value();
    found += r.find_lora("fancy").has_value();
    found += int(r.models().size() == 4);
  }
  t.join();
  EXPECT_GT(found, 0);
}

// Symlinks inside the folder: a link back up to the root and a self-loop end the scan without
// listing anything twice; a name through the self-loop cannot be resolved and is refused.
TEST_F(Registry, SymlinkLoopsEndTheScan) {
  fs::create_directory_symlink(models_, models_ / "sub" / "up");
  fs::create_symlink(models_ / "loop", models_ / "loop");
  fs::create_directory_symlink(loras_, loras_ / "sub" / "again");
  ModelRegistry r = make();
  EXPECT_EQ(rels(r.models()),
            (std::vector<std::string>{"a.safetensors", "inlink.safetensors", "pipe", "sub/dir/b.ckpt"}));
  EXPECT_EQ(r.loras().size(), 5u);
  auto find = [&](const std::string& n) { return [&r, n] { r.find_model(n, "f"); }; };
  expect_refused(find("loop/x.safetensors"), "f", "cannot be resolved");
  // Through the link up: still inside, so only "unknown" (the scan did not list it there).
  EXPECT_FALSE(r.find_model("sub/up/a.safetensors", "f").has_value());
}

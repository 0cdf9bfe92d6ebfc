// `diffuse info` on the three layouts of the sd1 model: same family, same tensors per component.
#include <map>
#include <nlohmann/json.hpp>

#include "cli_util.h"

using namespace clitest;
using nlohmann::json;

namespace {

std::string sd1(const std::string& name) {
  return first_existing({std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sd1/model/" + name,
                         std::string(DIFFUSE_TEST_DATA) + "/sd1/model/" + name});
}

json info_json(const std::string& p) {
  Result r = run({"info", "--json", p});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return json::parse(r.out);
}

}  // namespace

TEST(Info, SingleFileSafetensors) {
  std::string p = sd1("tiny-sd1.safetensors");
  if (p.empty()) GTEST_SKIP() << "tiny-sd1.safetensors not in ../shared/fixtures or tests/data";
  json j = info_json(p);
  EXPECT_EQ(j["format"], "safetensors");
  EXPECT_EQ(j["family"], "sd1");
  EXPECT_EQ(j["unet_in_channels"], 4);
  EXPECT_EQ(j["tensors"], 980);
  EXPECT_EQ(j["dtypes"]["f16"], 980);
  EXPECT_TRUE(j["problems"].empty()) << j["problems"];
  // Human-readable form says the same.
  Result r = run({"info", p});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("family:     sd1"), std::string::npos) << r.out;
}

TEST(Info, CkptAndDiffusersMatchSafetensors) {
  std::string st = sd1("tiny-sd1.safetensors"), ck = sd1("tiny-sd1.ckpt"), df = sd1("diffusers");
  if (st.empty() || ck.empty() || df.empty()) GTEST_SKIP() << "needs ../shared/fixtures/sd1/model (ckpt and diffusers folder)";
  json a = info_json(st), b = info_json(ck), c = info_json(df);
  EXPECT_EQ(b["format"], "ckpt");
  EXPECT_EQ(c["format"], "diffusers");
  for (const json* j : {&a, &b, &c}) {
    EXPECT_EQ((*j)["family"], "sd1");
    EXPECT_EQ((*j)["unet_in_channels"], 4);
    EXPECT_EQ((*j)["context_dim"], a["context_dim"]);
  }
  // Same tensors per component: identical counts and parameter totals in all three layouts.
  for (const char* comp : {"unet", "vae", "text_encoder"}) {
    EXPECT_EQ(a["components"][comp], b["components"][comp]) << comp;
    EXPECT_EQ(a["components"][comp], c["components"][comp]) << comp;
  }
  // The ckpt holds exactly the safetensors' names, dtypes and shapes.
  json ta = json::parse(run({"info", "--json", "--tensors", st}).out)["tensor_list"];
  json tb = json::parse(run({"info", "--json", "--tensors", ck}).out)["tensor_list"];
  auto by_name = [](const json& list) {
    std::map<std::string, json> m;
    for (const json& t : list) m[t["name"]] = t;
    return m;
  };
  std::map<std::string, json> ma = by_name(ta), mb = by_name(tb);
  for (auto& [name, t] : ma) {
    ASSERT_TRUE(mb.count(name)) << name << " missing from the ckpt";
    EXPECT_EQ(mb[name]["shape"], t["shape"]) << name;
    EXPECT_EQ(mb[name]["dtype"], t["dtype"]) << name;
  }
}

TEST(Info, ImageWithoutParameters) {
  std::string p = first_existing({std::string(DIFFUSE_TEST_DATA) + "/sd1/init.png"});
  if (p.empty()) GTEST_SKIP() << "tests/data/sd1/init.png missing";
  Result r = run({"info", p});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("format:   png"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("generation parameters: none"), std::string::npos) << r.out;
}

TEST(Info, UsageErrors) {
  Result r = run({"info"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("path"), std::string::npos) << r.err;
  r = run({"frobnicate"});
  EXPECT_NE(r.exit_code, 0);
}

// Shared by the LoraNetwork unit tests: comparing a network with one read back from its file, and
// errors that must name what is wrong.
#pragma once
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"
#include "train/lora_network.h"

namespace loratest {

// `back` holds the same modules as `net` (any order): keys, layers, weight names, targets,
// alphas, and down/up bit for bit.
inline void expect_same_modules(diffuse::train::LoraNetwork& net, diffuse::train::LoraNetwork& back) {
  using diffuse::train::LoraModule;
  std::map<std::string, const LoraModule*> by_key;
  for (const LoraModule& m : back.modules()) by_key[m.key] = &m;
  ASSERT_EQ(by_key.size(), net.modules().size());
  for (const LoraModule& m : net.modules()) {
    SCOPED_TRACE(m.key);
    auto it = by_key.find(m.key);
    ASSERT_NE(it, by_key.end());
    const LoraModule& b = *it->second;
    EXPECT_EQ(b.layer, m.layer);
    EXPECT_EQ(b.weight_name, m.weight_name);
    EXPECT_EQ(b.target, m.target);
    EXPECT_EQ(b.alpha, m.alpha);
    ASSERT_EQ(b.down.value.shape(), m.down.value.shape());
    ASSERT_EQ(b.up.value.shape(), m.up.value.shape());
    EXPECT_EQ(std::memcmp(b.down.value.data(), m.down.value.data(), m.down.value.bytes()), 0);
    EXPECT_EQ(std::memcmp(b.up.value.data(), m.up.value.data(), m.up.value.bytes()), 0);
  }
}

// `f` throws diffuse::Error with every one of `parts` in its message.
inline void expect_error_naming(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no error (expected one naming " << parts.front() << ")";
  } catch (const diffuse::Error& e) {
    const std::string m = e.what();
    for (const std::string& p : parts) EXPECT_NE(m.find(p), std::string::npos) << m;
  }
}

}  // namespace loratest

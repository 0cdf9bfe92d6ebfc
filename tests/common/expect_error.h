// Test helper: run f, expecting a one-line diffuse::Error that starts with `path` and contains
// `keyword` (the contract for every user-facing error about a file).
#pragma once
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "core/error.h"

inline void expect_error(const std::function<void()>& f, const std::string& path, const std::string& keyword) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing '" << keyword << "'";
  } catch (const diffuse::Error& e) {
    std::string msg = e.what();
    EXPECT_EQ(msg.rfind(path, 0), 0u) << "message does not start with the path: " << msg;
    EXPECT_NE(msg.find(keyword), std::string::npos) << "missing '" << keyword << "' in: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "non-diffuse exception: " << e.what();
  }
}

// Error type and checks that carry context (file, tensor, shape, op) to the user.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace diffuse {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// A file (model, LoRA, ControlNet, image) that is missing or cannot be read or parsed; the
// message names it. Library callers (the C API, the server) tell these from bad settings.
class FileError : public Error {
 public:
  explicit FileError(const std::string& msg) : Error(msg) {}
};

// A run stopped because its caller asked (a progress callback returned "cancel").
class Cancelled : public Error {
 public:
  explicit Cancelled(const std::string& msg = "cancelled") : Error(msg) {}
};

// Concatenate anything streamable into a string: cat("tensor ", name, " has ", n, " dims").
template <typename... Args>
std::string cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

template <typename... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(cat(std::forward<Args>(args)...));
}

}  // namespace diffuse

// User-facing check: throws diffuse::Error with the message when cond is false.
#define DF_CHECK(cond, ...)                                  \
  do {                                                       \
    if (!(cond)) ::diffuse::fail(__VA_ARGS__);               \
  } while (0)

// Internal invariant: a bug in diffuse if it fires (still throws, never aborts silently).
#define DF_ASSERT(cond)                                                              \
  do {                                                                               \
    if (!(cond))                                                                     \
      ::diffuse::fail("internal error: ", #cond, " at ", __FILE__, ":", __LINE__);   \
  } while (0)

// What the A1111 and OpenAI parsers share: the JSON body, typed field reads with pydantic's
// coercions, base64, and request images (bare base64 or data: URLs) decoded under the server's
// pixel limit.
#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string_view>

#include "core/error.h"
#include "core/text.h"
#include "server/request.h"

namespace diffuse::server {

namespace {

using json = nlohmann::json;

// nlohmann parses nesting without recursion, but copying and dumping a value recurse (the echo
// copies parts of the body; the server dumps it): bodies nested deeper than this are refused
// before parsing. Real requests nest 4 or 5 levels.
constexpr int kMaxJsonDepth = 64;

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

bool istarts_with(std::string_view s, std::string_view prefix) {
  if (s.size() < prefix.size()) return false;
  for (size_t i = 0; i < prefix.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(s[i])) != std::tolower(static_cast<unsigned char>(prefix[i])))
      return false;
  return true;
}

bool iequals(std::string_view a, std::string_view b) { return a.size() == b.size() && istarts_with(a, b); }

// A value's JSON type for messages ("a string", "an array").
std::string type_phrase(const json& v) {
  switch (v.type()) {
    case json::value_t::string: return "a string";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    case json::value_t::null: return "null";
    case json::value_t::binary: return "binary data";
    default: return "a number";
  }
}

// What a JSON number or numeric string holds: nlohmann keeps integers exactly (non-negative ones
// as unsigned), and pydantic coerces strings such as "20" or " 7.5 ".
enum class Num { None, Int, UInt, Float };

template <typename T>
bool from_string(std::string_view s, T* out) {
  s = trim(s);
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  if (s.empty()) return false;
  const char* end = s.data() + s.size();
  auto [p, ec] = std::from_chars(s.data(), end, *out);
  return ec == std::errc() && p == end;
}

Num read_number(const json& v, int64_t* i, uint64_t* u, double* d) {
  if (v.is_number_unsigned()) return *u = v.get<uint64_t>(), Num::UInt;
  if (v.is_number_integer()) return *i = v.get<int64_t>(), Num::Int;
  if (v.is_number_float()) return *d = v.get<double>(), Num::Float;
  if (!v.is_string()) return Num::None;
  const std::string& s = v.get_ref<const std::string&>();
  if (from_string(s, i)) return Num::Int;
  if (from_string(s, u)) return Num::UInt;
  if (from_string(s, d)) return Num::Float;
  return Num::None;
}

[[noreturn]] void type_error(const std::string& name, const char* expected, const json& v) {
  throw RequestError(422, name, cat(name, ": expected ", expected, ", got ", type_phrase(v)));
}

struct Number {
  Num kind = Num::None;
  int64_t i = 0;
  uint64_t u = 0;
  double d = 0;
};

// A field read as a number: std::nullopt when absent, 422 (expecting `expected`) when not one.
std::optional<Number> number_field(const Fields& f, const std::string& key, const char* expected) {
  const json* v = f.get(key);
  if (!v) return std::nullopt;
  Number n;
  n.kind = read_number(*v, &n.i, &n.u, &n.d);
  if (n.kind == Num::None) type_error(f.name(key), expected, *v);
  return n;
}

[[noreturn]] void range_error(const std::string& name, double v, double lo, double hi) {
  throw RequestError(422, name, cat(name, ": ", v, " is out of range (", lo, " to ", hi, ")"));
}

uint32_t be16(const uint8_t* p) { return uint32_t(p[0]) << 8 | p[1]; }
uint32_t be32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }

// The size a PNG or JPEG declares, read from its header without decoding anything (PNG: the IHDR
// chunk; JPEG: the first SOFn frame header, found by walking the marker segments). false when
// the header cannot tell: the decoder then reports what is wrong.
bool declared_size(const uint8_t* d, size_t n, uint32_t* w, uint32_t* h) {
  static const uint8_t kPngSig[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
  if (n >= 24 && std::memcmp(d, kPngSig, 8) == 0 && std::memcmp(d + 12, "IHDR", 4) == 0) {
    *w = be32(d + 16);
    *h = be32(d + 20);
    return true;
  }
  if (n < 4 || d[0] != 0xFF || d[1] != 0xD8) return false;
  size_t pos = 2;
  while (pos < n) {
    if (d[pos] != 0xFF) return false;
    while (pos < n && d[pos] == 0xFF) ++pos;  // fill bytes
    if (pos >= n) return false;
    const uint8_t marker = d[pos++];
    if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) continue;  // TEM, RSTn: no length
    if (marker == 0xD9 || marker == 0xDA) return false;                  // EOI, SOS before any frame
    if (pos + 2 > n) return false;
    const uint32_t len = be16(d + pos);
    if (len < 2) return false;
    // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC): [len 2][precision 1][height 2][width 2]
    const bool sof = marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
    if (sof) {
      if (pos + 7 > n) return false;
      *h = be16(d + pos + 3);
      *w = be16(d + pos + 5);
      return true;
    }
    pos += len;
  }
  return false;
}

int base64_value(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+' || c == '-') return 62;  // standard and URL-safe alphabets both
  if (c == '/' || c == '_') return 63;
  return -1;
}

std::string describe_byte(unsigned char c) {
  if (c >= 0x20 && c < 0x7f) return cat("character '", char(c), "'");
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02x", c);
  return cat("byte ", buf);
}

}  // namespace

std::string name_key(std::string_view s) {
  std::string out(trim(s));
  for (char& c : out) c = char(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string quote_name(const std::string& s) {
  constexpr size_t kMax = 64;
  size_t n = std::min(s.size(), kMax);
  while (n < s.size() && n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;  // not inside a character
  std::string out(1, '\'');
  out += printable(std::string_view(s).substr(0, n));
  out += n < s.size() ? "...'" : "'";
  return out;
}

json parse_json_body(const std::string& body) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : body) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth)
        throw RequestError(400, "", cat("malformed JSON: nested deeper than ", kMaxJsonDepth, " levels"));
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  json j;
  try {
    j = json::parse(body);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for numbers such as 1e999
    throw RequestError(400, "", cat("malformed JSON: ", e.what()));
  }
  if (!j.is_object()) throw RequestError(422, "", cat("the body must be a JSON object, not ", type_phrase(j)));
  return j;
}

// ---------------------------------------------------------------------------------------------
// Fields

const json* Fields::get(const std::string& key) const {
  if (!obj_.is_object()) return nullptr;
  auto it = obj_.find(key);
  if (it == obj_.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<std::string> Fields::str(const std::string& key) const {
  const json* v = get(key);
  if (!v) return std::nullopt;
  if (v->is_string()) return v->get<std::string>();
  if (v->is_number()) return v->dump();  // pydantic makes strings of numbers
  type_error(name(key), "a string", *v);
}

std::optional<double> Fields::number(const std::string& key, double lo, double hi) const {
  const std::optional<Number> n = number_field(*this, key, "a number");
  if (!n) return std::nullopt;
  double d = n->kind == Num::Int ? double(n->i) : n->kind == Num::UInt ? double(n->u) : n->d;
  if (!std::isfinite(d)) throw RequestError(422, name(key), cat(name(key), ": must be a finite number"));
  if (d < lo || d > hi) range_error(name(key), d, lo, hi);
  return d;
}

std::optional<int64_t> Fields::integer(const std::string& key, int64_t lo, int64_t hi) const {
  const std::optional<Number> n = number_field(*this, key, "an integer");
  if (!n) return std::nullopt;
  int64_t i = n->i;
  if (n->kind == Num::UInt) {
    if (n->u > uint64_t(std::max<int64_t>(hi, 0))) range_error(name(key), double(n->u), double(lo), double(hi));
    i = int64_t(n->u);
  } else if (n->kind == Num::Float) {
    // Truncated toward zero, as pydantic v1's int() does.
    if (!std::isfinite(n->d)) throw RequestError(422, name(key), cat(name(key), ": must be a finite number"));
    const double d = std::trunc(n->d);
    if (d < double(lo) || d > double(hi)) range_error(name(key), d, double(lo), double(hi));
    i = int64_t(d);
  }
  if (i < lo || i > hi) range_error(name(key), double(i), double(lo), double(hi));
  return i;
}

std::optional<bool> Fields::boolean(const std::string& key) const {
  const json* v = get(key);
  if (!v) return std::nullopt;
  if (v->is_boolean()) return v->get<bool>();
  if (v->is_number()) {
    const double d = v->get<double>();
    if (d == 0 || d == 1) return d == 1;
  } else if (v->is_string()) {
    const std::string_view s = trim(v->get_ref<const std::string&>());
    for (const char* t : {"true", "1", "yes", "on"})
      if (iequals(s, t)) return true;
    for (const char* f : {"false", "0", "no", "off"})
      if (iequals(s, f)) return false;
  }
  type_error(name(key), "true or false", *v);
}

const json* Fields::object(const std::string& key) const {
  const json* v = get(key);
  if (v && !v->is_object()) type_error(name(key), "an object", *v);
  return v;
}

const json* Fields::array(const std::string& key) const {
  const json* v = get(key);
  if (v && !v->is_array()) type_error(name(key), "an array", *v);
  return v;
}

std::optional<uint64_t> Fields::seed(const std::string& key) const {
  const std::optional<Number> n = number_field(*this, key, "an integer");
  if (!n) return std::nullopt;
  int64_t i = n->i;
  if (n->kind == Num::UInt) return n->u;
  if (n->kind == Num::Float) {
    const double d = std::trunc(n->d);
    // [-2^63, 2^64): the range torch.manual_seed accepts.
    if (!std::isfinite(d) || d < -9223372036854775808.0 || d >= 18446744073709551616.0)
      throw RequestError(422, name(key), cat(name(key), ": ", n->d, " is out of range (-1: random, else 0 to 2^64-1)"));
    if (d >= 0) return uint64_t(d);
    i = int64_t(d);
  }
  if (i == -1) return std::nullopt;
  return uint64_t(i);  // other negatives wrap modulo 2^64, as in torch
}

// ---------------------------------------------------------------------------------------------
// Base64

namespace {

std::vector<uint8_t> base64_decode_view(std::string_view s, const std::string& field) {
  std::vector<uint8_t> out;
  out.reserve(s.size() / 4 * 3 + 3);
  uint32_t acc = 0;
  int bits = 0;
  size_t chars = 0;  // data characters (no padding, no whitespace)
  bool padding = false;
  for (size_t i = 0; i < s.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (is_space(char(c))) continue;
    if (c == '=') {
      padding = true;
      continue;
    }
    const int v = base64_value(c);
    if (v < 0 || padding)
      throw RequestError(400, field,
                         cat(field, ": invalid base64: ", describe_byte(c), " at offset ", i,
                             padding && v >= 0 ? " after the padding" : ""));
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    ++chars;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(uint8_t(acc >> bits));
      acc &= (1u << bits) - 1;
    }
  }
  // A final group of one character holds only 6 bits: not even one byte.
  if (chars % 4 == 1)
    throw RequestError(400, field, cat(field, ": invalid base64: truncated (", chars, " characters)"));
  return out;
}

}  // namespace

std::vector<uint8_t> base64_decode(const std::string& s, const std::string& field) {
  return base64_decode_view(s, field);
}

std::string base64_encode(const uint8_t* data, size_t n) {
  static const char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((n + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= n; i += 3) {
    const uint32_t v = uint32_t(data[i]) << 16 | uint32_t(data[i + 1]) << 8 | data[i + 2];
    for (int k = 18; k >= 0; k -= 6) out.push_back(kAlphabet[(v >> k) & 63]);
  }
  if (i < n) {
    const bool two = i + 1 < n;
    const uint32_t v = uint32_t(data[i]) << 16 | (two ? uint32_t(data[i + 1]) << 8 : 0);
    out.push_back(kAlphabet[(v >> 18) & 63]);
    out.push_back(kAlphabet[(v >> 12) & 63]);
    out.push_back(two ? kAlphabet[(v >> 6) & 63] : '=');
    out.push_back('=');
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Images

Image decode_request_image_bytes(const uint8_t* data, size_t n, const std::string& field, const Limits& lim) {
  if (n == 0) throw RequestError(400, field, cat(field, ": empty image"));
  const int64_t max_pixels = lim.max_pixels * 4;
  auto too_large = [&](const char* what, int64_t w, int64_t h) {
    return RequestError(400, field,
                        cat(field, ": the image ", what, " ", w, "x", h, " pixels; the limit is ", max_pixels,
                            " pixels (4 x the server's --max-pixels)"));
  };
  uint32_t w = 0, h = 0;
  // (Each side is below 2^32: the product fits in uint64.)
  if (declared_size(data, n, &w, &h) && uint64_t(w) * h > uint64_t(std::max<int64_t>(max_pixels, 0)))
    throw too_large("declares", w, h);
  Image im;
  try {
    im = decode_image(data, n, field);  // messages start with the field: "<field>: bad PNG: ..."
  } catch (const Error& e) {
    throw RequestError(400, field, e.what());
  }
  if (int64_t(im.width) * int64_t(im.height) > max_pixels) throw too_large("is", im.width, im.height);
  return im;
}

Image decode_request_image(const std::string& s, const std::string& field, const Limits& lim) {
  std::string_view v = trim(s);
  if (v.empty()) throw RequestError(400, field, cat(field, ": empty image"));
  if (istarts_with(v, "http://") || istarts_with(v, "https://"))
    throw RequestError(400, field, cat(field, ": image URLs are not fetched; send the image as base64 or a data: URL"));
  if (istarts_with(v, "data:")) {
    // data:[<media type>][;params];base64,<data>: the decoder tells the format from the bytes.
    const size_t comma = v.find(',');
    if (comma == std::string_view::npos)
      throw RequestError(400, field, cat(field, ": malformed data: URL (no comma before the data)"));
    const std::string_view header = v.substr(0, comma);
    if (header.size() < 7 || !iequals(header.substr(header.size() - 7), ";base64"))
      throw RequestError(400, field, cat(field, ": only base64 data: URLs are accepted (data:image/png;base64,...)"));
    v.remove_prefix(comma + 1);
  }
  const std::vector<uint8_t> bytes = base64_decode_view(v, field);
  return decode_request_image_bytes(bytes.data(), bytes.size(), field, lim);
}

}  // namespace diffuse::server

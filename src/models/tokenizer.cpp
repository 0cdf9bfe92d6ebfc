// CLIP BPE tokenizer: see tokenizer.h for the semantics.
#include "models/tokenizer.h"

#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "core/error.h"

namespace diffuse {

namespace {

constexpr char32_t kReplacement = 0xFFFD;
constexpr const char* kBosText = "<|startoftext|>";
constexpr const char* kEosText = "<|endoftext|>";
constexpr int kBuiltinMerges = 49152 - 256 - 2;  // 48894: CLIP uses lines 2..48895 of the file

// ---------------------------------------------------------------------------------------------
// UTF-8

void put_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Decodes one code point at s[i]; on invalid input returns U+FFFD and consumes the maximal
// invalid prefix (at least one byte), as Python's errors="replace" does.
char32_t next_cp(std::string_view s, size_t& i) {
  auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = b(i);
  if (c < 0x80) {
    ++i;
    return c;
  }
  int n;
  char32_t cp;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    n = 1, cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 2, cp = c & 0x0F;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;  // no surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 3, cp = c & 0x07;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    ++i;
    return kReplacement;
  }
  size_t j = i + 1;
  for (int k = 0; k < n; ++k, ++j) {
    if (j >= s.size()) {
      i = j;
      return kReplacement;
    }
    unsigned char cc = b(j);
    unsigned char l = k == 0 ? lo : 0x80, h = k == 0 ? hi : 0xBF;
    if (cc < l || cc > h) {
      i = j;
      return kReplacement;
    }
    cp = (cp << 6) | (cc & 0x3F);
  }
  i = j;
  return cp;
}

std::u32string to_cps(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) out += next_cp(s, i);
  return out;
}

std::string to_utf8(std::u32string_view cps) {
  std::string out;
  out.reserve(cps.size());
  for (char32_t c : cps) put_utf8(out, c);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Character classes

bool is_space(char32_t c) {  // Python str.isspace()
  return (c >= 9 && c <= 13) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

utf8proc_category_t category(char32_t c) {
  return utf8proc_category(static_cast<utf8proc_int32_t>(c));
}
bool is_letter(char32_t c) {
  auto k = category(c);
  return k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO;
}
bool is_number(char32_t c) {
  auto k = category(c);
  return k >= UTF8PROC_CATEGORY_ND && k <= UTF8PROC_CATEGORY_NO;
}
bool is_cased(char32_t c) {
  auto k = category(c);
  // Unicode "Cased" also covers Other_Uppercase/Other_Lowercase (e.g. Roman numerals): approximate
  // those by "has a case mapping".
  const auto ci = static_cast<utf8proc_int32_t>(c);
  return k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT ||
         utf8proc_tolower(ci) != ci || utf8proc_toupper(ci) != ci;
}
bool is_case_ignorable(char32_t c) {
  auto k = category(c);
  return k == UTF8PROC_CATEGORY_MN || k == UTF8PROC_CATEGORY_ME || k == UTF8PROC_CATEGORY_CF ||
         k == UTF8PROC_CATEGORY_LM || k == UTF8PROC_CATEGORY_SK || c == '\'' || c == '.' || c == ':' ||
         c == 0xB7 || c == 0x2019;
}

// ---------------------------------------------------------------------------------------------
// HTML character references (Python html.unescape rules, a subset of the named entities)

struct Entity {
  const char* name;
  char32_t cp;
  bool legacy;  // also recognised without the trailing ';'
};
constexpr Entity kEntities[] = {
    {"amp", '&', true},       {"AMP", '&', true},       {"lt", '<', true},
    {"LT", '<', true},        {"gt", '>', true},        {"GT", '>', true},
    {"quot", '"', true},      {"QUOT", '"', true},      {"apos", '\'', false},
    {"nbsp", 0xA0, true},     {"copy", 0xA9, true},     {"COPY", 0xA9, true},
    {"reg", 0xAE, true},      {"REG", 0xAE, true},      {"deg", 0xB0, true},
    {"times", 0xD7, true},    {"divide", 0xF7, true},   {"laquo", 0xAB, true},
    {"raquo", 0xBB, true},    {"middot", 0xB7, true},   {"cent", 0xA2, true},
    {"pound", 0xA3, true},    {"yen", 0xA5, true},      {"sect", 0xA7, true},
    {"para", 0xB6, true},     {"plusmn", 0xB1, true},   {"micro", 0xB5, true},
    {"frac12", 0xBD, true},   {"frac14", 0xBC, true},   {"frac34", 0xBE, true},
    {"sup2", 0xB2, true},     {"sup3", 0xB3, true},     {"iexcl", 0xA1, true},
    {"iquest", 0xBF, true},   {"euro", 0x20AC, false},  {"hellip", 0x2026, false},
    {"mdash", 0x2014, false}, {"ndash", 0x2013, false}, {"lsquo", 0x2018, false},
    {"rsquo", 0x2019, false}, {"ldquo", 0x201C, false}, {"rdquo", 0x201D, false},
    {"bull", 0x2022, false},  {"trade", 0x2122, false}, {"eacute", 0xE9, true},
    {"egrave", 0xE8, true},   {"aacute", 0xE1, true},   {"agrave", 0xE0, true},
    {"iuml", 0xEF, true},     {"ouml", 0xF6, true},     {"uuml", 0xFC, true},
    {"auml", 0xE4, true},     {"ccedil", 0xE7, true},   {"ntilde", 0xF1, true},
    {"szlig", 0xDF, true},
};

const Entity* find_entity(std::string_view name, bool with_semicolon) {
  for (const Entity& e : kEntities)
    if (name == e.name && (with_semicolon || e.legacy)) return &e;
  return nullptr;
}

// Numeric reference value -> replacement text (Python html._replace_charref).
void put_charref(std::string& out, uint64_t num, bool overflow) {
  // Windows-1252 for the C1 range, per the HTML5 spec.
  static constexpr char32_t kC1[32] = {
      0x20AC, 0x81,   0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
      0x2039, 0x0152, 0x8D,   0x017D, 0x8F,   0x90,   0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
      0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x9D,   0x017E, 0x0178};
  if (overflow || num > 0x10FFFF || (num >= 0xD800 && num <= 0xDFFF) || num == 0) {
    put_utf8(out, kReplacement);
  } else if (num == 0x0D) {
    out += '\r';
  } else if (num >= 0x80 && num <= 0x9F) {
    put_utf8(out, kC1[num - 0x80]);
  } else if ((num >= 0x1 && num <= 0x8) || num == 0xB || (num >= 0xE && num <= 0x1F) || num == 0x7F ||
             (num >= 0xFDD0 && num <= 0xFDEF) || (num & 0xFFFE) == 0xFFFE) {
    // invalid code points vanish
  } else {
    put_utf8(out, static_cast<char32_t>(num));
  }
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// ---------------------------------------------------------------------------------------------
// GPT-2 byte <-> symbol mapping

struct ByteMap {
  char32_t byte_to_cp[256];
  int byte_order[256];  // base vocabulary index of each byte
  int order_byte[256];  // inverse
  ByteMap() {
    auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE); };
    int next_extra = 0, index = 0;
    for (int b = 0; b < 256; ++b) {
      if (printable(b)) {
        byte_to_cp[b] = static_cast<char32_t>(b);
        byte_order[b] = index;
        order_byte[index++] = b;
      } else {
        extra_byte[next_extra] = b;
        byte_to_cp[b] = static_cast<char32_t>(256 + next_extra++);
      }
    }
    for (int b = 0; b < 256; ++b) {
      if (!printable(b)) {
        byte_order[b] = index;
        order_byte[index++] = b;
      }
    }
  }
  int extra_byte[68];  // byte of symbol U+0100+n (68 = bytes outside the printable ranges)
  // -1 when cp is not a byte symbol
  int cp_to_byte(char32_t cp) const {
    if (cp < 256) return byte_to_cp[cp] == cp ? static_cast<int>(cp) : -1;
    if (cp < 256 + 68) return extra_byte[cp - 256];
    return -1;
  }
};

const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

std::string symbols_to_bytes_impl(std::string_view symbols, bool strict) {
  const ByteMap& m = byte_map();
  std::string out;
  out.reserve(symbols.size());
  for (size_t i = 0; i < symbols.size();) {
    size_t start = i;
    char32_t cp = next_cp(symbols, i);
    int b = m.cp_to_byte(cp);
    if (b >= 0) {
      out += static_cast<char>(b);
    } else {
      DF_CHECK(!strict, "tokenizer: '", std::string(symbols.substr(start, i - start)),
               "' is not a byte symbol");
      out.append(symbols.substr(start, i - start));
    }
  }
  return out;
}

std::string read_file(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  DF_CHECK(f, "tokenizer: cannot open ", p.string());
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::vector<std::string_view> split_lines(std::string_view text) {
  std::vector<std::string_view> lines;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) nl = text.size();
    std::string_view line = text.substr(pos, nl - pos);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    lines.push_back(line);
    pos = nl + 1;
  }
  if (!lines.empty() && lines.back().empty()) lines.pop_back();
  return lines;
}

using MergeList = std::vector<std::pair<std::string, std::string>>;

}  // namespace

// ---------------------------------------------------------------------------------------------

struct ClipTokenizer::Impl {
  std::vector<std::string> id_to_token;
  std::unordered_map<std::string, int> token_to_id;
  std::unordered_map<uint64_t, std::pair<int, int>> merges;  // (left, right) -> (rank, merged id)
  int byte_id[256] = {};
  int byte_eow_id[256] = {};
  int bos = -1, eos = -1, bang = -1;
  mutable std::mutex mu;
  mutable std::unordered_map<std::string, std::vector<int>> cache;

  static uint64_t key(int a, int b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  int lookup(const std::string& t) const {
    auto it = token_to_id.find(t);
    return it == token_to_id.end() ? -1 : it->second;
  }

  // vocab: token -> id; merges in rank order. `origin` names the source in error messages.
  static std::unique_ptr<Impl> build(std::unordered_map<std::string, int> vocab, const MergeList& merges,
                                     const std::string& origin) {
    auto impl = std::make_unique<Impl>();
    int max_id = -1;
    for (auto& [tok, id] : vocab) {
      DF_CHECK(id >= 0 && id < (1 << 24), "tokenizer ", origin, ": token '", tok, "' has bad id ", id);
      max_id = std::max(max_id, id);
    }
    impl->id_to_token.assign(static_cast<size_t>(max_id + 1), std::string());
    for (auto& [tok, id] : vocab) impl->id_to_token[static_cast<size_t>(id)] = tok;
    impl->token_to_id = std::move(vocab);

    const ByteMap& m = byte_map();
    for (int b = 0; b < 256; ++b) {
      std::string sym;
      put_utf8(sym, m.byte_to_cp[b]);
      impl->byte_id[b] = impl->lookup(sym);
      impl->byte_eow_id[b] = impl->lookup(sym + "</w>");
      DF_CHECK(impl->byte_id[b] >= 0 && impl->byte_eow_id[b] >= 0, "tokenizer ", origin,
               ": vocabulary lacks the byte symbol for byte ", b, " ('", sym, "')");
    }
    impl->bos = impl->lookup(kBosText);
    impl->eos = impl->lookup(kEosText);
    impl->bang = impl->lookup("!");
    DF_CHECK(impl->bos >= 0 && impl->eos >= 0, "tokenizer ", origin, ": vocabulary lacks ", kBosText,
             " or ", kEosText);

    impl->merges.reserve(merges.size() * 2);
    int rank = 0;
    for (const auto& [a, b] : merges) {
      int ia = impl->lookup(a), ib = impl->lookup(b), ir = impl->lookup(a + b);
      // A merge whose parts or result are not in the vocabulary can never yield a known token.
      if (ia >= 0 && ib >= 0 && ir >= 0) impl->merges.emplace(key(ia, ib), std::make_pair(rank, ir));
      ++rank;
    }
    DF_CHECK(!impl->merges.empty(), "tokenizer ", origin, ": no usable merges");
    return impl;
  }

  std::vector<int> run_bpe(std::string_view piece) const {
    struct Sym {
      int id, prev, next;
    };
    const size_t n = piece.size();
    std::vector<Sym> syms(n);
    for (size_t i = 0; i < n; ++i) {
      unsigned char b = static_cast<unsigned char>(piece[i]);
      syms[i] = {i + 1 == n ? byte_eow_id[b] : byte_id[b], static_cast<int>(i) - 1,
                 i + 1 == n ? -1 : static_cast<int>(i) + 1};
    }
    // Candidate merges ordered by (rank, position): lowest rank first, leftmost first among equal
    // ranks. Equivalent to CLIP's "merge every occurrence of the best pair" loop because a merged
    // pair's result only takes part in merges of higher rank. Stale entries are re-validated.
    struct Cand {
      int rank, pos, left, right;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto push = [&](int pos) {
      if (pos < 0 || syms[pos].next < 0) return;
      auto it = merges.find(key(syms[pos].id, syms[syms[pos].next].id));
      if (it != merges.end()) heap.push({it->second.first, pos, syms[pos].id, syms[syms[pos].next].id});
    };
    for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int>(i));
    while (!heap.empty()) {
      Cand c = heap.top();
      heap.pop();
      Sym& s = syms[c.pos];
      if (s.id != c.left || s.next < 0 || syms[s.next].id != c.right) continue;
      s.id = merges.at(key(c.left, c.right)).second;
      Sym& dead = syms[s.next];
      s.next = dead.next;
      if (dead.next >= 0) syms[dead.next].prev = c.pos;
      dead.id = -1;
      push(s.prev);
      push(c.pos);
    }
    std::vector<int> out;
    for (int i = n ? 0 : -1; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
    return out;
  }
};

ClipTokenizer::ClipTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ClipTokenizer::ClipTokenizer(ClipTokenizer&&) noexcept = default;
ClipTokenizer& ClipTokenizer::operator=(ClipTokenizer&&) noexcept = default;
ClipTokenizer::~ClipTokenizer() = default;

const ClipTokenizer& ClipTokenizer::builtin() {
  static const ClipTokenizer tok = [] {
    std::string text = detail::clip_vocab_text();
    std::vector<std::string_view> lines = split_lines(text);
    DF_CHECK(lines.size() >= static_cast<size_t>(kBuiltinMerges + 1),
             "embedded CLIP vocabulary has only ", lines.size(), " lines");
    const ByteMap& m = byte_map();
    std::unordered_map<std::string, int> vocab;
    vocab.reserve(49408);
    int id = 0;
    for (int i = 0; i < 256; ++i) {
      std::string sym;
      put_utf8(sym, m.byte_to_cp[m.order_byte[i]]);
      vocab.emplace(sym, id++);
    }
    for (int i = 0; i < 256; ++i) {
      std::string sym;
      put_utf8(sym, m.byte_to_cp[m.order_byte[i]]);
      vocab.emplace(sym + "</w>", id++);
    }
    MergeList merges;
    merges.reserve(kBuiltinMerges);
    for (int i = 1; i <= kBuiltinMerges; ++i) {
      std::string_view line = lines[static_cast<size_t>(i)];
      size_t sp = line.find(' ');
      DF_CHECK(sp != std::string_view::npos && line.find(' ', sp + 1) == std::string_view::npos,
               "embedded CLIP vocabulary: bad merge line ", i + 1);
      merges.emplace_back(std::string(line.substr(0, sp)), std::string(line.substr(sp + 1)));
      bool fresh = vocab.emplace(merges.back().first + merges.back().second, id++).second;
      DF_CHECK(fresh, "embedded CLIP vocabulary: duplicate merge on line ", i + 1);
    }
    vocab.emplace(kBosText, id++);
    vocab.emplace(kEosText, id++);
    return ClipTokenizer(Impl::build(std::move(vocab), merges, "(built-in CLIP vocabulary)"));
  }();
  return tok;
}

ClipTokenizer ClipTokenizer::from_diffusers_dir(const std::string& dir_in) {
  namespace fs = std::filesystem;
  fs::path dir(dir_in);
  auto has_files = [](const fs::path& d) {
    return (fs::exists(d / "vocab.json") && fs::exists(d / "merges.txt")) || fs::exists(d / "tokenizer.json");
  };
  if (!has_files(dir) && has_files(dir / "tokenizer")) dir /= "tokenizer";
  std::unordered_map<std::string, int> vocab;
  MergeList merges;
  try {
    if (fs::exists(dir / "vocab.json") && fs::exists(dir / "merges.txt")) {
      auto j = nlohmann::json::parse(read_file(dir / "vocab.json"));
      DF_CHECK(j.is_object(), "tokenizer: ", (dir / "vocab.json").string(), " is not a JSON object");
      for (auto& [tok, id] : j.items()) vocab[tok] = id.get<int>();
      std::string text = read_file(dir / "merges.txt");
      std::vector<std::string_view> lines = split_lines(text);
      for (size_t i = 0; i < lines.size(); ++i) {
        std::string_view line = lines[i];
        if (line.empty() || (i == 0 && line.rfind("#version", 0) == 0)) continue;
        size_t sp = line.find(' ');
        DF_CHECK(sp != std::string_view::npos && sp > 0 && sp + 1 < line.size(), "tokenizer: ",
                 (dir / "merges.txt").string(), " line ", i + 1, ": expected \"a b\"");
        merges.emplace_back(std::string(line.substr(0, sp)), std::string(line.substr(sp + 1)));
      }
    } else if (fs::exists(dir / "tokenizer.json")) {
      auto j = nlohmann::json::parse(read_file(dir / "tokenizer.json"));
      DF_CHECK(j.is_object() && j.contains("model") && j["model"].is_object(), "tokenizer: ",
               (dir / "tokenizer.json").string(), " has no \"model\"");
      const auto& model = j["model"];
      DF_CHECK(!model.contains("type") || model["type"] == "BPE", "tokenizer: ",
               (dir / "tokenizer.json").string(), " is not a BPE model");
      DF_CHECK(model.contains("vocab") && model["vocab"].is_object() && model.contains("merges") &&
                   model["merges"].is_array(),
               "tokenizer: ", (dir / "tokenizer.json").string(), " lacks model.vocab or model.merges");
      for (auto& [tok, id] : model["vocab"].items()) vocab[tok] = id.get<int>();
      for (const auto& mj : model["merges"]) {
        if (mj.is_string()) {
          std::string s = mj.get<std::string>();
          size_t sp = s.find(' ');
          DF_CHECK(sp != std::string::npos && sp > 0 && sp + 1 < s.size(), "tokenizer: bad merge \"", s, "\"");
          merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
        } else {
          DF_CHECK(mj.is_array() && mj.size() == 2, "tokenizer: merge entry is neither \"a b\" nor [a, b]");
          merges.emplace_back(mj[0].get<std::string>(), mj[1].get<std::string>());
        }
      }
      if (j.contains("added_tokens") && j["added_tokens"].is_array())
        for (const auto& t : j["added_tokens"])
          if (t.contains("content") && t.contains("id"))
            vocab.emplace(t["content"].get<std::string>(), t["id"].get<int>());
    } else {
      fail("tokenizer: ", dir_in, " has neither vocab.json + merges.txt nor tokenizer.json");
    }
  } catch (const nlohmann::json::exception& e) {
    fail("tokenizer: bad JSON in ", dir.string(), ": ", e.what());
  }
  return ClipTokenizer(Impl::build(std::move(vocab), merges, dir.string()));
}

// ---------------------------------------------------------------------------------------------
// Text pieces

std::string ClipTokenizer::sanitize_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) put_utf8(out, next_cp(s, i));
  return out;
}

std::string ClipTokenizer::html_unescape(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    if (s[i] != '&') {
      out += s[i++];
      continue;
    }
    size_t j = i + 1;
    if (j < s.size() && s[j] == '#') {
      bool hex = j + 1 < s.size() && (s[j + 1] == 'x' || s[j + 1] == 'X');
      size_t k = j + (hex ? 2 : 1), start = k;
      uint64_t num = 0;
      bool overflow = false;
      while (k < s.size() && (hex ? hex_value(s[k]) >= 0 : (s[k] >= '0' && s[k] <= '9'))) {
        num = num * (hex ? 16 : 10) + static_cast<uint64_t>(hex ? hex_value(s[k]) : s[k] - '0');
        if (num > 0x10FFFF) overflow = true, num = 0x110000;
        ++k;
      }
      if (k == start) {  // "&#" without digits stays as is
        out += s[i++];
        continue;
      }
      if (k < s.size() && s[k] == ';') ++k;
      put_charref(out, num, overflow);
      i = k;
      continue;
    }
    // Named: up to 32 chars that are not \t \n \f space < & # ; then an optional ';'.
    size_t k = j;
    while (k < s.size() && k - j < 32 && std::string_view("\t\n\f <&#;").find(s[k]) == std::string_view::npos) ++k;
    if (k == j) {
      out += s[i++];
      continue;
    }
    std::string_view name = s.substr(j, k - j);
    bool semi = k < s.size() && s[k] == ';';
    if (const Entity* e = find_entity(name, semi)) {
      put_utf8(out, e->cp);
      i = k + (semi ? 1 : 0);
      continue;
    }
    // Longest legacy prefix (at least 2 chars), the rest kept literally.
    bool done = false;
    for (size_t len = name.size() - (semi ? 0 : 1); len >= 2 && len <= name.size(); --len) {
      if (const Entity* e = find_entity(name.substr(0, len), false)) {
        put_utf8(out, e->cp);
        i = j + len;
        done = true;
        break;
      }
    }
    if (!done) out += s[i++];
  }
  return out;
}

std::string ClipTokenizer::clean_text(std::string_view s) {
  std::string text = html_unescape(html_unescape(sanitize_utf8(s)));
  if (!text.empty()) {
    utf8proc_uint8_t* nfc = nullptr;
    utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                                      static_cast<utf8proc_ssize_t>(text.size()), &nfc,
                                      static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    DF_CHECK(n >= 0, "tokenizer: Unicode normalisation failed: ", utf8proc_errmsg(n));
    text.assign(reinterpret_cast<const char*>(nfc), static_cast<size_t>(n));
    std::free(nfc);
  }
  std::u32string cps = to_cps(text);
  // Whitespace runs -> one space, ends stripped.
  std::u32string ws;
  ws.reserve(cps.size());
  for (char32_t c : cps) {
    if (is_space(c)) {
      if (!ws.empty() && ws.back() != U' ') ws += U' ';
    } else {
      ws += c;
    }
  }
  if (!ws.empty() && ws.back() == U' ') ws.pop_back();
  // Lower-case (full mapping for U+0130, final sigma as Python's str.lower()).
  std::u32string low;
  low.reserve(ws.size());
  for (size_t i = 0; i < ws.size(); ++i) {
    char32_t c = ws[i];
    if (c == 0x130) {
      low += U'i';
      low += char32_t(0x307);
    } else if (c == 0x3A3) {
      size_t p = i;
      while (p > 0 && is_case_ignorable(ws[p - 1])) --p;
      bool before = p > 0 && is_cased(ws[p - 1]);
      size_t q = i + 1;
      while (q < ws.size() && is_case_ignorable(ws[q])) ++q;
      bool after = q < ws.size() && is_cased(ws[q]);
      low += (before && !after) ? char32_t(0x3C2) : char32_t(0x3C3);
    } else {
      low += static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c)));
    }
  }
  return to_utf8(low);
}

std::vector<std::string> ClipTokenizer::pre_tokenize(std::string_view cleaned) {
  std::u32string cps = to_cps(cleaned);
  auto lower = [](char32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; };
  auto starts_with = [&](size_t i, std::string_view lit) {
    if (i + lit.size() > cps.size()) return false;
    for (size_t k = 0; k < lit.size(); ++k)
      if (lower(cps[i + k]) != static_cast<char32_t>(lit[k])) return false;
    return true;
  };
  std::vector<std::string> pieces;
  size_t i = 0;
  while (i < cps.size()) {
    char32_t c = cps[i];
    size_t end = i;
    if (starts_with(i, kBosText)) {
      end = i + std::string_view(kBosText).size();
    } else if (starts_with(i, kEosText)) {
      end = i + std::string_view(kEosText).size();
    } else if (c == '\'' && (starts_with(i, "'s") || starts_with(i, "'t") || starts_with(i, "'m") ||
                             starts_with(i, "'d"))) {
      end = i + 2;
    } else if (c == '\'' && (starts_with(i, "'re") || starts_with(i, "'ve") || starts_with(i, "'ll"))) {
      end = i + 3;
    } else if (is_letter(c)) {
      end = i + 1;
      while (end < cps.size() && is_letter(cps[end])) ++end;
    } else if (is_number(c)) {
      end = i + 1;
    } else if (is_space(c)) {
      ++i;
      continue;
    } else {
      end = i + 1;
      while (end < cps.size() && !is_space(cps[end]) && !is_letter(cps[end]) && !is_number(cps[end])) ++end;
    }
    pieces.push_back(to_utf8(std::u32string_view(cps).substr(i, end - i)));
    i = end;
  }
  return pieces;
}

std::string ClipTokenizer::bytes_to_symbols(std::string_view bytes) {
  const ByteMap& m = byte_map();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char b : bytes) put_utf8(out, m.byte_to_cp[static_cast<unsigned char>(b)]);
  return out;
}

std::string ClipTokenizer::symbols_to_bytes(std::string_view symbols) {
  return symbols_to_bytes_impl(symbols, true);
}

// ---------------------------------------------------------------------------------------------
// Encoding

std::vector<int> ClipTokenizer::bpe(const std::string& piece) const {
  if (piece.empty()) return {};
  if (piece == kBosText) return {impl_->bos};
  if (piece == kEosText) return {impl_->eos};
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    auto it = impl_->cache.find(piece);
    if (it != impl_->cache.end()) return it->second;
  }
  std::vector<int> ids = impl_->run_bpe(piece);
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->cache.size() > 65536) impl_->cache.clear();
  impl_->cache.emplace(piece, ids);
  return ids;
}

std::vector<int> ClipTokenizer::tokenize(const std::string& text, bool bang_is_pad) const {
  std::vector<int> out;
  auto segment = [&](std::string_view seg) {
    for (const std::string& piece : pre_tokenize(clean_text(seg))) {
      std::vector<int> ids = bpe(piece);
      out.insert(out.end(), ids.begin(), ids.end());
    }
  };
  if (bang_is_pad && impl_->bang >= 0) {
    // diffusers' tokenizer treats the "!" pad token as special: split on it before anything else.
    size_t pos = 0;
    while (true) {
      size_t bang = text.find('!', pos);
      segment(std::string_view(text).substr(pos, bang == std::string::npos ? std::string::npos : bang - pos));
      if (bang == std::string::npos) break;
      out.push_back(impl_->bang);
      pos = bang + 1;
    }
  } else {
    segment(text);
  }
  return out;
}

std::vector<int> ClipTokenizer::encode(const std::string& text, bool bang_is_pad) const {
  std::vector<int> ids = tokenize(text, bang_is_pad);
  ids.insert(ids.begin(), impl_->bos);
  ids.push_back(impl_->eos);
  return ids;
}

std::vector<int> ClipTokenizer::encode_padded(const std::string& text, int pad_id, int length) const {
  DF_CHECK(length >= 2, "tokenizer: padded length ", length, " is too short for BOS and EOS");
  DF_CHECK(pad_id >= 0 && pad_id < vocab_size(), "tokenizer: pad id ", pad_id, " is outside the vocabulary");
  std::vector<int> ids = tokenize(text, pad_id == impl_->bang);
  if (ids.size() > static_cast<size_t>(length - 2)) ids.resize(static_cast<size_t>(length - 2));
  std::vector<int> out;
  out.reserve(static_cast<size_t>(length));
  out.push_back(impl_->bos);
  out.insert(out.end(), ids.begin(), ids.end());
  out.push_back(impl_->eos);
  out.resize(static_cast<size_t>(length), pad_id);
  return out;
}

std::string ClipTokenizer::decode(const std::vector<int>& ids) const {
  std::string bytes;
  for (int id : ids) {
    if (id == impl_->bos || id == impl_->eos) continue;
    bytes += symbols_to_bytes_impl(token(id), false);
  }
  std::string text;
  text.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    if (bytes.compare(i, 4, "</w>") == 0) {
      text += ' ';
      i += 4;
    } else {
      text += bytes[i++];
    }
  }
  size_t b = text.find_first_not_of(' '), e = text.find_last_not_of(' ');
  if (b == std::string::npos) return {};
  return sanitize_utf8(std::string_view(text).substr(b, e - b + 1));
}

int ClipTokenizer::bos_id() const { return impl_->bos; }
int ClipTokenizer::eos_id() const { return impl_->eos; }
int ClipTokenizer::bang_id() const { return impl_->bang; }
int ClipTokenizer::vocab_size() const { return static_cast<int>(impl_->id_to_token.size()); }

const std::string& ClipTokenizer::token(int id) const {
  DF_CHECK(id >= 0 && id < vocab_size(), "tokenizer: id ", id, " is outside the vocabulary (size ",
           vocab_size(), ")");
  return impl_->id_to_token[static_cast<size_t>(id)];
}

int ClipTokenizer::token_id(const std::string& t) const { return impl_->lookup(t); }

}  // namespace diffuse

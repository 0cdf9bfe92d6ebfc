// A1111 prompt weighting (parse_prompt_attention) and A1111's chunking of weighted token runs
// (tokenize_line), written from their documented behaviour.
#include <cmath>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "core/error.h"
#include "pipeline/conditioning.h"

namespace diffuse {

namespace {

constexpr double kRoundMult = 1.1;
constexpr double kSquareMult = 1.0 / 1.1;

struct Run {
  std::string text;
  double weight;
};

// Python's \s for the characters a prompt plausibly holds (ASCII whitespace, \x1c-\x1f, NBSP and
// the common Unicode spaces). Returns the byte length of the whitespace at s[i], 0 if none.
size_t space_at(std::string_view s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  if (c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f)) return 1;
  auto at = [&](const char* seq) {
    const size_t n = std::strlen(seq);
    return s.compare(i, n, seq) == 0 ? n : 0;
  };
  if (size_t n = at("\xC2\xA0")) return n;  // U+00A0
  if (size_t n = at("\xC2\x85")) return n;  // U+0085
  if (size_t n = at("\xE3\x80\x80")) return n;  // U+3000
  if (s.compare(i, 2, "\xE2\x80") == 0 && i + 2 < s.size()) {
    const unsigned char d = static_cast<unsigned char>(s[i + 2]);
    if (d <= 0x8a || d == 0xa8 || d == 0xa9 || d == 0xaf) return 3;  // U+2000..200A, 2028, 2029, 202F
  }
  return 0;
}

// Python's \w around a \b: ASCII alphanumerics and "_"; any non-ASCII code point counts as a word
// character unless it is whitespace (an approximation of Unicode's letter/digit classes).
bool word_at(std::string_view s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return std::isalnum(c) || c == '_';
  return space_at(s, i) == 0;
}

// Start of the UTF-8 character that ends just before byte i.
size_t prev_char(std::string_view s, size_t i) {
  size_t j = i - 1;
  while (j > 0 && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80) --j;
  return j;
}

// re.split(r"\s*\bBREAK\b\s*", text): the pieces between whole-word BREAKs and their surrounding
// whitespace.
std::vector<std::string> split_break(std::string_view t) {
  std::vector<std::string> parts;
  size_t piece_start = 0, pos = 0;
  while (true) {
    size_t found = std::string_view::npos, match_begin = 0, match_end = 0;
    for (size_t k = t.find("BREAK", pos); k != std::string_view::npos; k = t.find("BREAK", k + 1)) {
      const bool left = k == 0 || !word_at(t, prev_char(t, k));
      const bool right = k + 5 >= t.size() || !word_at(t, k + 5);
      if (!left || !right) continue;
      found = k;
      // Leading whitespace: the earliest start from which \s* reaches k (not before `pos`, where
      // the previous match ended).
      match_begin = k;
      while (match_begin > pos) {
        const size_t p = prev_char(t, match_begin);
        if (space_at(t, p) != match_begin - p) break;
        match_begin = p;
      }
      match_end = k + 5;
      while (match_end < t.size()) {
        const size_t n = space_at(t, match_end);
        if (n == 0) break;
        match_end += n;
      }
      break;
    }
    if (found == std::string_view::npos) break;
    parts.emplace_back(t.substr(piece_start, match_begin - piece_start));
    piece_start = pos = match_end;
  }
  parts.emplace_back(t.substr(piece_start));
  return parts;
}

// float(s) for s matching [+-]?[.\d]+ (Python accepts "1.", ".5"; rejects ".", "1.2.3").
double parse_weight(const std::string& s, const std::string& prompt) {
  bool digit = false;
  int dots = 0;
  for (char c : s) {
    if (c >= '0' && c <= '9') digit = true;
    if (c == '.') ++dots;
  }
  DF_CHECK(digit && dots <= 1, "prompt weight ':", s, ")' in \"", prompt,
           "\" is not a number (expected e.g. (word:1.2))");
  return std::strtod(s.c_str(), nullptr);
}

}  // namespace

std::vector<WeightedText> parse_prompt_weights(const std::string& prompt) {
  std::vector<Run> res;
  std::vector<size_t> round, square;
  auto multiply_range = [&](size_t start, double m) {
    for (size_t p = start; p < res.size(); ++p) res[p].weight *= m;
  };
  auto add_text = [&](std::string_view text) {
    std::vector<std::string> parts = split_break(text);
    for (size_t i = 0; i < parts.size(); ++i) {
      if (i > 0) res.push_back({"BREAK", -1.0});
      res.push_back({parts[i], 1.0});
    }
  };

  const std::string& s = prompt;
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const char c = s[i];
    if (c == '\\') {
      // \( \) \[ \] \\ give the character; a lone backslash gives nothing.
      if (i + 1 < n && std::strchr("()[]\\", s[i + 1]) != nullptr && s[i + 1] != '\0') {
        res.push_back({std::string(1, s[i + 1]), 1.0});
        i += 2;
      } else {
        res.push_back({"", 1.0});
        i += 1;
      }
      continue;
    }
    if (c == '(') {
      round.push_back(res.size());
      ++i;
      continue;
    }
    if (c == '[') {
      square.push_back(res.size());
      ++i;
      continue;
    }
    if (c == ':') {
      // :([+-]?[.\d]+)\)
      size_t j = i + 1;
      if (j < n && (s[j] == '+' || s[j] == '-')) ++j;
      const size_t num_begin = j;
      while (j < n && (s[j] == '.' || (s[j] >= '0' && s[j] <= '9'))) ++j;
      if (j > num_begin && j < n && s[j] == ')') {
        const std::string num = s.substr(i + 1, j - i - 1);
        if (!round.empty()) {
          const double w = parse_weight(num, prompt);
          multiply_range(round.back(), w);
          round.pop_back();
        } else {
          add_text(std::string_view(s).substr(i, j + 1 - i));
        }
        i = j + 1;
        continue;
      }
      add_text(":");
      ++i;
      continue;
    }
    if (c == ')') {
      if (!round.empty()) {
        multiply_range(round.back(), kRoundMult);
        round.pop_back();
      } else {
        add_text(")");
      }
      ++i;
      continue;
    }
    if (c == ']') {
      if (!square.empty()) {
        multiply_range(square.back(), kSquareMult);
        square.pop_back();
      } else {
        add_text("]");
      }
      ++i;
      continue;
    }
    // [^\\()\[\]:]+
    size_t j = i;
    while (j < n && std::strchr("\\()[]:", s[j]) == nullptr) ++j;
    add_text(std::string_view(s).substr(i, j - i));
    i = j;
  }
  for (size_t p : round) multiply_range(p, kRoundMult);
  for (size_t p : square) multiply_range(p, kSquareMult);
  if (res.empty()) res.push_back({"", 1.0});

  // Merge runs of identical weight (compared in double, as Python does).
  std::vector<Run> merged;
  for (Run& r : res) {
    if (!merged.empty() && merged.back().weight == r.weight)
      merged.back().text += r.text;
    else
      merged.push_back(std::move(r));
  }
  std::vector<WeightedText> out;
  out.reserve(merged.size());
  for (Run& r : merged) {
    // A weight the text encoder's f32 arithmetic cannot hold would make every latent NaN.
    const bool is_break = r.weight == -1.0 && r.text == "BREAK";
    DF_CHECK(is_break || std::isfinite(float(r.weight)), "prompt weight ", r.weight, " (of \"", r.text.substr(0, 40),
             r.text.size() > 40 ? "…" : "", "\") cannot be represented as a 32-bit float (too large a weight, or too many nested brackets)");
    out.push_back({std::move(r.text), float(r.weight)});
  }
  return out;
}

int pad_token(Family family, int encoder, const ClipTokenizer& tok) {
  if (family == Family::SD2 || (family == Family::SDXL && encoder == 1)) return tok.bang_id();
  return tok.eos_id();
}

TokenChunk empty_chunk(int pad_id, const ClipTokenizer& tok) {
  return chunk_weighted({}, pad_id, tok).front();
}

std::vector<TokenChunk> chunk_weighted(const std::vector<WeightedText>& runs, int pad_id, const ClipTokenizer& tok,
                                       const EmbeddingSet* embeddings) {
  const bool bang = pad_id == tok.bang_id();
  const int comma = tok.token_id(",</w>");
  std::vector<TokenChunk> chunks;
  std::vector<int> ids;
  std::vector<float> ws;
  std::vector<EmbeddingFix> fixes;  // pos: index into ids (content tokens)
  int last_comma = -1;

  auto next_chunk = [&] {
    TokenChunk c;
    c.ids.reserve(kChunkTokens + 2);
    c.ids.push_back(tok.bos_id());
    c.ids.insert(c.ids.end(), ids.begin(), ids.end());
    c.ids.push_back(tok.eos_id());
    c.weights.push_back(1.0f);
    c.weights.insert(c.weights.end(), ws.begin(), ws.end());
    c.weights.push_back(1.0f);
    c.ids.resize(kChunkTokens + 2, pad_id);
    c.weights.resize(kChunkTokens + 2, 1.0f);
    for (EmbeddingFix f : fixes) c.fixes.push_back({f.pos + 1, f.emb});  // after BOS
    chunks.push_back(std::move(c));
    ids.clear();
    ws.clear();
    fixes.clear();
    last_comma = -1;
  };

  for (const WeightedText& run : runs) {
    if (run.is_break()) {
      next_chunk();
      continue;
    }
    const std::vector<int> tokens = tok.tokenize(run.text, bang);
    for (size_t pos = 0; pos < tokens.size();) {
      const int token = tokens[pos];
      if (token == comma) {
        last_comma = int(ids.size());
      } else if (int(ids.size()) == kChunkTokens && last_comma != -1 &&
                 int(ids.size()) - last_comma <= kCommaBacktrack) {
        // A full chunk with a comma near its end: the text after the comma moves to the next chunk
        // (with any embeddings placed there).
        const size_t at = size_t(last_comma) + 1;
        std::vector<int> rel_ids(ids.begin() + long(at), ids.end());
        std::vector<float> rel_ws(ws.begin() + long(at), ws.end());
        std::vector<EmbeddingFix> rel_fixes;
        while (!fixes.empty() && size_t(fixes.back().pos) >= at) {  // fixes are in position order
          rel_fixes.insert(rel_fixes.begin(), {fixes.back().pos - int(at), fixes.back().emb});
          fixes.pop_back();
        }
        ids.resize(at);
        ws.resize(at);
        next_chunk();
        ids = std::move(rel_ids);
        ws = std::move(rel_ws);
        fixes = std::move(rel_fixes);
      }
      if (int(ids.size()) == kChunkTokens) next_chunk();
      const auto [emb, covered] = embeddings ? embeddings->match(tokens, pos, bang)
                                             : std::pair<const Embedding*, int>{nullptr, 0};
      if (!emb) {
        ids.push_back(token);
        ws.push_back(run.weight);
        ++pos;
        continue;
      }
      const int n = emb->vectors();
      if (int(ids.size()) + n > kChunkTokens) next_chunk();
      fixes.push_back({int(ids.size()), emb});
      ids.insert(ids.end(), size_t(n), 0);
      ws.insert(ws.end(), size_t(n), run.weight);
      pos += size_t(covered);
    }
  }
  if (!ids.empty() || chunks.empty()) next_chunk();
  return chunks;
}

std::vector<TokenChunk> chunk_prompt(const std::string& prompt, int pad_id, const ClipTokenizer& tok,
                                     const EmbeddingSet* embeddings) {
  return chunk_weighted(parse_prompt_weights(prompt), pad_id, tok, embeddings);
}

}  // namespace diffuse

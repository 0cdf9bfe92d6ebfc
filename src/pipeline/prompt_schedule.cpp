// A1111's prompt editing [from:to:when] and alternation [a|b] (see prompt_schedule.h), parsed by
// a small backtracking parser that follows A1111's grammar:
//   start:     (prompt | stray "[", "]", "(", ")", ":")*
//   prompt:    (emphasized | scheduled | alternate | plain | whitespace)*
//   emphasized "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
//   scheduled  "[" [prompt ":"] prompt ":" [ws] NUMBER [ws] "]"
//   alternate  "[" prompt ("|" [prompt])+ "]"
//   plain      ([^\\[]():|] | \\.)+   ('|' is text except between an alternate's options)
#include "pipeline/prompt_schedule.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <set>

namespace diffuse {

namespace {

struct Node;
using Seq = std::vector<Node>;

struct Node {
  enum Kind { Text, Scheduled, Alternate, Group } kind = Text;
  std::string text;        // Text; Scheduled: the `when` as written
  std::vector<Seq> parts;  // Scheduled: {before, after}; Alternate: options; Group: {inner[, after ':']}
  bool has_before = false;  // Scheduled: the [from:to:when] form
  char open = 0, close = 0;  // Group
  int when = 0;              // Scheduled: resolved step
};

// Nesting beyond this, or more brackets than kMaxBrackets, is not scheduled (the prompt is used as
// written): it bounds the backtracking on hostile input.
constexpr int kMaxDepth = 24;
constexpr size_t kMaxBrackets = 512;

class Parser {
 public:
  explicit Parser(const std::string& s) : s_(s) {}

  // The whole prompt (top level: stray brackets and colons are text).
  Seq parse() {
    pos_ = 0;
    return seq(true, 0);
  }
  bool failed() const { return too_deep_; }

 private:
  struct Memo {
    bool ok;
    Node node;
    size_t end;
  };

  bool at(char c) const { return pos_ < s_.size() && s_[pos_] == c; }
  void skip_ws() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }

  // NUMBER: digits [. digits] | . digits, optional exponent.
  std::optional<std::string> number() {
    const size_t start = pos_;
    auto digits = [&] {
      const size_t b = pos_;
      while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) ++pos_;
      return pos_ > b;
    };
    bool any = digits();
    if (at('.')) {
      ++pos_;
      any = digits() || any;
    }
    if (!any) {
      pos_ = start;
      return std::nullopt;
    }
    if (at('e') || at('E')) {
      const size_t e = pos_++;
      if (at('+') || at('-')) ++pos_;
      if (!digits()) pos_ = e;
    }
    return s_.substr(start, pos_ - start);
  }

  static void append_text(Seq& q, const std::string& t) {
    if (!q.empty() && q.back().kind == Node::Text) q.back().text += t;
    else q.push_back(Node{Node::Text, t, {}, false, 0, 0, 0});
  }

  // A sequence up to a character that belongs to an enclosing construct (nested) or the end. '|'
  // ends only an alternate's option; elsewhere it is text (A1111's doctest "[{b|d{:.5]").
  Seq seq(bool top, int depth, bool bar_ends = false) {
    Seq q;
    while (pos_ < s_.size()) {
      const char c = s_[pos_];
      if (c == '\\' && pos_ + 1 < s_.size()) {
        append_text(q, s_.substr(pos_, 2));
        pos_ += 2;
      } else if (c == '[' || c == '(') {
        std::optional<Node> n = c == '[' ? bracket(depth + 1) : paren(depth + 1);
        if (n) {
          q.push_back(std::move(*n));
        } else if (top) {
          append_text(q, std::string(1, c));
          ++pos_;
        } else {
          break;
        }
      } else if (c == ':' || (c == '|' && bar_ends) || c == ']' || c == ')') {
        if (!top) break;
        append_text(q, std::string(1, c));
        ++pos_;
      } else {
        append_text(q, std::string(1, c));
        ++pos_;
      }
    }
    return q;
  }

  std::optional<Node> memoized(std::map<size_t, Memo>& memo, int depth, Node (Parser::*fn)(int, bool&)) {
    const size_t start = pos_;
    if (auto it = memo.find(start); it != memo.end()) {
      if (!it->second.ok) return std::nullopt;
      pos_ = it->second.end;
      return it->second.node;
    }
    if (depth > kMaxDepth) {
      too_deep_ = true;
      return std::nullopt;
    }
    bool ok = false;
    Node n = (this->*fn)(depth, ok);
    if (!ok) pos_ = start;
    memo[start] = Memo{ok, n, pos_};
    if (!ok) return std::nullopt;
    return n;
  }

  std::optional<Node> bracket(int depth) { return memoized(bracket_memo_, depth, &Parser::bracket_at); }
  std::optional<Node> paren(int depth) { return memoized(paren_memo_, depth, &Parser::paren_at); }

  // At '[': scheduled, alternate or emphasized, in that order.
  Node bracket_at(int depth, bool& ok) {
    const size_t open = pos_;
    // scheduled
    pos_ = open + 1;
    Seq a = seq(false, depth);
    if (at(':')) {
      ++pos_;
      const size_t after_colon = pos_;
      skip_ws();
      if (std::optional<std::string> num = number()) {  // [to:when]
        skip_ws();
        if (at(']')) {
          ++pos_;
          ok = true;
          return Node{Node::Scheduled, *num, {Seq{}, a}, false, 0, 0, 0};
        }
      }
      pos_ = after_colon;
      Seq b = seq(false, depth);
      if (at(':')) {  // [from:to:when]
        ++pos_;
        skip_ws();
        if (std::optional<std::string> num = number()) {
          skip_ws();
          if (at(']')) {
            ++pos_;
            ok = true;
            return Node{Node::Scheduled, *num, {a, b}, true, 0, 0, 0};
          }
        }
      }
    }
    // alternate
    pos_ = open + 1;
    a = seq(false, depth, true);
    if (at('|')) {
      std::vector<Seq> options{a};
      while (at('|')) {
        ++pos_;
        options.push_back(seq(false, depth, true));
      }
      if (at(']')) {
        ++pos_;
        ok = true;
        return Node{Node::Alternate, "", options, false, 0, 0, 0};
      }
    }
    // emphasized [prompt]
    pos_ = open + 1;
    a = seq(false, depth);
    if (at(']')) {
      ++pos_;
      ok = true;
      return Node{Node::Group, "", {a}, false, '[', ']', 0};
    }
    return {};
  }

  // At '(': (prompt) or (prompt:prompt).
  Node paren_at(int depth, bool& ok) {
    ++pos_;
    Seq a = seq(false, depth);
    if (at(')')) {
      ++pos_;
      ok = true;
      return Node{Node::Group, "", {a}, false, '(', ')', 0};
    }
    if (!at(':')) return {};
    ++pos_;
    Seq b = seq(false, depth);
    if (!at(')')) return {};
    ++pos_;
    ok = true;
    return Node{Node::Group, "", {a, b}, false, '(', ')', 0};
  }

  const std::string& s_;
  size_t pos_ = 0;
  bool too_deep_ = false;
  std::map<size_t, Memo> bracket_memo_, paren_memo_;
};

// Resolves each scheduled node's step and collects the boundaries (A1111's CollectSteps, the
// current "new" scheduling: a '.' makes it a fraction of the steps).
void collect(Seq& q, int steps, std::set<int>& bounds, bool& alternates) {
  for (Node& n : q) {
    if (n.kind == Node::Scheduled) {
      double v = std::strtod(n.text.c_str(), nullptr);
      if (n.text.find('.') != std::string::npos) v *= steps;
      n.when = int(std::min(double(steps), v));
      if (n.when >= 1) bounds.insert(n.when);
    }
    if (n.kind == Node::Alternate) alternates = true;
    for (Seq& p : n.parts) collect(p, steps, bounds, alternates);
  }
}

std::string render(const Seq& q, int step) {
  std::string out;
  for (const Node& n : q) {
    switch (n.kind) {
      case Node::Text: out += n.text; break;
      case Node::Scheduled: out += step <= n.when ? render(n.parts[0], step) : render(n.parts[1], step); break;
      case Node::Alternate: out += render(n.parts[size_t(step - 1) % n.parts.size()], step); break;
      case Node::Group:
        out += n.open;
        out += render(n.parts[0], step);
        if (n.parts.size() > 1) out += ":" + render(n.parts[1], step);
        out += n.close;
        break;
    }
  }
  return out;
}

}  // namespace

std::vector<PromptStep> prompt_schedule(const std::string& prompt, int steps) {
  steps = std::max(steps, 1);
  const size_t brackets = size_t(std::count(prompt.begin(), prompt.end(), '[')) +
                          size_t(std::count(prompt.begin(), prompt.end(), '('));
  if (prompt.find('[') == std::string::npos || brackets > kMaxBrackets) return {{steps, prompt}};
  Parser parser(prompt);
  Seq tree = parser.parse();
  if (parser.failed()) return {{steps, prompt}};
  std::set<int> bounds;
  bool alternates = false;
  collect(tree, steps, bounds, alternates);
  if (alternates)
    for (int s = 1; s <= steps; ++s) bounds.insert(s);
  bounds.insert(steps);
  std::vector<PromptStep> out;
  for (int b : bounds) {
    if (b > steps) continue;
    out.push_back({b, render(tree, b)});
  }
  return out;
}

size_t schedule_index(const std::vector<PromptStep>& schedule, int i) {
  for (size_t k = 0; k < schedule.size(); ++k)
    if (i <= schedule[k].end_step) return k;
  return schedule.empty() ? 0 : schedule.size() - 1;
}

}  // namespace diffuse

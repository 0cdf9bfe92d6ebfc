// CLIP BPE tokenizer: reference ids from tokens.json, diffusers tokenizer folders, and the pieces.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

#include "core/error.h"
#include "models/tokenizer.h"

using diffuse::ClipTokenizer;
namespace fs = std::filesystem;

namespace {

const std::string kShared = DIFFUSE_SHARED_DIR;
const std::string kTestData = DIFFUSE_TEST_DATA;
const std::string kFFFD = "\xEF\xBF\xBD";

nlohmann::json load_json(const std::string& path) {
  std::ifstream f(path);
  return nlohmann::json::parse(f);
}

const ClipTokenizer& tok() { return ClipTokenizer::builtin(); }

// Checks every prompt of a tokens.json against `t`; returns the number of prompts checked.
int check_tokens_json(const ClipTokenizer& t, const nlohmann::json& j) {
  int checked = 0;
  for (const char* mode : {"eos_pad", "bang_pad"}) {
    const bool bang = std::string(mode) == "bang_pad";
    const int pad = bang ? 0 : 49407;
    EXPECT_TRUE(j.contains(mode)) << mode;
    if (!j.contains(mode)) continue;
    for (const auto& e : j[mode]) {
      const std::string prompt = e["prompt"].get<std::string>();
      const auto padded = e["ids_padded"].get<std::vector<int>>();
      const auto raw = e["ids_raw"].get<std::vector<int>>();
      EXPECT_EQ(t.encode_padded(prompt, pad), padded) << mode << ": " << prompt;
      EXPECT_EQ(t.encode(prompt, bang), raw) << mode << ": " << prompt;
      ++checked;
    }
  }
  return checked;
}

}  // namespace

// ---- reference ids ----

TEST(Tokenizer, BundledTokensJson) {
  const std::string path = kTestData + "/tokens.json";
  if (!fs::exists(path)) GTEST_SKIP() << path << " not found";
  EXPECT_EQ(check_tokens_json(tok(), load_json(path)), 20);
}

TEST(Tokenizer, SharedTokensJson) {
  const std::string path = kShared + "/fixtures/tokens.json";
  if (!fs::exists(path)) GTEST_SKIP() << path << " not found";
  EXPECT_GE(check_tokens_json(tok(), load_json(path)), 20);
}

TEST(Tokenizer, DiffusersFoldersMatchBuiltin) {
  const std::string json_path = kTestData + "/tokens.json";
  ASSERT_TRUE(fs::exists(json_path));
  const auto j = load_json(json_path);
  int folders = 0;
  for (const char* family : {"sd1", "sd2"}) {
    const std::string dir = kShared + "/fixtures/" + family + "/model/diffusers/tokenizer";
    if (!fs::exists(dir)) continue;
    ++folders;
    ClipTokenizer t = ClipTokenizer::from_diffusers_dir(dir);
    EXPECT_EQ(t.vocab_size(), 49408) << family;
    EXPECT_EQ(t.bos_id(), 49406);
    EXPECT_EQ(t.eos_id(), 49407);
    EXPECT_EQ(t.bang_id(), 0);
    EXPECT_EQ(check_tokens_json(t, j), 20) << family;
    // Also agrees with the built-in vocabulary beyond the fixture prompts.
    for (const std::string p : {"Ünïcödé façade — ½ ™ &amp; <|endoftext|> x", "zzzzqqqq jekyll habib"})
      EXPECT_EQ(t.encode(p), tok().encode(p)) << family << ": " << p;
  }
  if (folders == 0) GTEST_SKIP() << "no diffusers tokenizer folders under " << kShared;
  // The model folder (with a tokenizer/ subfolder) works too.
  const std::string model = kShared + "/fixtures/sd1/model/diffusers";
  if (fs::exists(model + "/tokenizer")) {
    EXPECT_EQ(ClipTokenizer::from_diffusers_dir(model).encode("a horse"), tok().encode("a horse"));
  }
}

TEST(Tokenizer, DiffusersFolderErrors) {
  EXPECT_THROW(ClipTokenizer::from_diffusers_dir("/nonexistent/tokenizer"), diffuse::Error);
  const fs::path dir = fs::temp_directory_path() / ("diffuse_tok_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << "{\"model\": {\"vocab\": {\"a\": 0}, \"merges\": []}}";
  EXPECT_THROW(ClipTokenizer::from_diffusers_dir(dir.string()), diffuse::Error);  // no byte symbols
  std::ofstream(dir / "tokenizer.json") << "{not json";
  EXPECT_THROW(ClipTokenizer::from_diffusers_dir(dir.string()), diffuse::Error);
  fs::remove_all(dir);
}

// ---- the vocabulary ----

TEST(Tokenizer, EmbeddedVocabulary) {
  auto gz = diffuse::detail::clip_vocab_gz();
  ASSERT_GT(gz.size(), 1000000u);
  EXPECT_EQ(static_cast<unsigned char>(gz[0]), 0x1f);
  EXPECT_EQ(static_cast<unsigned char>(gz[1]), 0x8b);
  std::string text = diffuse::detail::clip_vocab_text();
  EXPECT_EQ(text.substr(text.find('\n') + 1, 4), "i n\n");

  const auto& t = tok();
  EXPECT_EQ(t.vocab_size(), 49408);
  EXPECT_EQ(t.token(0), "!");
  EXPECT_EQ(t.token(94), "\xC2\xA1");          // '¡' follows '~'
  EXPECT_EQ(t.token(188), "\xC4\x80");         // byte 0 -> U+0100
  EXPECT_EQ(t.token(256), "!</w>");
  EXPECT_EQ(t.token(320), "a</w>");
  EXPECT_EQ(t.token(512), "in");               // first merge "i n"
  EXPECT_EQ(t.token(49405), "jekyll</w>");     // last merge used (line 48895)
  EXPECT_EQ(t.token(49406), "<|startoftext|>");
  EXPECT_EQ(t.token(49407), "<|endoftext|>");
  EXPECT_EQ(t.token_id("photograph</w>"), 8853);
  EXPECT_EQ(t.token_id("habib</w>"), -1);      // line 48896 is past the cut
  EXPECT_EQ(t.bang_id(), 0);
  EXPECT_THROW(t.token(-1), diffuse::Error);
  EXPECT_THROW(t.token(49408), diffuse::Error);
}

TEST(Tokenizer, ByteMappingRoundTrip) {
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  const std::string syms = ClipTokenizer::bytes_to_symbols(all);
  EXPECT_EQ(ClipTokenizer::symbols_to_bytes(syms), all);
  EXPECT_EQ(ClipTokenizer::bytes_to_symbols(" "), "\xC4\xA0");   // U+0120 'Ġ'
  EXPECT_EQ(ClipTokenizer::bytes_to_symbols("a~"), "a~");
  EXPECT_EQ(ClipTokenizer::bytes_to_symbols("\xAD"), "\xC5\x83");  // soft hyphen -> U+0143
  EXPECT_EQ(ClipTokenizer::bytes_to_symbols("\xC3\xA9"), "\xC3\x83\xC2\xA9");  // 'é' bytes C3 A9
  EXPECT_THROW(ClipTokenizer::symbols_to_bytes("\xE2\x82\xAC"), diffuse::Error);  // '€' is not a byte symbol
  // Every byte, alone and at a word end, has its own vocabulary entry.
  for (int b = 0; b < 256; ++b) {
    std::string sym = ClipTokenizer::bytes_to_symbols(std::string(1, static_cast<char>(b)));
    EXPECT_GE(tok().token_id(sym), 0) << b;
    EXPECT_EQ(tok().token_id(sym + "</w>"), tok().token_id(sym) + 256) << b;
  }
}

// ---- cleanup ----

TEST(Tokenizer, WhitespaceAndCase) {
  EXPECT_EQ(ClipTokenizer::clean_text("  Hello\t\n  WORLD  "), "hello world");
  EXPECT_EQ(ClipTokenizer::clean_text("a\xC2\xA0\xE3\x80\x80" "b"), "a b");  // NBSP, ideographic space
  EXPECT_EQ(ClipTokenizer::clean_text(" \n\t "), "");
  EXPECT_EQ(ClipTokenizer::clean_text("\xC3\x89T\xC3\x89"), "\xC3\xA9t\xC3\xA9");      // ÉTÉ -> été
  EXPECT_EQ(ClipTokenizer::clean_text("e\xCC\x81"), "\xC3\xA9");                      // NFC: e + U+0301
  EXPECT_EQ(ClipTokenizer::clean_text("\xCE\x9F\xCE\x94\xCE\x9F\xCE\xA3"),            // ΟΔΟΣ -> οδος
            "\xCE\xBF\xCE\xB4\xCE\xBF\xCF\x82");
  EXPECT_EQ(ClipTokenizer::clean_text("\xC4\xB0"), "i\xCC\x87");                       // İ -> i + U+0307
  EXPECT_EQ(ClipTokenizer::clean_text("\xCE\xA3\xE2\x85\xAB \xE2\x85\xAB\xCE\xA3"),  // ΣⅫ ⅫΣ: Ⅻ is cased
            "\xCF\x83\xE2\x85\xBB \xE2\x85\xBB\xCF\x82");
}

TEST(Tokenizer, HtmlUnescape) {
  using T = ClipTokenizer;
  EXPECT_EQ(T::html_unescape("a &amp; b &lt;c&gt; &quot;d&quot; &#39;e&#39;"), "a & b <c> \"d\" 'e'");
  EXPECT_EQ(T::html_unescape("&#65;&#x42;&#X43;&#100"), "ABCd");
  EXPECT_EQ(T::html_unescape("&#150; &#0; &#xD800; &#99999999999;"), "\xE2\x80\x93 " + kFFFD + " " + kFFFD + " " + kFFFD);
  EXPECT_EQ(T::html_unescape("&#1;x&#x7f;"), "x");  // invalid code points vanish
  EXPECT_EQ(T::html_unescape("&ampx &amp &hellip; &hellip &nosuch; & &# &#x;"),
            "&x & \xE2\x80\xA6 &hellip &nosuch; & &# &#x;");
  EXPECT_EQ(T::html_unescape("&amp;amp;"), "&amp;");
  EXPECT_EQ(T::clean_text("&amp;amp; &AMP;LT;"), "& <");  // unescaped twice
}

TEST(Tokenizer, InvalidUtf8BecomesReplacement) {
  EXPECT_EQ(ClipTokenizer::sanitize_utf8("a\xFF" "b"), "a" + kFFFD + "b");
  EXPECT_EQ(ClipTokenizer::sanitize_utf8("\xE2\x82" "x"), kFFFD + "x");  // truncated sequence: one U+FFFD
  EXPECT_EQ(ClipTokenizer::sanitize_utf8("\xED\xA0\x80"), kFFFD + kFFFD + kFFFD);  // surrogate
  EXPECT_EQ(ClipTokenizer::sanitize_utf8("\xC0\xAF"), kFFFD + kFFFD);  // overlong
  EXPECT_EQ(ClipTokenizer::sanitize_utf8("ok \xF0\x9F\x90\xB1"), "ok \xF0\x9F\x90\xB1");
  std::vector<int> ids;
  ASSERT_NO_THROW(ids = tok().encode("cat\xFF\xFE dog"));
  EXPECT_EQ(ids, tok().encode("cat" + kFFFD + kFFFD + " dog"));
}

// ---- pre-tokenisation and BPE ----

TEST(Tokenizer, PreTokenize) {
  using V = std::vector<std::string>;
  EXPECT_EQ(ClipTokenizer::pre_tokenize("don't stop 123 ?!x y"),
            (V{"don", "'t", "stop", "1", "2", "3", "?!", "x", "y"}));
  EXPECT_EQ(ClipTokenizer::pre_tokenize("we're they'll 'x"), (V{"we", "'re", "they", "'ll", "'", "x"}));
  EXPECT_EQ(ClipTokenizer::pre_tokenize("a<|endoftext|>b <|startoftext|>"),
            (V{"a", "<|endoftext|>", "b", "<|startoftext|>"}));
  // Inside a punctuation run the special text is not recognised (as with the regex).
  EXPECT_EQ(ClipTokenizer::pre_tokenize(".<|endoftext|>"), (V{".<|", "endoftext", "|>"}));
  EXPECT_EQ(ClipTokenizer::pre_tokenize("caf\xC3\xA9\xE2\x80\x94\xC2\xBD"),  // café—½ (½ is \p{N})
            (V{"caf\xC3\xA9", "\xE2\x80\x94", "\xC2\xBD"}));
  EXPECT_TRUE(ClipTokenizer::pre_tokenize("").empty());
}

TEST(Tokenizer, WordMerges) {
  const auto& t = tok();
  EXPECT_EQ(t.bpe("photograph"), std::vector<int>{8853});
  EXPECT_EQ(t.bpe("a"), std::vector<int>{320});
  EXPECT_EQ(t.bpe("!!"), std::vector<int>{748});
  EXPECT_EQ(t.bpe("<|endoftext|>"), std::vector<int>{49407});
  // A made-up word splits into known pieces that spell it back.
  std::vector<int> ids = t.bpe("zzqxjkvw");
  ASSERT_GT(ids.size(), 1u);
  std::string joined;
  for (int id : ids) joined += t.token(id);
  EXPECT_EQ(joined, "zzqxjkvw</w>");
  // Merging is stable: the same word again (from the cache) gives the same ids.
  EXPECT_EQ(t.bpe("zzqxjkvw"), ids);
}

TEST(Tokenizer, ContentTokensAndSpecials) {
  const auto& t = tok();
  EXPECT_EQ(t.tokenize("a horse"), (std::vector<int>{320, 4558}));
  EXPECT_EQ(t.encode("<|endoftext|>"), (std::vector<int>{49406, 49407, 49407}));
  EXPECT_EQ(t.encode("A HORSE"), t.encode("a horse"));
}

// Ids from an independent Python implementation of the reference algorithm (html.unescape,
// unicodedata NFC, str.lower, the `regex` pattern, OpenAI's BPE loop) over the same vocabulary.
TEST(Tokenizer, MixedScriptsMatchReference) {
  const auto& t = tok();
  EXPECT_EQ(t.encode("Stra\xC3\x9F" "e &amp; \xD0\xBF\xD1\x80\xD0\xB8\xD0\xB2\xD0\xB5\xD1\x82, "
                     "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD "
                     "(\xCE\x9F\xCE\x94\xCE\x9F\xCE\xA3:1.2) I'LL we've &#x263A;&hellip; x-y_z 3.14"),
            (std::vector<int>{49406, 1894, 127, 253, 324, 261, 26302, 16370, 29503, 110, 22176, 141, 480,
                              267, 39121, 44353, 34002, 508, 43722, 263, 138, 123, 138, 112, 138, 123,
                              139, 480, 281, 272, 269, 273, 264, 328, 1342, 649, 1200, 5010, 959, 343,
                              268, 344, 318, 345, 274, 269, 272, 275, 49407}));
  EXPECT_EQ(t.encode("\xC2\xA0\xC4\xB0stanbul\xE3\x80\x80\xE2\x80\x94\xC2\xBD \xE2\x85\xAB 'd "
                     "\xE2\x80\x99quoted\xE2\x80\x99 <|endoftext|>done"),
            (std::vector<int>{49406, 328, 16384, 11231, 2005, 33613, 158, 227, 375, 1896, 728, 503, 27706,
                              728, 503, 49407, 1700, 49407}));
}

TEST(Tokenizer, BangIsPadMode) {
  const auto& t = tok();
  EXPECT_EQ(t.tokenize("hat!!"), (std::vector<int>{3801, 748}));
  EXPECT_EQ(t.tokenize("hat!!", true), (std::vector<int>{3801, 0, 0}));
  std::vector<int> q = t.tokenize("hat?!?", true);
  ASSERT_EQ(q.size(), 4u);
  EXPECT_EQ(q[1], t.token_id("?</w>"));
  EXPECT_EQ(q[2], 0);
  EXPECT_EQ(q[3], t.token_id("?</w>"));
  // Only the pad id "!" switches the mode on in encode_padded.
  EXPECT_EQ(t.encode_padded("hat!!", 0, 6), (std::vector<int>{49406, 3801, 0, 0, 49407, 0}));
  EXPECT_EQ(t.encode_padded("hat!!", 49407, 6), (std::vector<int>{49406, 3801, 748, 49407, 49407, 49407}));
}

TEST(Tokenizer, TruncationKeepsEosLast) {
  const auto& t = tok();
  std::string prompt;
  for (int i = 0; i < 100; ++i) prompt += "cat ";
  std::vector<int> raw = t.encode(prompt);
  ASSERT_EQ(raw.size(), 102u);
  for (int pad : {49407, 0}) {
    std::vector<int> p = t.encode_padded(prompt, pad);
    ASSERT_EQ(p.size(), 77u);
    EXPECT_EQ(p.front(), 49406);
    EXPECT_EQ(p.back(), 49407);
    EXPECT_EQ(std::vector<int>(p.begin() + 1, p.end() - 1), std::vector<int>(raw.begin() + 1, raw.begin() + 76));
  }
  // Exactly 75 content tokens fit without truncation, 76 do not.
  std::string p75, p76;
  for (int i = 0; i < 75; ++i) p75 += "cat ";
  p76 = p75 + "dog";
  EXPECT_EQ(t.encode_padded(p75, 49407), t.encode(p75));
  EXPECT_EQ(t.encode_padded(p76, 49407), t.encode(p75));
  EXPECT_EQ(t.encode_padded("a horse", 49407, 3), (std::vector<int>{49406, 320, 49407}));
  EXPECT_EQ(t.encode_padded("a horse", 49407, 2), (std::vector<int>{49406, 49407}));
  EXPECT_THROW(t.encode_padded("a", 49407, 1), diffuse::Error);
  EXPECT_THROW(t.encode_padded("a", 49408), diffuse::Error);
}

TEST(Tokenizer, DecodeRoundTrip) {
  const auto& t = tok();
  for (const std::string p : {"a photograph of an astronaut riding a horse", "oil painting , 8 k",
                              "na\xC3\xAFve caf\xC3\xA9 \xF0\x9F\x90\xB1", ""})
    EXPECT_EQ(t.decode(t.encode(p)), p);
  EXPECT_EQ(t.decode(t.encode_padded("a horse", 49407)), "a horse");
  EXPECT_EQ(t.decode({t.token_id("\xC3\xB0</w>")}), kFFFD);  // a lone UTF-8 lead byte
  EXPECT_THROW(t.decode({-5}), diffuse::Error);
}

// A 20000-letter word (one BPE piece; a naive merge loop is quadratic in it) is merged and
// round-trips. Its speed is a benchmark figure, not asserted here.
TEST(Tokenizer, LongWordMergesAndRoundTrips) {
  const auto& t = tok();
  std::string word;
  for (int i = 0; i < 20000; ++i) word += static_cast<char>('a' + (i * 7 + i / 13) % 26);
  std::vector<int> ids = t.tokenize(word);
  EXPECT_LT(ids.size(), word.size());
  EXPECT_EQ(t.decode(ids), word);
}

TEST(Tokenizer, ConcurrentUse) {
  const auto& t = tok();
  const std::vector<std::string> prompts = {"a cat", "a dog on a skateboard", "portrait, 4k, detailed",
                                            "\xE6\x97\xA5\xE6\x9C\xAC"};
  std::vector<std::vector<int>> expect;
  for (const auto& p : prompts) expect.push_back(t.encode_padded(p, 49407));
  std::vector<int> bad(4, 0);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k)
    threads.emplace_back([&, k] {
      for (int r = 0; r < 200; ++r)
        for (size_t i = 0; i < prompts.size(); ++i)
          if (t.encode_padded(prompts[i] + " x" + std::to_string(r % 7), 49407).size() != 77 ||
              t.encode_padded(prompts[i], 49407) != expect[i])
            ++bad[k];
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad, std::vector<int>(4, 0));
}

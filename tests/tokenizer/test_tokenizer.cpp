// Tokenizer against independent references: llama.cpp's vocab test vectors (through the GGUF
// vocabularies) and Hugging Face `tokenizers` on the real Qwen3 tokenizer.json (golden ids
// made once by scripts/make-tokenizer-golden.py). Plus round trips, streaming and errors.
#include <gtest/gtest.h>

#include <unistd.h>

#include <ctime>
#include <filesystem>
#include <functional>
#include <map>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "multipole/core/error.hpp"
#include "multipole/io/gguf.hpp"
#include "multipole/tokenizer/tokenizer.hpp"
#include "test_scale.hpp"

using namespace multipole;

namespace {

const std::string kShared = std::string(MULTIPOLE_SHARED_DIR) + "/assets";
const std::string kQwen3Json = kShared + "/qwen3-tokenizer/tokenizer.json";

using multipole::test::small_scale;

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  EXPECT_TRUE(f.good()) << path;
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

const Tokenizer& qwen3() {
  static const Tokenizer t = Tokenizer::from_json_file(kQwen3Json);
  return t;
}

const Tokenizer& gguf_tokenizer(const std::string& name) {
  static std::map<std::string, Tokenizer> cache;
  auto it = cache.find(name);
  if (it == cache.end()) {
    GGUFFile f(kShared + "/vocab-tests/ggml-vocab-" + name + ".gguf");
    it = cache.emplace(name, Tokenizer::from_gguf(f)).first;
  }
  return it->second;
}

// Independent UTF-8 check (Unicode Table 3-7), so the tests do not trust the code under test.
bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned c = static_cast<unsigned char>(s[i]);
    size_t n;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80) n = 1;
    else if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c == 0xE0) n = 3, lo = 0xA0;
    else if (c == 0xED) n = 3, hi = 0x9F;
    else if (c >= 0xE1 && c <= 0xEF) n = 3;
    else if (c == 0xF0) n = 4, lo = 0x90;
    else if (c == 0xF4) n = 4, hi = 0x8F;
    else if (c >= 0xF1 && c <= 0xF3) n = 4;
    else return false;
    if (i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      const unsigned b = static_cast<unsigned char>(s[i + k]);
      if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return false;
    }
    i += n;
  }
  return true;
}

void append_cp(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6)), s += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += char(0xE0 | (cp >> 12)), s += char(0x80 | ((cp >> 6) & 0x3F)), s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xF0 | (cp >> 18)), s += char(0x80 | ((cp >> 12) & 0x3F));
    s += char(0x80 | ((cp >> 6) & 0x3F)), s += char(0x80 | (cp & 0x3F));
  }
}

// Random valid UTF-8 over every plane (no surrogates), biased towards ASCII and whitespace.
// Without combining marks when `nfc_stable`, so NFC leaves it unchanged.
std::string random_text(std::mt19937& rng, size_t n_chars, bool nfc_stable) {
  std::string s;
  for (size_t k = 0; k < n_chars; ++k) {
    const int kind = int(rng() % 10);
    uint32_t cp;
    if (kind < 4) cp = 0x20 + rng() % 0x5F;
    else if (kind == 4) cp = " \t\n\r"[rng() % 4];
    else if (kind == 5) cp = 0x4E00 + rng() % 0x5000;  // CJK
    else if (kind == 6) cp = 0x1F300 + rng() % 0x300;  // emoji
    else if (kind == 7) cp = 0x400 + rng() % 0x100;    // Cyrillic
    else if (nfc_stable) cp = 0xAC00 + rng() % 0x2B00;  // precomposed Hangul syllables
    else {
      do cp = rng() % 0x110000; while (cp >= 0xD800 && cp <= 0xDFFF);
    }
    append_cp(s, cp);
  }
  return s;
}

// The GPT-2 byte-to-character map, written out independently of the library.
std::vector<std::string> byte_level_chars() {
  std::vector<std::string> out;
  int extra_cp = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    std::string ch;
    append_cp(ch, printable ? uint32_t(b) : uint32_t(256 + extra_cp++));
    out.push_back(ch);
  }
  return out;
}

// A tiny byte-level BPE tokenizer.json: token id = byte, "ab" = 256, "abc" = 257.
std::string tiny_json(const std::string& merges, const std::string& pre, const std::string& extra = "") {
  std::string vocab;
  const auto chars = byte_level_chars();
  for (int b = 0; b < 256; ++b) vocab += nlohmann::json(chars[size_t(b)]).dump() + ": " + std::to_string(b) + ", ";
  vocab += R"("ab": 256, "abc": 257)";
  return R"({"model": {"type": "BPE", "vocab": {)" + vocab + R"(}, "merges": )" + merges + "}, " +
         R"("pre_tokenizer": )" + pre + extra + "}";
}

const std::string kByteLevelPre = R"({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true})";

double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct VocabCase {
  std::string text;
  std::vector<int32_t> ids;
};

// llama.cpp's format: every text is followed by "\n__ggml_vocab_test__\n"; the .out file has
// one line of space-separated ids per text.
std::vector<VocabCase> read_vocab_cases(const std::string& base) {
  const std::string inp = read_file(base + ".inp"), out = read_file(base + ".out");
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<VocabCase> cases;
  size_t pos = 0;
  while (pos < inp.size()) {
    const size_t end = inp.find(sep, pos);
    if (end == std::string::npos) {
      ADD_FAILURE() << base << ".inp: text without a separator at byte " << pos;
      break;
    }
    cases.push_back({inp.substr(pos, end - pos), {}});
    pos = end + sep.size();
  }
  std::istringstream lines(out);
  std::string line;
  size_t k = 0;
  while (std::getline(lines, line)) {
    if (k >= cases.size()) {
      ADD_FAILURE() << base << ".out has more lines than texts";
      break;
    }
    std::istringstream ids(line);
    int32_t id;
    while (ids >> id) cases[k].ids.push_back(id);
    ++k;
  }
  EXPECT_EQ(k, cases.size()) << base;
  return cases;
}

std::string show(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) s += std::to_string(id) + " ";
  return s;
}

}  // namespace

class VocabTest : public ::testing::TestWithParam<std::string> {};

TEST_P(VocabTest, MatchesLlamaCppVectors) {
  const std::string base = kShared + "/vocab-tests/ggml-vocab-" + GetParam() + ".gguf";
  const auto cases = read_vocab_cases(base);
  ASSERT_EQ(cases.size(), 46u);
  const Tokenizer& tok = gguf_tokenizer(GetParam());
  EXPECT_EQ(tok.pre_tokenizer(), GetParam() == "gpt-2" ? "gpt-2" : GetParam());
  for (const VocabCase& c : cases) {
    const auto ids = tok.encode(c.text);
    EXPECT_EQ(ids, c.ids) << "text: [" << c.text << "]\n got: " << show(ids) << "\nwant: " << show(c.ids);
    EXPECT_EQ(tok.decode(ids), c.text);
  }
}

INSTANTIATE_TEST_SUITE_P(GGUF, VocabTest, ::testing::Values("qwen2", "llama-bpe", "gpt-2"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n)
                             if (c == '-') c = '_';
                           return n;
                         });

TEST(Tokenizer, Qwen3MatchesHuggingFaceGolden) {
  const auto doc = nlohmann::json::parse(read_file(std::string(MULTIPOLE_SOURCE_DIR) +
                                                   "/tests/tokenizer/data/qwen3_golden.json"));
  ASSERT_FALSE(doc.at("add_special_tokens").get<bool>());
  const auto& cases = doc.at("cases");
  ASSERT_GE(cases.size(), 100u);
  const Tokenizer& tok = qwen3();
  for (const auto& c : cases) {
    const std::string text = c.at("text");
    const auto want = c.at("ids").get<std::vector<int32_t>>();
    const auto ids = tok.encode(text);
    EXPECT_EQ(ids, want) << "text: [" << text << "]\n got: " << show(ids) << "\nwant: " << show(want);
    // Hugging Face's decode of the same ids: the NFC form of the text.
    EXPECT_EQ(tok.decode(want), c.at("decoded").get<std::string>()) << text;
  }
}

TEST(Tokenizer, Qwen3AddedAndSpecialTokens) {
  const Tokenizer& tok = qwen3();
  EXPECT_EQ(tok.vocab_size(), 151669u);
  EXPECT_EQ(tok.token_id("<think>"), 151667);
  EXPECT_EQ(tok.token_id("</think>"), 151668);
  EXPECT_EQ(tok.token_id("<|im_start|>"), 151644);
  EXPECT_EQ(tok.kind(151667), TokenKind::Added);
  EXPECT_EQ(tok.kind(151644), TokenKind::Special);
  EXPECT_EQ(tok.kind(9707), TokenKind::Normal);
  EXPECT_EQ(tok.piece(9707), "Hello");
  // tokenizer_config.json next to tokenizer.json: eos "<|im_end|>", no bos.
  EXPECT_EQ(tok.eos_id(), 151645);
  EXPECT_FALSE(tok.bos_id().has_value());

  const std::string chat = "<|im_start|>user\nHi<|im_end|>\n<think>\nx</think>";
  const auto ids = tok.encode(chat);
  EXPECT_EQ(ids.front(), 151644);
  EXPECT_NE(std::find(ids.begin(), ids.end(), 151667), ids.end());
  EXPECT_EQ(tok.decode(ids), chat);
  EXPECT_EQ(tok.decode(ids, {.skip_special = true}), "user\nHi\n<think>\nx</think>");

  // parse_special = false: special tokens become plain text, <think> (not special) stays one token.
  const auto plain = tok.encode(chat, {.parse_special = false});
  for (int32_t id : plain) EXPECT_NE(tok.kind(id), TokenKind::Special);
  EXPECT_NE(std::find(plain.begin(), plain.end(), 151667), plain.end());
  EXPECT_EQ(tok.decode(plain), chat);

  // Qwen adds nothing around a text.
  EXPECT_EQ(tok.encode("hi", {.add_special = true}), tok.encode("hi"));
}

TEST(Tokenizer, AddSpecialFollowsTheModel) {
  const Tokenizer& llama = gguf_tokenizer("llama-bpe");
  EXPECT_EQ(llama.bos_id(), 128000);
  EXPECT_EQ(llama.eos_id(), 128001);
  auto ids = llama.encode("Hello", {.add_special = true});
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(ids[0], 128000);
  EXPECT_EQ(llama.encode("Hello"), std::vector<int32_t>{ids[1]});
  const Tokenizer& qwen2 = gguf_tokenizer("qwen2");
  EXPECT_EQ(qwen2.encode("Hello", {.add_special = true}), qwen2.encode("Hello"));
  // GGUF control tokens are special; Qwen2's [PAD...] user-defined ones are not.
  EXPECT_EQ(qwen2.kind(151643), TokenKind::Special);
  EXPECT_EQ(qwen2.kind(151646), TokenKind::Added);
  EXPECT_EQ(qwen2.encode("a<|endoftext|>b").size(), 3u);
  EXPECT_GT(qwen2.encode("a<|endoftext|>b", {.parse_special = false}).size(), 3u);
}

TEST(Tokenizer, RoundTripsRandomUtf8) {
  std::mt19937 rng(42);
  const int n = small_scale() ? 20 : 100;
  for (const std::string name : {"qwen2", "llama-bpe", "gpt-2"}) {
    const Tokenizer& tok = gguf_tokenizer(name);
    for (int k = 0; k < n; ++k) {
      const std::string text = random_text(rng, 1 + rng() % 200, false);
      ASSERT_EQ(tok.decode(tok.encode(text)), text) << name;
    }
  }
  // Qwen3 normalizes to NFC; these texts are already NFC.
  for (int k = 0; k < n; ++k) {
    const std::string text = random_text(rng, 1 + rng() % 200, true);
    ASSERT_EQ(qwen3().decode(qwen3().encode(text)), text);
  }
}

TEST(Tokenizer, StreamingDecoderEmitsWholeCharacters) {
  const Tokenizer& tok = qwen3();
  std::mt19937 rng(3);
  const int n = small_scale() ? 10 : 50;
  for (int k = 0; k < n; ++k) {
    const std::string text = random_text(rng, 1 + rng() % 300, true) + "😶‍🌫️ 我想";
    const auto ids = tok.encode(text);
    StreamDecoder stream(tok);
    std::string joined;
    for (int32_t id : ids) {
      const std::string chunk = stream.push(id);
      ASSERT_TRUE(valid_utf8(chunk)) << "chunk splits a character after id " << id;
      joined += chunk;
    }
    EXPECT_EQ(stream.flush(), "");
    EXPECT_EQ(joined, text);
  }
  // A 3-byte character spelled as three byte tokens: nothing until the last byte arrives.
  std::vector<int32_t> bytes;
  for (unsigned char b : std::string("€")) {
    std::string one(1, char(b));
    auto id = tok.token_id(one);
    ASSERT_TRUE(id.has_value());
    bytes.push_back(*id);
  }
  StreamDecoder s(tok);
  EXPECT_EQ(s.push(bytes[0]), "");
  EXPECT_EQ(s.push(bytes[1]), "");
  EXPECT_EQ(s.push(bytes[2]), "€");
  // An unfinished character at the end, and bytes that can never start one, become U+FFFD.
  EXPECT_EQ(s.push(bytes[0]), "");
  EXPECT_EQ(s.flush(), "\xEF\xBF\xBD");
  EXPECT_EQ(s.push(bytes[1]), "\xEF\xBF\xBD");  // a lone continuation byte
  EXPECT_EQ(s.push(bytes[0]), "");
  EXPECT_EQ(s.push(*tok.token_id("a")), "\xEF\xBF\xBD" "a");
  // skip_special
  StreamDecoder quiet(tok, {.skip_special = true});
  EXPECT_EQ(quiet.push(151644), "");
  EXPECT_EQ(quiet.push(151667), "<think>");
}

TEST(Tokenizer, LongTextRoundTrips) {
  // ~1 MB of mixed text round-trips; words repeat, as in prose. The CPU time is printed, not
  // asserted: timing belongs to benchmarks, and a loaded CI box failed a 1 s bound at 1.14 s.
  std::mt19937 rng(9);
  std::string text;
  const size_t target = small_scale() ? 100000 : 1000000;
  const std::string pieces[] = {"The quick brown fox ", "jumps over 1234 lazy dogs. ", "我想在apple工作 ",
                                "def f(x):\n    return x ** 2\n", "🚀 emoji ", "  \t\n", "Привет мир "};
  while (text.size() < target) {
    text += pieces[rng() % 7];
    if (rng() % 8 == 0) text += random_text(rng, 20, true);
  }
  double t0 = cpu_seconds();
  const auto ids = qwen3().encode(text);
  const double secs = cpu_seconds() - t0;
  EXPECT_EQ(qwen3().decode(ids), text);
  std::printf("encoded %zu bytes into %zu tokens in %.3f s of CPU\n", text.size(), ids.size(), secs);
  // One huge word (no pre-tokenizer split) round-trips; a quadratic merge loop would show in the
  // printed time.
  const std::string word(small_scale() ? 20000 : 200000, 'a');
  t0 = cpu_seconds();
  EXPECT_EQ(qwen3().decode(qwen3().encode(word)), word);
  const double word_secs = cpu_seconds() - t0;
  std::printf("one %zu-byte word in %.3f s of CPU\n", word.size(), word_secs);
}

TEST(Tokenizer, ErrorsAreClear) {
  const Tokenizer& tok = qwen3();
  auto message = [](auto&& fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  std::string m = message([&] { tok.encode(std::string("ok\xC3(", 4)); });
  EXPECT_NE(m.find("not valid UTF-8 at byte 2"), std::string::npos) << m;
  m = message([&] { tok.encode(std::string("\xED\xA0\x80", 3)); });  // a surrogate
  EXPECT_NE(m.find("not valid UTF-8"), std::string::npos) << m;
  m = message([&] { tok.decode(std::vector<int32_t>{1, 999999}); });
  EXPECT_NE(m.find("token id 999999"), std::string::npos) << m;
  EXPECT_THROW(tok.decode(std::vector<int32_t>{-1}), Error);
  EXPECT_THROW(tok.piece(151669), Error);

  m = message([] { Tokenizer::load("/nonexistent/tokenizer.json"); });
  EXPECT_NE(m.find("no such file"), std::string::npos) << m;
  m = message([] { Tokenizer::load(MULTIPOLE_SOURCE_DIR "/tests"); });
  EXPECT_NE(m.find("no tokenizer.json"), std::string::npos) << m;
  m = message([] { Tokenizer::from_json("{\"model\": ", "t.json"); });
  EXPECT_NE(m.find("t.json: invalid JSON"), std::string::npos) << m;
  m = message([] { Tokenizer::from_json("[1, 2]", "t.json"); });
  EXPECT_NE(m.find("not a tokenizer.json"), std::string::npos) << m;
  m = message([] { Tokenizer::from_json(R"({"model": {"type": "Unigram", "vocab": []}})", "t.json"); });
  EXPECT_NE(m.find("model type"), std::string::npos) << m;

  const std::string byte_level = kByteLevelPre;
  Tokenizer t = Tokenizer::from_json(tiny_json(R"(["a b", ["ab", "c"]])", byte_level), "tiny.json");
  // "abcab" -> a b | c | a b -> ab c ab -> abc ab; " abd" -> ' ' ab d.
  EXPECT_EQ(t.encode("abcab abd"), (std::vector<int32_t>{257, 256, ' ', 256, 'd'}));
  m = message([&] { Tokenizer::from_json(tiny_json(R"(["a zz"])", byte_level), "tiny.json"); });
  EXPECT_NE(m.find("merge #0 'a zz'"), std::string::npos) << m;
  m = message([&] { Tokenizer::from_json(tiny_json(R"(["a b c"])", byte_level), "tiny.json"); });
  EXPECT_NE(m.find("merge #0"), std::string::npos) << m;
  m = message([&] { Tokenizer::from_json(tiny_json("[]", R"({"type": "Whitespace"})"), "tiny.json"); });
  EXPECT_NE(m.find("pre-tokenizer type 'Whitespace' is not supported"), std::string::npos) << m;
  m = message([&] { Tokenizer::from_json(tiny_json("[]", "null"), "tiny.json"); });
  EXPECT_NE(m.find("not a byte-level BPE"), std::string::npos) << m;
  m = message([&] {
    Tokenizer::from_json(tiny_json("[]", R"({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "(["}, "behavior": "Isolated"}, )" + byte_level + "]}"), "tiny.json");
  });
  EXPECT_NE(m.find("cannot compile regex"), std::string::npos) << m;
  m = message([&] { Tokenizer::from_json(tiny_json("[]", byte_level, R"(, "normalizer": {"type": "Lowercase"})"), "tiny.json"); });
  EXPECT_NE(m.find("normalizer type 'Lowercase'"), std::string::npos) << m;
  m = message([&] {
    Tokenizer::from_json(tiny_json("[]", byte_level, R"(, "post_processor": {"type": "Weird"})"), "tiny.json")
        .encode("a", {.add_special = true});
  });
  EXPECT_NE(m.find("post_processor type 'Weird'"), std::string::npos) << m;
}

namespace {

// A tiny GGUF tokenizer: 256 byte tokens, "ab" (256), control "<|x|>" (257), user-defined
// "<u>" (258); merges "a b". `edit` changes the metadata before writing.
std::string write_tiny_gguf(const std::string& path, const std::function<void(GGUFWriter&)>& edit = {}) {
  GGUFWriter w;
  std::vector<std::string> tokens = byte_level_chars();
  tokens.push_back("ab");
  tokens.push_back("<|x|>");
  tokens.push_back("<u>");
  std::vector<int32_t> types(256, 1);
  types.insert(types.end(), {1, 3, 4});
  w.set_string("tokenizer.ggml.model", "gpt2");
  w.set_string("tokenizer.ggml.pre", "qwen2");
  w.set_string_array("tokenizer.ggml.tokens", tokens);
  w.set_i32_array("tokenizer.ggml.token_type", types);
  const std::vector<std::string> merges = {"a b"};
  w.set_string_array("tokenizer.ggml.merges", merges);
  w.set_u32("tokenizer.ggml.bos_token_id", 257);
  if (edit) edit(w);
  w.write(path);
  return path;
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / (name + "_" + std::to_string(::getpid()))).string();
}

}  // namespace

TEST(Tokenizer, TinyGgufTokenizer) {
  const std::string path = write_tiny_gguf(temp_path("mp_tiny_tok.gguf"));
  const Tokenizer t = Tokenizer::load(path);
  EXPECT_EQ(t.encode("ab<|x|>a<u>"), (std::vector<int32_t>{256, 257, 'a', 258}));
  EXPECT_EQ(t.encode("<|x|>", {.parse_special = false}), (std::vector<int32_t>{'<', '|', 'x', '|', '>'}));
  EXPECT_EQ(t.decode(std::vector<int32_t>{256, 257, 258}, {.skip_special = true}), "ab<u>");
  EXPECT_EQ(t.bos_id(), 257);
  EXPECT_EQ(t.encode("ab", {.add_special = false}), std::vector<int32_t>{256});
  std::filesystem::remove(path);
}

TEST(Tokenizer, GgufMetadataErrors) {
  const std::string path = temp_path("mp_bad_tok.gguf");
  auto message = [&](const std::function<void(GGUFWriter&)>& edit) {
    write_tiny_gguf(path, edit);
    try {
      Tokenizer::load(path);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  std::string m = message([](GGUFWriter& w) { w.set_string("tokenizer.ggml.model", "llama"); });
  EXPECT_NE(m.find("tokenizer.ggml.model 'llama' is not supported"), std::string::npos) << m;
  m = message([](GGUFWriter& w) { w.set_string("tokenizer.ggml.pre", "klingon"); });
  EXPECT_NE(m.find("tokenizer.ggml.pre 'klingon' is not supported"), std::string::npos) << m;
  m = message([](GGUFWriter& w) { w.set_u32("tokenizer.ggml.tokens", 5); });
  EXPECT_NE(m.find("'tokenizer.ggml.tokens' is u32 5, wanted an array of strings"), std::string::npos) << m;
  m = message([](GGUFWriter& w) { w.set_i32_array("tokenizer.ggml.token_type", std::vector<int32_t>{1, 1}); });
  EXPECT_NE(m.find("token_type has 2 entries but tokenizer.ggml.tokens has 259"), std::string::npos) << m;
  m = message([](GGUFWriter& w) { w.set_string_array("tokenizer.ggml.merges", std::vector<std::string>{"a zz"}); });
  EXPECT_NE(m.find("merge #0 'a zz'"), std::string::npos) << m;
  m = message([](GGUFWriter& w) { w.set_string_array("tokenizer.ggml.merges", std::vector<std::string>{"ab"}); });
  EXPECT_NE(m.find("tokenizer.ggml.merges[0] = 'ab' is not two tokens"), std::string::npos) << m;
  m = message([](GGUFWriter& w) { w.set_u32("tokenizer.ggml.bos_token_id", 300); });
  EXPECT_NE(m.find("bos_token_id = 300 is not a token id"), std::string::npos) << m;
  m = message([](GGUFWriter& w) { w.set_string("tokenizer.ggml.merges", "a b"); });
  EXPECT_NE(m.find("wanted an array of strings"), std::string::npos) << m;
  std::filesystem::remove(path);
}

TEST(Tokenizer, CorruptInputsNeverCrash) {
  // Random edits of a valid tokenizer.json and a valid GGUF tokenizer: load or throw Error.
  std::mt19937 rng(5);
  const int n = small_scale() ? 100 : 400;
  const std::string json_text = tiny_json(R"(["a b", ["ab", "c"]])", kByteLevelPre,
                                          R"(, "added_tokens": [{"id": 258, "content": "<x>", "special": true}])");
  const char alphabet[] = "{}[]\":,0123456789 abtrue-\\";
  int loaded = 0;
  for (int k = 0; k < n; ++k) {
    std::string s = json_text;
    for (int e = 0; e < 1 + int(rng() % 3); ++e) s[rng() % s.size()] = alphabet[rng() % (sizeof(alphabet) - 1)];
    try {
      Tokenizer t = Tokenizer::from_json(s, "fuzz.json");
      t.decode(t.encode("abc <x> ab\n"));
      ++loaded;
    } catch (const Error&) {
    }
  }
  EXPECT_GT(loaded, 0);
  const std::string path = write_tiny_gguf(temp_path("mp_fuzz_tok.gguf"));
  std::string bytes;
  {
    std::ifstream f(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), {});
  }
  for (int k = 0; k < n; ++k) {
    std::string b = bytes;
    for (int e = 0; e < 1 + int(rng() % 3); ++e) b[rng() % b.size()] = char(rng());
    std::ofstream(path, std::ios::binary | std::ios::trunc) << b;
    try {
      Tokenizer t = Tokenizer::load(path);
      t.decode(t.encode("abc <|x|> ab"));
    } catch (const Error&) {
    }
  }
  std::filesystem::remove(path);
}

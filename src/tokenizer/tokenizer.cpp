#include "multipole/tokenizer/tokenizer.hpp"

#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>

#include "multipole/core/error.hpp"
#include "multipole/io/gguf.hpp"
#include "tokenizer/byte_level.hpp"
#include "tokenizer/tokenizer_impl.hpp"
#include "tokenizer/utf8.hpp"

namespace multipole {

namespace {

constexpr int32_t kMaxTokenId = (1 << 26) - 1;  // far above any real vocabulary
constexpr size_t kMaxIdGap = 1 << 16;           // ids may skip a few, not millions

bool is_unicode_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

bool is_word_char(uint32_t cp) {
  if (cp == '_') return true;
  const utf8proc_category_t c = utf8proc_category(utf8proc_int32_t(cp));
  return (c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO) || (c >= UTF8PROC_CATEGORY_ND && c <= UTF8PROC_CATEGORY_NO);
}

// Start of the character that ends just before `pos` (text is valid UTF-8).
size_t char_before(std::string_view text, size_t pos) {
  size_t p = pos - 1;
  while (p > 0 && (static_cast<unsigned char>(text[p]) & 0xC0) == 0x80) --p;
  return p;
}

std::string normalize(std::string_view text, const std::vector<NormForm>& forms) {
  std::string s(text);
  if (forms.empty() || utf8::is_ascii(s)) return s;  // ASCII is invariant under every form
  for (NormForm f : forms) {
    int options = UTF8PROC_STABLE;
    switch (f) {
      case NormForm::NFC: options |= UTF8PROC_COMPOSE; break;
      case NormForm::NFD: options |= UTF8PROC_DECOMPOSE; break;
      case NormForm::NFKC: options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
      case NormForm::NFKD: options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
    }
    utf8proc_uint8_t* out = nullptr;
    const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                            utf8proc_ssize_t(s.size()), &out, utf8proc_option_t(options));
    if (n < 0) fail("cannot normalize text: {}", utf8proc_errmsg(n));
    s.assign(reinterpret_cast<const char*>(out), size_t(n));
    std::free(out);
  }
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Added tokens

int32_t AddedTokenMatcher::child(int32_t node, unsigned char b) const {
  const auto& next = nodes_[size_t(node)].next;
  auto it = std::lower_bound(next.begin(), next.end(), std::pair<unsigned char, int32_t>(b, -1));
  return it != next.end() && it->first == b ? it->second : -1;
}

void AddedTokenMatcher::build(const std::vector<AddedToken>& tokens, bool normalized) {
  nodes_.assign(1, Node{});
  tokens_.clear();
  first_.fill(false);
  for (const AddedToken& t : tokens) {
    if (t.normalized != normalized || t.content.empty()) continue;
    int32_t node = 0;
    for (char ch : t.content) {
      const auto b = static_cast<unsigned char>(ch);
      int32_t c = child(node, b);
      if (c < 0) {
        c = int32_t(nodes_.size());
        auto& next = nodes_[size_t(node)].next;
        next.insert(std::lower_bound(next.begin(), next.end(), std::pair<unsigned char, int32_t>(b, -1)), {b, c});
        nodes_.emplace_back();
      }
      node = c;
    }
    if (nodes_[size_t(node)].token >= 0) continue;  // same content twice: the first id wins
    nodes_[size_t(node)].token = int32_t(tokens_.size());
    tokens_.push_back(t);
    first_[static_cast<unsigned char>(t.content[0])] = true;
  }
}

std::optional<AddedTokenMatcher::Match> AddedTokenMatcher::find(std::string_view text, size_t from,
                                                                 bool parse_special) const {
  if (tokens_.empty()) return std::nullopt;
  for (size_t pos = from; pos < text.size(); ++pos) {
    if (!first_[static_cast<unsigned char>(text[pos])]) continue;
    int32_t node = 0, best = -1;
    size_t best_end = 0;
    for (size_t k = pos; k < text.size(); ++k) {
      node = child(node, static_cast<unsigned char>(text[k]));
      if (node < 0) break;
      const int32_t t = nodes_[size_t(node)].token;
      if (t >= 0 && (parse_special || !tokens_[size_t(t)].special)) best = t, best_end = k + 1;
    }
    if (best < 0) continue;
    const AddedToken& tok = tokens_[size_t(best)];
    size_t begin = pos, end = best_end;
    if (tok.single_word) {
      // Only a whole word: no word character right before or after it.
      const bool before = begin > 0 && is_word_char(utf8::scan(text, char_before(text, begin)).cp);
      const bool after = end < text.size() && is_word_char(utf8::scan(text, end).cp);
      if (before || after) continue;
    }
    if (tok.lstrip) {
      while (begin > from) {
        const size_t p = char_before(text, begin);
        if (!is_unicode_space(utf8::scan(text, p).cp)) break;
        begin = p;
      }
    }
    if (tok.rstrip) {
      while (end < text.size()) {
        const utf8::Scan sc = utf8::scan(text, end);
        if (sc.kind != utf8::Scan::Char || !is_unicode_space(sc.cp)) break;
        end += sc.length;
      }
    }
    return Match{begin, end, tok.id};
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------
// Building

std::shared_ptr<const Regex> compiled_regex(std::string_view pattern) {
  static std::mutex mutex;
  static std::map<std::string, std::weak_ptr<const Regex>, std::less<>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(pattern);
  if (it != cache.end())
    if (auto r = it->second.lock()) return r;
  auto r = std::make_shared<const Regex>(pattern, "pre-tokenizer");
  cache[std::string(pattern)] = r;
  return r;
}

std::shared_ptr<Tokenizer::Impl> build_tokenizer(TokenizerParts& parts) {
  auto impl = std::make_shared<Tokenizer::Impl>();
  const std::string& src = parts.source;
  impl->source = parts.source;
  impl->pre_name = parts.pre_name;
  impl->normalizers = parts.normalizers;
  impl->pre_steps = parts.pre_steps;
  impl->bos = parts.bos;
  impl->eos = parts.eos;
  impl->prefix = parts.prefix;
  impl->suffix = parts.suffix;
  impl->add_special_problem = parts.add_special_problem;

  int32_t max_id = -1;
  auto check_range = [&](int32_t id, std::string_view what, std::string_view text) {
    if (id < 0 || id > kMaxTokenId) fail("{}: {} '{}' has id {} (must be in [0, {}])", src, what, text, id, kMaxTokenId);
    max_id = std::max(max_id, id);
  };
  for (const auto& [text, id] : parts.vocab) check_range(id, "token", text);
  for (const AddedToken& t : parts.added) check_range(t.id, "added token", t.content);
  if (max_id < 0) fail("{}: the vocabulary is empty", src);
  const size_t n_tokens = parts.vocab.size() + parts.added.size();
  if (size_t(max_id) >= n_tokens + kMaxIdGap)
    fail("{}: token id {} is far beyond the {} tokens (ids may leave at most {} unused)", src, max_id, n_tokens,
         kMaxIdGap);
  const size_t n = size_t(max_id) + 1;
  impl->pieces.assign(n, {});
  impl->kinds.assign(n, TokenKind::Normal);
  impl->present.assign(n, false);

  // Vocabulary: byte-level spelling -> id (for the merges), bytes -> id (for lookups).
  std::unordered_map<std::string_view, int32_t> by_text;
  std::unordered_map<std::string, int32_t> by_bytes;
  by_text.reserve(parts.vocab.size());
  by_bytes.reserve(parts.vocab.size());
  std::string bytes;
  for (const auto& [text, id] : parts.vocab) {
    if (impl->present[size_t(id)]) fail("{}: tokens '{}' and '{}' share id {}", src, impl->pieces[size_t(id)], text, id);
    if (!byte_level::decode(text, bytes)) bytes.assign(text);  // not byte-level: the text itself
    impl->pieces[size_t(id)] = bytes;
    impl->present[size_t(id)] = true;
    by_text.emplace(text, id);  // a repeated spelling keeps its first id
    by_bytes.emplace(bytes, id);
  }
  std::array<int32_t, 256> byte_token;
  const auto& byte_chars = byte_level::byte_to_char();
  for (int b = 0; b < 256; ++b) {
    auto it = by_text.find(byte_chars[size_t(b)]);
    byte_token[size_t(b)] = it == by_text.end() ? -1 : it->second;
  }
  std::vector<BpeModel::Merge> merges;
  merges.reserve(parts.merges.size());
  std::string joined;
  for (size_t r = 0; r < parts.merges.size(); ++r) {
    const auto& [a, b] = parts.merges[r];
    auto ia = by_text.find(a), ib = by_text.find(b);
    joined.assign(a).append(b);
    auto ij = by_text.find(joined);
    if (ia == by_text.end() || ib == by_text.end() || ij == by_text.end())
      fail("{}: merge #{} '{} {}' uses a token that is not in the vocabulary ('{}')", src, r, a, b,
           ia == by_text.end() ? a : ib == by_text.end() ? b : std::string_view(joined));
    merges.push_back({ia->second, ib->second, ij->second});
  }
  impl->bpe = std::make_unique<BpeModel>(src, byte_token, merges, std::move(by_bytes), parts.ignore_merges);

  // Added tokens override a vocabulary entry with the same id (GPT-2 lists <|endoftext|>
  // in both).
  for (const AddedToken& t : parts.added) {
    if (t.content.empty()) fail("{}: added token {} has empty content", src, t.id);
    impl->pieces[size_t(t.id)] = t.content;
    impl->kinds[size_t(t.id)] = t.special ? TokenKind::Special : TokenKind::Added;
    impl->present[size_t(t.id)] = true;
    impl->added_by_content.emplace(t.content, t.id);
  }
  impl->raw_matcher.build(parts.added, false);
  impl->normalized_matcher.build(parts.added, true);
  for (auto ids : {&impl->prefix, &impl->suffix})
    for (int32_t id : *ids)
      if (id < 0 || size_t(id) >= n || !impl->present[size_t(id)])
        fail("{}: the post-processor adds token id {}, which is not in the vocabulary", src, id);
  for (auto id : {impl->bos, impl->eos})
    if (id && (*id < 0 || size_t(*id) >= n || !impl->present[size_t(*id)]))
      fail("{}: BOS/EOS token id {} is not in the vocabulary ({} ids)", src, *id, n);
  return impl;
}

// ---------------------------------------------------------------------------------------
// Encoding

void Tokenizer::Impl::check_id(int32_t id) const {
  if (id < 0 || size_t(id) >= pieces.size() || !present[size_t(id)])
    fail("{}: token id {} is not in the vocabulary ({} ids)", source, id, pieces.size());
}

void Tokenizer::Impl::encode_normalized(std::string_view text, std::vector<int32_t>& out) const {
  // Pieces are views into `text` or into `owned` (pieces with a prepended space).
  std::deque<std::string> owned;
  std::vector<std::string_view> pieces{text}, next;
  std::vector<std::pair<size_t, size_t>> matches;
  for (const PreStep& step : pre_steps) {
    next.clear();
    for (std::string_view piece : pieces) {
      if (step.kind == PreStep::PrefixSpace) {
        if (!piece.empty() && piece[0] == ' ') {
          next.push_back(piece);
        } else {
          std::string& spaced = owned.emplace_back(1, ' ');
          spaced.append(piece);
          next.push_back(spaced);
        }
        continue;
      }
      matches.clear();
      step.regex->find_all(piece, matches);
      size_t last = 0;
      for (const auto& [b, e] : matches) {
        if (b > last) next.push_back(piece.substr(last, b - last));
        if (step.kind == PreStep::SplitIsolated) next.push_back(piece.substr(b, e - b));
        last = e;
      }
      if (last < piece.size()) next.push_back(piece.substr(last));
    }
    pieces.swap(next);
  }
  for (std::string_view piece : pieces) bpe->encode(piece, out);
}

void Tokenizer::Impl::encode_fragment(std::string_view fragment, bool parse_special, std::vector<int32_t>& out) const {
  if (fragment.empty()) return;
  const std::string text = normalize(fragment, normalizers);
  size_t pos = 0;
  while (pos < text.size()) {
    auto m = normalized_matcher.find(text, pos, parse_special);
    const size_t stop = m ? m->begin : text.size();
    if (stop > pos) encode_normalized(std::string_view(text).substr(pos, stop - pos), out);
    if (!m) break;
    out.push_back(m->id);
    pos = m->end;
  }
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, const EncodeOptions& options) const {
  const Impl& im = *impl_;
  const size_t bad = utf8::first_invalid(text);
  if (bad != std::string_view::npos)
    fail("{}: cannot tokenize: the text is not valid UTF-8 at byte {} (of {})", im.source, bad, text.size());
  if (options.add_special && !im.add_special_problem.empty())
    fail("{}: cannot add special tokens: {}", im.source, im.add_special_problem);
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (options.add_special) out.insert(out.end(), im.prefix.begin(), im.prefix.end());
  size_t pos = 0;
  while (pos < text.size()) {
    auto m = im.raw_matcher.find(text, pos, options.parse_special);
    const size_t stop = m ? m->begin : text.size();
    im.encode_fragment(text.substr(pos, stop - pos), options.parse_special, out);
    if (!m) break;
    out.push_back(m->id);
    pos = m->end;
  }
  if (options.add_special) out.insert(out.end(), im.suffix.begin(), im.suffix.end());
  return out;
}

// ---------------------------------------------------------------------------------------
// Decoding and lookups

std::string Tokenizer::decode(std::span<const int32_t> ids, const DecodeOptions& options) const {
  const Impl& im = *impl_;
  std::string out;
  for (int32_t id : ids) {
    im.check_id(id);
    if (options.skip_special && im.kinds[size_t(id)] == TokenKind::Special) continue;
    out += im.pieces[size_t(id)];
  }
  return out;
}

size_t Tokenizer::vocab_size() const { return impl_->pieces.size(); }

std::string_view Tokenizer::piece(int32_t id) const {
  impl_->check_id(id);
  return impl_->pieces[size_t(id)];
}

TokenKind Tokenizer::kind(int32_t id) const {
  impl_->check_id(id);
  return impl_->kinds[size_t(id)];
}

std::optional<int32_t> Tokenizer::Impl::find_token(std::string_view text) const {
  auto it = added_by_content.find(std::string(text));
  if (it != added_by_content.end()) return it->second;
  const int32_t id = bpe->find(text);
  return id >= 0 ? std::optional<int32_t>(id) : std::nullopt;
}

std::optional<int32_t> Tokenizer::token_id(std::string_view text) const { return impl_->find_token(text); }

std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos; }
const std::string& Tokenizer::source() const { return impl_->source; }
const std::string& Tokenizer::pre_tokenizer() const { return impl_->pre_name; }

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, DecodeOptions options)
    : impl_(tokenizer.impl_), options_(options) {}

std::string StreamDecoder::push(int32_t id) {
  impl_->check_id(id);
  if (options_.skip_special && impl_->kinds[size_t(id)] == TokenKind::Special) return {};
  pending_ += impl_->pieces[size_t(id)];
  std::string out;
  size_t pos = 0;
  while (pos < pending_.size()) {
    const utf8::Scan sc = utf8::scan(pending_, pos);
    if (sc.kind == utf8::Scan::Incomplete) break;  // wait for the rest of the character
    if (sc.kind == utf8::Scan::Char) {
      out.append(pending_, pos, sc.length);
    } else {
      out += utf8::kReplacement;
    }
    pos += sc.length;
  }
  pending_.erase(0, pos);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = pending_.empty() ? std::string() : std::string(utf8::kReplacement);
  pending_.clear();
  return out;
}

// ---------------------------------------------------------------------------------------
// Loading by path

Tokenizer Tokenizer::load(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) fail("{}: no such file or folder", path);
  if (fs::is_directory(st)) {
    const fs::path json = fs::path(path) / "tokenizer.json";
    if (fs::exists(json)) return from_json_file(json.string());
    std::vector<std::string> ggufs;
    for (const auto& entry : fs::directory_iterator(path, ec))
      if (entry.path().extension() == ".gguf") ggufs.push_back(entry.path().string());
    if (ggufs.size() == 1) return from_gguf(GGUFFile(ggufs[0]));
    fail("{}: the folder has no tokenizer.json{}", path,
         ggufs.empty() ? std::string(" and no .gguf file") : fmt::format(" and {} .gguf files (name one)", ggufs.size()));
  }
  char magic[4] = {};
  {
    std::ifstream f(path, std::ios::binary);
    if (!f) fail("{}: cannot open", path);
    f.read(magic, 4);
  }
  if (std::string_view(magic, 4) == "GGUF") return from_gguf(GGUFFile(path));
  return from_json_file(path);
}

}  // namespace multipole

#include "common/tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/tokenizer/bpe_model.h"
#include "common/tokenizer/components.h"
#include "common/tokenizer/pattern.h"
#include "common/tokenizer/unicode.h"
#include "common/util/file.h"
#include "common/util/status.h"
#include "nlohmann/json.hpp"

namespace kvrelay::tokenizer {
namespace {

using json = nlohmann::json;

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
};

// Start of the run of Unicode whitespace that ends at text[end].
size_t SkipWhitespaceBackward(absl::string_view text, size_t end) {
  uint32_t cp = 0;
  while (end > 0) {
    const size_t len = DecodeUtf8Before(text, end, &cp);
    if (len == 0 || !IsUnicodeWhitespace(cp)) break;
    end -= len;
  }
  return end;
}

// End of the run of Unicode whitespace that starts at text[begin].
size_t SkipWhitespaceForward(absl::string_view text, size_t begin) {
  uint32_t cp = 0;
  while (begin < text.size()) {
    const size_t len = DecodeUtf8At(text, begin, &cp);
    if (len == 0 || !IsUnicodeWhitespace(cp)) break;
    begin += len;
  }
  return begin;
}

// HF's ends_with_word / starts_with_word (regex `\w$` / `^\w`). Invalid UTF-8
// counts as a non-word character.
bool WordCharBefore(absl::string_view text, size_t end) {
  uint32_t cp = 0;
  return DecodeUtf8Before(text, end, &cp) > 0 && IsWordCharacter(cp);
}

bool WordCharAt(absl::string_view text, size_t pos) {
  uint32_t cp = 0;
  return DecodeUtf8At(text, pos, &cp) > 0 && IsWordCharacter(cp);
}

// A piece of input: either text to run through the pipeline or an added token.
struct Segment {
  absl::string_view text;
  int32_t token_id = -1;  // >= 0 for an added token
  bool at_origin = false;
};

// Finds added tokens in text the way HF's AddedVocabulary::find_matches does: an
// Aho-Corasick LeftmostLongest scan (non-overlapping; at the leftmost position the
// longest pattern), each match then filtered by single_word and widened by
// lstrip/rstrip. A match rejected by single_word is skipped as a whole: the scan
// resumes after it, shorter patterns at the same position are not tried.
class AddedTokenMatcher {
 public:
  // `patterns[k]` is the text to look for for `(*tokens)[token_index[k]]`.
  void Build(const std::vector<AddedToken>* tokens, const std::vector<std::string>& patterns,
             const std::vector<size_t>& token_index) {
    tokens_ = tokens;
    nodes_.assign(1, -1);
    edges_.clear();
    first_byte_.fill(false);
    for (size_t k = 0; k < patterns.size(); ++k) {
      const std::string& s = patterns[k];
      if (s.empty()) continue;
      first_byte_[static_cast<uint8_t>(s[0])] = true;
      int32_t node = 0;
      for (char c : s) {
        const uint64_t key = EdgeKey(node, c);
        auto it = edges_.find(key);
        if (it == edges_.end()) {
          nodes_.push_back(-1);
          it = edges_.emplace(key, static_cast<int32_t>(nodes_.size() - 1)).first;
        }
        node = it->second;
      }
      // A later duplicate wins (HF maps a content to the id it was added with last).
      nodes_[node] = static_cast<int32_t>(token_index[k]);
    }
  }

  bool empty() const { return nodes_.size() <= 1; }

  std::vector<Segment> Split(absl::string_view text) const {
    std::vector<Segment> out;
    size_t emitted = 0;  // end of the last segment
    size_t pos = 0;
    while (pos < text.size()) {
      if (!first_byte_[static_cast<uint8_t>(text[pos])]) {
        ++pos;
        continue;
      }
      // Longest pattern starting at pos.
      int32_t token = -1;
      size_t match_end = 0;
      int32_t node = 0;
      for (size_t j = pos; j < text.size(); ++j) {
        auto it = edges_.find(EdgeKey(node, text[j]));
        if (it == edges_.end()) break;
        node = it->second;
        if (nodes_[node] >= 0) {
          token = nodes_[node];
          match_end = j + 1;
        }
      }
      if (token < 0) {
        ++pos;
        continue;
      }
      const AddedToken& tok = (*tokens_)[token];
      size_t begin = pos;
      size_t end = match_end;
      pos = match_end;  // the scan resumes here, even when rstrip takes more
      if (tok.single_word && ((begin > 0 && WordCharBefore(text, begin)) ||
                              (end < text.size() && WordCharAt(text, end)))) {
        continue;
      }
      if (tok.lstrip) {
        // Not into the previous segment. (A match can start inside the previous
        // token's rstrip whitespace only if it starts with whitespace itself; like
        // HF the pieces then overlap, which does not matter for the ids.)
        begin = std::min(std::max(SkipWhitespaceBackward(text, begin), emitted), end);
      }
      if (tok.rstrip) end = SkipWhitespaceForward(text, end);
      if (begin > emitted) {
        out.push_back({text.substr(emitted, begin - emitted), -1, emitted == 0});
      }
      out.push_back({text.substr(begin, end - begin), tok.id, begin == 0});
      emitted = end;
    }
    if (emitted < text.size()) {
      out.push_back({text.substr(emitted), -1, emitted == 0});
    }
    return out;
  }

 private:
  static uint64_t EdgeKey(int32_t node, char c) {
    return (static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(c);
  }
  const std::vector<AddedToken>* tokens_ = nullptr;
  std::vector<int32_t> nodes_{-1};  // node -> token index or -1
  absl::flat_hash_map<uint64_t, int32_t> edges_;
  std::array<bool, 256> first_byte_{};
};

class HfTokenizer final : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<HfTokenizer>> Parse(const json& root) {
    std::unique_ptr<HfTokenizer> t(new HfTokenizer());
    if (!root.is_object()) return absl::InvalidArgumentError("top level is not an object");
    if (!root.contains("model")) return absl::InvalidArgumentError("missing 'model'");
    KVR_ASSIGN_OR_RETURN(t->model_, BpeModel::FromJson(root["model"]));
    const json null_json;
    auto field = [&](const char* key) -> const json& {
      auto it = root.find(key);
      return it == root.end() ? null_json : *it;
    };
    KVR_ASSIGN_OR_RETURN(t->normalizer_, ParseNormalizer(field("normalizer")));
    KVR_ASSIGN_OR_RETURN(t->pre_tokenizer_, ParsePreTokenizer(field("pre_tokenizer")));
    KVR_ASSIGN_OR_RETURN(t->decoder_, ParseDecoder(field("decoder")));
    KVR_ASSIGN_OR_RETURN(t->template_, ParsePostProcessor(field("post_processor")));
    KVR_RETURN_IF_ERROR(t->ParseAddedTokens(field("added_tokens")));
    t->vocab_size_ = t->model_->max_id() + 1;
    for (const AddedToken& a : t->added_) t->vocab_size_ = std::max(t->vocab_size_, a.id + 1);
    for (const auto* ids : {&t->template_.prefix, &t->template_.suffix}) {
      for (int32_t id : *ids) {
        if (id < 0 || id >= t->vocab_size_) {
          return absl::InvalidArgumentError(
              absl::StrCat("post_processor: id ", id, " is outside the vocabulary"));
        }
      }
    }
    return t;
  }

  // HF's AddedVocabulary::extract_and_normalize: split the raw text on the
  // non-normalized added tokens; normalize each remaining piece and split it on the
  // normalized added tokens (whose patterns are their normalized contents); then
  // pre-tokenize and run the model on what is left.
  std::vector<int32_t> Encode(absl::string_view text, bool add_special_tokens) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 3 + 8);
    if (add_special_tokens) ids = template_.prefix;
    for (const Segment& seg : raw_matcher_.Split(text)) {
      if (seg.token_id >= 0) {
        ids.push_back(seg.token_id);
        continue;
      }
      std::string normalized = normalizer_ != nullptr
                                   ? normalizer_->Normalize(std::string(seg.text))
                                   : std::string(seg.text);
      if (normalized.empty()) continue;
      if (normalized_matcher_.empty()) {
        EncodePiece(std::move(normalized), seg.at_origin, &ids);
        continue;
      }
      for (const Segment& sub : normalized_matcher_.Split(normalized)) {
        if (sub.token_id >= 0) {
          ids.push_back(sub.token_id);
        } else if (!sub.text.empty()) {
          EncodePiece(std::string(sub.text), seg.at_origin && sub.at_origin, &ids);
        }
      }
    }
    if (add_special_tokens) ids.insert(ids.end(), template_.suffix.begin(), template_.suffix.end());
    return ids;
  }

  std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int32_t id : ids) {
      auto it = added_by_id_.find(id);
      if (it != added_by_id_.end()) {
        const AddedToken& a = added_[it->second];
        if (!(skip_special_tokens && a.special)) tokens.push_back(a.content);
        continue;
      }
      if (const std::string* token = model_->IdToToken(id)) tokens.push_back(*token);
      // Unknown ids are skipped.
    }
    std::string text;
    if (decoder_ != nullptr) {
      decoder_->DecodeChain(&tokens);
      text = absl::StrJoin(tokens, "");
    } else {
      text = absl::StrJoin(tokens, " ");
    }
    return ToValidUtf8Lossy(text);
  }

  int32_t vocab_size() const override { return vocab_size_; }

  std::optional<int32_t> TokenToId(absl::string_view token) const override {
    auto it = added_by_content_.find(token);
    if (it != added_by_content_.end()) return added_[it->second].id;
    return model_->TokenToId(token);
  }

  std::optional<std::string> IdToToken(int32_t id) const override {
    auto it = added_by_id_.find(id);
    if (it != added_by_id_.end()) return added_[it->second].content;
    if (const std::string* token = model_->IdToToken(id)) return *token;
    return std::nullopt;
  }

  bool IsByteFallbackToken(int32_t id) const override {
    if (decoder_ == nullptr || !decoder_->UsesByteFallback()) return false;
    auto it = added_by_id_.find(id);
    if (it != added_by_id_.end()) return ParseByteFallbackToken(added_[it->second].content) >= 0;
    const std::string* token = model_->IdToToken(id);
    return token != nullptr && ParseByteFallbackToken(*token) >= 0;
  }

  bool IsSpecial(int32_t id) const override {
    auto it = added_by_id_.find(id);
    return it != added_by_id_.end() && added_[it->second].special;
  }

  std::optional<int32_t> bos_token_id() const override {
    if (template_.prefix.empty()) return std::nullopt;
    return template_.prefix.front();
  }

 private:
  HfTokenizer() = default;

  // Normalized text between added tokens -> pre-tokenizer -> model.
  void EncodePiece(std::string normalized, bool at_origin, std::vector<int32_t>* ids) const {
    std::vector<PreToken> pieces(1);
    pieces[0].text = std::move(normalized);
    pieces[0].at_origin = at_origin;
    if (pre_tokenizer_ != nullptr) pre_tokenizer_->PreTokenize(&pieces);
    for (const PreToken& p : pieces) model_->Encode(p.text, ids);
  }

  absl::Status ParseAddedTokens(const json& list) {
    if (list.is_null()) return absl::OkStatus();
    try {
      if (!list.is_array()) return absl::InvalidArgumentError("added_tokens: not an array");
      for (const json& j : list) {
        AddedToken a;
        const int64_t id = j.at("id").get<int64_t>();
        if (id < 0 || id >= BpeModel::kMaxId) {
          return absl::InvalidArgumentError(absl::StrCat("added_tokens: id ", id, " out of range"));
        }
        a.id = static_cast<int32_t>(id);
        a.content = j.at("content").get<std::string>();
        if (a.content.empty()) return absl::InvalidArgumentError("added_tokens: empty content");
        a.special = j.value("special", false);
        a.single_word = j.value("single_word", false);
        a.lstrip = j.value("lstrip", false);
        a.rstrip = j.value("rstrip", false);
        // HF requires the field; when it is missing, default like AddedToken::from(content,
        // special).
        a.normalized = j.value("normalized", !a.special);
        added_by_id_[a.id] = added_.size();
        added_by_content_[a.content] = added_.size();
        added_.push_back(std::move(a));
      }
    } catch (const json::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat("malformed added_tokens: ", e.what()));
    }
    // Non-normalized tokens are looked for in the raw text, normalized ones (by
    // their normalized content) in the normalized pieces between the former.
    std::vector<std::string> raw_patterns, normalized_patterns;
    std::vector<size_t> raw_index, normalized_index;
    for (size_t k = 0; k < added_.size(); ++k) {
      const AddedToken& a = added_[k];
      if (!a.normalized) {
        raw_patterns.push_back(a.content);
        raw_index.push_back(k);
        continue;
      }
      std::string pattern = normalizer_ != nullptr ? normalizer_->Normalize(a.content) : a.content;
      if (pattern.empty()) continue;
      normalized_patterns.push_back(std::move(pattern));
      normalized_index.push_back(k);
    }
    raw_matcher_.Build(&added_, raw_patterns, raw_index);
    normalized_matcher_.Build(&added_, normalized_patterns, normalized_index);
    return absl::OkStatus();
  }

  std::unique_ptr<BpeModel> model_;
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::unique_ptr<Decoder> decoder_;
  PostTemplate template_;
  std::vector<AddedToken> added_;
  absl::flat_hash_map<int32_t, size_t> added_by_id_;
  absl::flat_hash_map<std::string, size_t> added_by_content_;
  AddedTokenMatcher raw_matcher_;         // normalized: false
  AddedTokenMatcher normalized_matcher_;  // normalized: true
  int32_t vocab_size_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(const std::string& json_text,
                                                               const std::string& path) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": malformed JSON: ", e.what()));
  }
  absl::StatusOr<std::unique_ptr<HfTokenizer>> t;
  try {
    t = HfTokenizer::Parse(root);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": malformed tokenizer: ", e.what()));
  }
  if (!t.ok()) {
    return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
  }
  return std::unique_ptr<Tokenizer>(std::move(t).value());
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  KVR_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  return FromJson(text, path);
}

// ---------------------------------------------------------------------------
// StreamingDetokenizer: vLLM's prefix_offset / read_offset algorithm. The text of
// ids_[prefix_offset_, read_offset_) has been emitted; it is re-decoded together
// with the new ids so that context-dependent decoders (Metaspace, Strip) produce
// the same text as a full Decode, and only the new suffix is returned. A suffix
// ending in U+FFFD (an incomplete UTF-8 sequence from byte-level tokens) is held
// back until more ids arrive.
//
// Byte-fallback runs need more: HF decodes a run of <0xNN> tokens as a whole, to
// its text if the bytes are valid UTF-8 and to one U+FFFD per token otherwise, so
// a valid run ("<0xE5><0x8F><0xAB>" = "叫") becomes "\uFFFD\uFFFD\uFFFD\uFFFD" when
// one more invalid byte follows. Holding back text that *ends* in U+FFFD does not
// cover that (already emitted text would change), so the text of a trailing run
// is only emitted once the run has ended. The offsets are kept at run boundaries,
// so the decoded windows split runs exactly where a full Decode does.

StreamingDetokenizer::StreamingDetokenizer(const Tokenizer* tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_(skip_special_tokens) {}

void StreamingDetokenizer::SetPrefix(const std::vector<int32_t>& prompt_ids) {
  // Like vLLM, re-decode the last few prompt tokens as context for the first new
  // one. Skipped special tokens (e.g. a chat template's trailing markers) do not
  // count, so the context always holds real text when the prompt has some.
  constexpr size_t kContextIds = 5;
  ids_ = prompt_ids;
  read_offset_ = ids_.size();
  prefix_offset_ = read_offset_;
  size_t context = 0;
  while (prefix_offset_ > 0 && context < kContextIds) {
    --prefix_offset_;
    if (!DecodesToNothing(ids_[prefix_offset_])) ++context;
  }
  // Do not start the context inside a byte-fallback run.
  while (prefix_offset_ > 0 && tokenizer_->IsByteFallbackToken(ids_[prefix_offset_]) &&
         tokenizer_->IsByteFallbackToken(ids_[prefix_offset_ - 1])) {
    --prefix_offset_;
  }
}

bool StreamingDetokenizer::DecodesToNothing(int32_t id) const {
  if (skip_special_ && tokenizer_->IsSpecial(id)) return true;
  return !tokenizer_->IdToToken(id).has_value();  // Decode skips unknown ids
}

size_t StreamingDetokenizer::StableEnd() const {
  // Start of a trailing run of byte-fallback tokens (ids that decode to nothing do
  // not end a run: Decode drops them before the decoder), else the end.
  size_t stable = ids_.size();
  for (size_t k = ids_.size(); k > read_offset_; --k) {
    const int32_t id = ids_[k - 1];
    if (tokenizer_->IsByteFallbackToken(id)) {
      stable = k - 1;
    } else if (!DecodesToNothing(id)) {
      break;
    }
  }
  return stable;
}

namespace {

// The text `new_text` adds to `prefix_text`, or nullopt if it is not an extension.
std::optional<std::string> Suffix(const std::string& prefix_text, const std::string& new_text) {
  if (!absl::StartsWith(new_text, prefix_text)) return std::nullopt;
  return new_text.substr(prefix_text.size());
}

}  // namespace

std::string StreamingDetokenizer::Push(int32_t id) {
  ids_.push_back(id);
  const size_t stable = StableEnd();
  if (stable <= read_offset_) return "";
  const auto begin = ids_.begin();
  const std::string prefix_text = tokenizer_->Decode(
      std::vector<int32_t>(begin + prefix_offset_, begin + read_offset_), skip_special_);
  const std::string new_text = tokenizer_->Decode(
      std::vector<int32_t>(begin + prefix_offset_, begin + stable), skip_special_);
  if (new_text.size() <= prefix_text.size() || absl::EndsWith(new_text, kReplacementChar)) {
    return "";
  }
  std::optional<std::string> suffix = Suffix(prefix_text, new_text);
  if (!suffix.has_value()) return "";  // not an extension (yet): wait for more ids
  prefix_offset_ = read_offset_;
  read_offset_ = stable;
  return *std::move(suffix);
}

std::string StreamingDetokenizer::Flush() {
  const auto begin = ids_.begin();
  const std::string prefix_text = tokenizer_->Decode(
      std::vector<int32_t>(begin + prefix_offset_, begin + read_offset_), skip_special_);
  const std::string new_text =
      tokenizer_->Decode(std::vector<int32_t>(begin + prefix_offset_, ids_.end()), skip_special_);
  prefix_offset_ = read_offset_ = ids_.size();
  std::optional<std::string> suffix = Suffix(prefix_text, new_text);
  if (suffix.has_value()) return *std::move(suffix);
  // Should not happen for the supported decoders: emit what differs after the
  // longest common prefix that ends on a character boundary.
  size_t common = 0;
  while (common < prefix_text.size() && common < new_text.size() &&
         prefix_text[common] == new_text[common]) {
    ++common;
  }
  while (common > 0 && (static_cast<uint8_t>(new_text[common]) & 0xC0) == 0x80) --common;
  return new_text.substr(common);
}

}  // namespace kvrelay::tokenizer

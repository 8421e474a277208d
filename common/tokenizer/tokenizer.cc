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
};

bool IsAsciiSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

// Approximation of "alphanumeric" for single_word: ASCII letters/digits, '_'
// and any non-ASCII byte.
bool IsWordByte(char c) {
  const auto u = static_cast<uint8_t>(c);
  return u >= 0x80 || (u >= '0' && u <= '9') || (u >= 'a' && u <= 'z') || (u >= 'A' && u <= 'Z') ||
         u == '_';
}

// A piece of input: either text to run through the pipeline or an added token.
struct Segment {
  absl::string_view text;
  int32_t token_id = -1;  // >= 0 for an added token
  bool at_origin = false;
};

// Finds added tokens in raw text: leftmost match first, longest at a position,
// honouring single_word / lstrip / rstrip.
class AddedTokenMatcher {
 public:
  void Build(const std::vector<AddedToken>* tokens) {
    tokens_ = tokens;
    nodes_.assign(1, -1);
    edges_.clear();
    first_byte_.fill(false);
    for (size_t t = 0; t < tokens->size(); ++t) {
      const std::string& s = (*tokens)[t].content;
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
      nodes_[node] = static_cast<int32_t>(t);  // a later duplicate wins
    }
  }

  std::vector<Segment> Split(absl::string_view text) const {
    std::vector<Segment> out;
    size_t emitted = 0;  // end of the last segment
    size_t pos = 0;
    std::vector<std::pair<size_t, int32_t>> candidates;  // (end, token index)
    while (pos < text.size()) {
      if (!first_byte_[static_cast<uint8_t>(text[pos])]) {
        ++pos;
        continue;
      }
      candidates.clear();
      int32_t node = 0;
      for (size_t j = pos; j < text.size(); ++j) {
        auto it = edges_.find(EdgeKey(node, text[j]));
        if (it == edges_.end()) break;
        node = it->second;
        if (nodes_[node] >= 0) candidates.emplace_back(j + 1, nodes_[node]);
      }
      bool matched = false;
      for (auto c = candidates.rbegin(); c != candidates.rend(); ++c) {
        const AddedToken& tok = (*tokens_)[c->second];
        size_t begin = pos;
        size_t end = c->first;
        if (tok.single_word && ((begin > 0 && IsWordByte(text[begin - 1])) ||
                                (end < text.size() && IsWordByte(text[end])))) {
          continue;
        }
        if (tok.lstrip) {
          while (begin > emitted && IsAsciiSpace(text[begin - 1])) --begin;
        }
        if (tok.rstrip) {
          while (end < text.size() && IsAsciiSpace(text[end])) ++end;
        }
        if (begin > emitted) {
          out.push_back({text.substr(emitted, begin - emitted), -1, emitted == 0});
        }
        out.push_back({text.substr(begin, end - begin), tok.id, begin == 0});
        emitted = end;
        pos = end;
        matched = true;
        break;
      }
      if (!matched) ++pos;
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

  std::vector<int32_t> Encode(absl::string_view text, bool add_special_tokens) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 3 + 8);
    if (add_special_tokens) ids = template_.prefix;
    for (const Segment& seg : matcher_.Split(text)) {
      if (seg.token_id >= 0) {
        ids.push_back(seg.token_id);
        continue;
      }
      std::vector<PreToken> pieces(1);
      pieces[0].text = normalizer_ != nullptr ? normalizer_->Normalize(std::string(seg.text))
                                              : std::string(seg.text);
      pieces[0].at_origin = seg.at_origin;
      if (pieces[0].text.empty()) continue;
      if (pre_tokenizer_ != nullptr) pre_tokenizer_->PreTokenize(&pieces);
      for (const PreToken& p : pieces) model_->Encode(p.text, &ids);
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
        added_by_id_[a.id] = added_.size();
        added_by_content_[a.content] = added_.size();
        added_.push_back(std::move(a));
      }
    } catch (const json::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat("malformed added_tokens: ", e.what()));
    }
    matcher_.Build(&added_);
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
  AddedTokenMatcher matcher_;
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
// with the new ids so that context-dependent decoders (Metaspace, Strip, byte
// fallback runs) produce the same text as a full Decode, and only the new suffix
// is returned. A suffix ending in U+FFFD (an incomplete UTF-8 sequence) is held
// back until more ids arrive.

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
    if (!(skip_special_ && tokenizer_->IsSpecial(ids_[prefix_offset_]))) ++context;
  }
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
  const auto begin = ids_.begin();
  const std::string prefix_text = tokenizer_->Decode(
      std::vector<int32_t>(begin + prefix_offset_, begin + read_offset_), skip_special_);
  const std::string new_text =
      tokenizer_->Decode(std::vector<int32_t>(begin + prefix_offset_, ids_.end()), skip_special_);
  if (new_text.size() <= prefix_text.size() || absl::EndsWith(new_text, kReplacementChar)) {
    return "";
  }
  std::optional<std::string> suffix = Suffix(prefix_text, new_text);
  if (!suffix.has_value()) return "";  // not an extension (yet): wait for more ids
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
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

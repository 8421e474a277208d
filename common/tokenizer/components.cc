#include "common/tokenizer/components.h"

#include <functional>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/tokenizer/pattern.h"
#include "common/tokenizer/unicode.h"
#include "common/util/status.h"

namespace kvrelay::tokenizer {
namespace {

using json = nlohmann::json;

absl::Status Unsupported(absl::string_view what, const json& j) {
  std::string type = j.is_object() && j.contains("type") && j["type"].is_string()
                         ? j["type"].get<std::string>()
                         : j.dump();
  return absl::InvalidArgumentError(absl::StrCat("unsupported ", what, " type '", type, "'"));
}

absl::Status Malformed(absl::string_view what, absl::string_view detail) {
  return absl::InvalidArgumentError(absl::StrCat("malformed ", what, ": ", detail));
}

// Runs `f`, converting nlohmann::json exceptions (missing keys, wrong types) to
// INVALID_ARGUMENT naming `what`.
template <typename F>
auto CatchJson(absl::string_view what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const json::exception& e) {
    return Malformed(what, e.what());
  }
}

std::string TypeOf(const json& j) {
  if (!j.is_object()) return "";
  auto it = j.find("type");
  return it != j.end() && it->is_string() ? it->get<std::string>() : "";
}

// {"String": "..."} or {"Regex": "..."}.
absl::StatusOr<Pattern> ParsePattern(const json& j, absl::string_view what) {
  if (j.is_object() && j.contains("String"))
    return Pattern::Literal(j.at("String").get<std::string>());
  if (j.is_object() && j.contains("Regex")) {
    auto p = Pattern::FromRegex(j.at("Regex").get<std::string>());
    if (!p.ok()) return Malformed(what, p.status().message());
    return p;
  }
  return Malformed(what,
                   absl::StrCat("pattern must be {\"String\"|\"Regex\": ...}, got ", j.dump()));
}

// Metaspace "prepend_scheme" (new) or "add_prefix_space" (legacy).
enum class PrependScheme { kAlways, kFirst, kNever };

absl::StatusOr<PrependScheme> ParsePrependScheme(const json& j, absl::string_view what) {
  if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null()) {
    const std::string s = j["prepend_scheme"].get<std::string>();
    if (s == "always") return PrependScheme::kAlways;
    if (s == "first") return PrependScheme::kFirst;
    if (s == "never") return PrependScheme::kNever;
    return Malformed(what, absl::StrCat("unknown prepend_scheme '", s, "'"));
  }
  return j.value("add_prefix_space", true) ? PrependScheme::kAlways : PrependScheme::kNever;
}

// ---------------------------------------------------------------------------
// Normalizers

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts)
      : parts_(std::move(parts)) {}
  std::string Normalize(std::string text) const override {
    for (const auto& p : parts_) text = p->Normalize(std::move(text));
    return text;
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prepend) : prepend_(std::move(prepend)) {}
  std::string Normalize(std::string text) const override {
    if (text.empty()) return text;
    return prepend_ + text;
  }

 private:
  std::string prepend_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  std::string Normalize(std::string text) const override {
    return pattern_.ReplaceAll(text, content_);
  }

 private:
  Pattern pattern_;
  std::string content_;
};

// NFC without Unicode tables: identity (see components.h).
class NfcNormalizer final : public Normalizer {
 public:
  std::string Normalize(std::string text) const override { return text; }
};

absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizerImpl(const json& j) {
  if (j.is_null()) return std::unique_ptr<Normalizer>();
  const std::string type = TypeOf(j);
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Normalizer>> parts;
    for (const json& sub : j.at("normalizers")) {
      KVR_ASSIGN_OR_RETURN(auto n, ParseNormalizerImpl(sub));
      if (n != nullptr) parts.push_back(std::move(n));
    }
    return std::unique_ptr<Normalizer>(new SequenceNormalizer(std::move(parts)));
  }
  if (type == "Prepend") {
    return std::unique_ptr<Normalizer>(new PrependNormalizer(j.at("prepend").get<std::string>()));
  }
  if (type == "Replace") {
    KVR_ASSIGN_OR_RETURN(Pattern pattern, ParsePattern(j.at("pattern"), "Replace normalizer"));
    return std::unique_ptr<Normalizer>(
        new ReplaceNormalizer(std::move(pattern), j.at("content").get<std::string>()));
  }
  if (type == "NFC") return std::unique_ptr<Normalizer>(new NfcNormalizer());
  return Unsupported("normalizer", j);
}

// ---------------------------------------------------------------------------
// Pre-tokenizers

// Replaces each piece by its sub-pieces per `spans`.
void SplitPieces(const std::vector<PreToken>& in, std::vector<PreToken>* out,
                 const std::function<std::vector<Span>(absl::string_view)>& split) {
  for (const PreToken& piece : in) {
    for (const Span& s : split(piece.text)) {
      out->push_back(
          {piece.text.substr(s.begin, s.end - s.begin), piece.at_origin && s.begin == 0});
    }
  }
}

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(Pattern pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void PreTokenize(std::vector<PreToken>* pieces) const override {
    std::vector<PreToken> out;
    SplitPieces(*pieces, &out, [this](absl::string_view text) {
      return SplitByMatches(text, pattern_.FindAll(text), behavior_, invert_);
    });
    *pieces = std::move(out);
  }

 private:
  Pattern pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::optional<Pattern> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}
  void PreTokenize(std::vector<PreToken>* pieces) const override {
    std::vector<PreToken> out;
    const ByteUnicodeMap& map = ByteUnicodeMap::Get();
    for (PreToken& piece : *pieces) {
      if (add_prefix_space_ && (piece.text.empty() || piece.text[0] != ' ')) {
        piece.text.insert(0, 1, ' ');
      }
      if (!regex_.has_value()) {
        if (!piece.text.empty()) out.push_back({map.Encode(piece.text), piece.at_origin});
        continue;
      }
      const std::vector<Span> spans =
          SplitByMatches(piece.text, regex_->FindAll(piece.text), SplitBehavior::kIsolated, false);
      for (const Span& s : spans) {
        out.push_back({map.Encode(absl::string_view(piece.text).substr(s.begin, s.end - s.begin)),
                       piece.at_origin && s.begin == 0});
      }
    }
    *pieces = std::move(out);
  }

 private:
  bool add_prefix_space_;
  std::optional<Pattern> regex_;
};

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)),
        scheme_(scheme),
        split_(split),
        space_(*Pattern::Literal(" ")),
        rep_pattern_(*Pattern::Literal(replacement_)) {}
  void PreTokenize(std::vector<PreToken>* pieces) const override {
    std::vector<PreToken> replaced;
    for (PreToken& piece : *pieces) {
      std::string text = space_.ReplaceAll(piece.text, replacement_);
      const bool starts = absl::string_view(text).substr(0, replacement_.size()) == replacement_;
      if (!starts && (scheme_ == PrependScheme::kAlways ||
                      (scheme_ == PrependScheme::kFirst && piece.at_origin))) {
        text.insert(0, replacement_);
      }
      if (!text.empty()) replaced.push_back({std::move(text), piece.at_origin});
    }
    if (!split_) {
      *pieces = std::move(replaced);
      return;
    }
    std::vector<PreToken> out;
    SplitPieces(replaced, &out, [this](absl::string_view text) {
      return SplitByMatches(text, rep_pattern_.FindAll(text), SplitBehavior::kMergedWithNext,
                            false);
    });
    *pieces = std::move(out);
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
  Pattern space_;
  Pattern rep_pattern_;
};

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> parts)
      : parts_(std::move(parts)) {}
  void PreTokenize(std::vector<PreToken>* pieces) const override {
    for (const auto& p : parts_) p->PreTokenize(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizerImpl(const json& j) {
  if (j.is_null()) return std::unique_ptr<PreTokenizer>();
  const std::string type = TypeOf(j);
  if (type == "Sequence") {
    std::vector<std::unique_ptr<PreTokenizer>> parts;
    for (const json& sub : j.at("pretokenizers")) {
      KVR_ASSIGN_OR_RETURN(auto p, ParsePreTokenizerImpl(sub));
      if (p != nullptr) parts.push_back(std::move(p));
    }
    return std::unique_ptr<PreTokenizer>(new SequencePreTokenizer(std::move(parts)));
  }
  if (type == "ByteLevel") {
    std::optional<Pattern> regex;
    if (j.value("use_regex", true)) {
      KVR_ASSIGN_OR_RETURN(regex, Pattern::FromRegex(kGpt2Pattern));
    }
    return std::unique_ptr<PreTokenizer>(
        new ByteLevelPreTokenizer(j.value("add_prefix_space", true), std::move(regex)));
  }
  if (type == "Split") {
    KVR_ASSIGN_OR_RETURN(Pattern pattern, ParsePattern(j.at("pattern"), "Split pre_tokenizer"));
    SplitBehavior behavior;
    const std::string name = j.at("behavior").get<std::string>();
    if (!ParseSplitBehavior(name, &behavior)) {
      return Malformed("Split pre_tokenizer", absl::StrCat("unknown behavior '", name, "'"));
    }
    return std::unique_ptr<PreTokenizer>(
        new SplitPreTokenizer(std::move(pattern), behavior, j.value("invert", false)));
  }
  if (type == "Metaspace") {
    KVR_ASSIGN_OR_RETURN(PrependScheme scheme, ParsePrependScheme(j, "Metaspace pre_tokenizer"));
    const std::string replacement = j.value("replacement", std::string("\xE2\x96\x81"));
    if (replacement.empty()) return Malformed("Metaspace pre_tokenizer", "empty replacement");
    return std::unique_ptr<PreTokenizer>(
        new MetaspacePreTokenizer(replacement, scheme, j.value("split", true)));
  }
  if (type == "Digits") {
    KVR_ASSIGN_OR_RETURN(Pattern digits, Pattern::FromRegex(R"(\p{N})"));
    const SplitBehavior behavior =
        j.value("individual_digits", false) ? SplitBehavior::kIsolated : SplitBehavior::kContiguous;
    return std::unique_ptr<PreTokenizer>(new SplitPreTokenizer(std::move(digits), behavior, false));
  }
  return Unsupported("pre_tokenizer", j);
}

// ---------------------------------------------------------------------------
// Decoders

class ByteLevelDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    const ByteUnicodeMap& map = ByteUnicodeMap::Get();
    std::string bytes;
    for (const std::string& token : *tokens) {
      const size_t mark = bytes.size();
      if (!map.Decode(token, &bytes)) {
        // A character outside the byte table (e.g. in an added token): keep the
        // token's own bytes, as HF does.
        bytes.resize(mark);
        bytes += token;
      }
    }
    tokens->assign(1, ToValidUtf8Lossy(bytes));
  }
};

class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, PrependScheme scheme)
      : replacement_(std::move(replacement)), scheme_(scheme) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (size_t i = 0; i < tokens->size(); ++i) {
      std::string& token = (*tokens)[i];
      const bool drop = i == 0 && scheme_ != PrependScheme::kNever;
      std::string out;
      size_t pos = 0;
      while (pos < token.size()) {
        if (token.compare(pos, replacement_.size(), replacement_) == 0) {
          if (!drop) out.push_back(' ');
          pos += replacement_.size();
        } else {
          out.push_back(token[pos++]);
        }
      }
      token = std::move(out);
    }
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (std::string& t : *tokens) t = pattern_.ReplaceAll(t, content_);
  }

 private:
  Pattern pattern_;
  std::string content_;
};

class ByteFallbackDecoder final : public Decoder {
 public:
  // tokenizers/src/decoders/byte_fallback.rs: a run of consecutive byte tokens
  // becomes its string if the bytes are valid UTF-8, else one U+FFFD per token.
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens->size());
    std::string bytes;
    auto flush_bytes = [&] {
      if (bytes.empty()) return;
      if (IsValidUtf8(bytes)) {
        out.push_back(bytes);
      } else {
        for (size_t k = 0; k < bytes.size(); ++k) out.emplace_back(kReplacementChar);
      }
      bytes.clear();
    };
    for (std::string& token : *tokens) {
      const int byte = ParseByteFallbackToken(token);
      if (byte >= 0) {
        bytes.push_back(static_cast<char>(byte));
        continue;
      }
      flush_bytes();
      out.push_back(std::move(token));
    }
    flush_bytes();
    *tokens = std::move(out);
  }
  bool UsesByteFallback() const override { return true; }
};

class FuseDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string all;
    for (const std::string& t : *tokens) all += t;
    tokens->assign(1, std::move(all));
  }
};

class StripDecoder final : public Decoder {
 public:
  StripDecoder(std::string content, size_t start, size_t stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    if (content_.empty()) return;
    const size_t n = content_.size();
    for (std::string& t : *tokens) {
      size_t begin = 0;
      for (size_t k = 0; k < start_ && t.compare(begin, n, content_) == 0; ++k) begin += n;
      size_t end = t.size();
      for (size_t k = 0; k < stop_ && end >= begin + n && t.compare(end - n, n, content_) == 0;
           ++k) {
        end -= n;
      }
      t = t.substr(begin, end - begin);
    }
  }

 private:
  std::string content_;
  size_t start_;
  size_t stop_;
};

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts)
      : parts_(std::move(parts)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (const auto& p : parts_) p->DecodeChain(tokens);
  }
  bool UsesByteFallback() const override {
    for (const auto& p : parts_) {
      if (p->UsesByteFallback()) return true;
    }
    return false;
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoderImpl(const json& j) {
  if (j.is_null()) return std::unique_ptr<Decoder>();
  const std::string type = TypeOf(j);
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Decoder>> parts;
    for (const json& sub : j.at("decoders")) {
      KVR_ASSIGN_OR_RETURN(auto d, ParseDecoderImpl(sub));
      if (d != nullptr) parts.push_back(std::move(d));
    }
    return std::unique_ptr<Decoder>(new SequenceDecoder(std::move(parts)));
  }
  if (type == "ByteLevel") return std::unique_ptr<Decoder>(new ByteLevelDecoder());
  if (type == "Metaspace") {
    KVR_ASSIGN_OR_RETURN(PrependScheme scheme, ParsePrependScheme(j, "Metaspace decoder"));
    const std::string replacement = j.value("replacement", std::string("\xE2\x96\x81"));
    if (replacement.empty()) return Malformed("Metaspace decoder", "empty replacement");
    return std::unique_ptr<Decoder>(new MetaspaceDecoder(replacement, scheme));
  }
  if (type == "Replace") {
    KVR_ASSIGN_OR_RETURN(Pattern pattern, ParsePattern(j.at("pattern"), "Replace decoder"));
    return std::unique_ptr<Decoder>(
        new ReplaceDecoder(std::move(pattern), j.at("content").get<std::string>()));
  }
  if (type == "ByteFallback") return std::unique_ptr<Decoder>(new ByteFallbackDecoder());
  if (type == "Fuse") return std::unique_ptr<Decoder>(new FuseDecoder());
  if (type == "Strip") {
    return std::unique_ptr<Decoder>(new StripDecoder(j.at("content").get<std::string>(),
                                                     j.value("start", size_t{0}),
                                                     j.value("stop", size_t{0})));
  }
  return Unsupported("decoder", j);
}

// ---------------------------------------------------------------------------
// Post-processors

absl::StatusOr<std::vector<int32_t>> SpecialIds(const json& special_tokens,
                                                const std::string& name) {
  auto it = special_tokens.find(name);
  if (it == special_tokens.end()) {
    return Malformed("TemplateProcessing",
                     absl::StrCat("special token '", name, "' missing from special_tokens"));
  }
  return it->at("ids").get<std::vector<int32_t>>();
}

absl::StatusOr<PostTemplate> ParseTemplate(const json& j) {
  const json& single = j.at("single");
  const json special = j.value("special_tokens", json::object());
  PostTemplate t;
  bool seen_sequence = false;
  auto add_special = [&](const std::string& name) -> absl::Status {
    KVR_ASSIGN_OR_RETURN(std::vector<int32_t> ids, SpecialIds(special, name));
    auto& dst = seen_sequence ? t.suffix : t.prefix;
    dst.insert(dst.end(), ids.begin(), ids.end());
    return absl::OkStatus();
  };
  if (single.is_string()) {  // "<s> $A </s>" form
    for (absl::string_view piece :
         absl::StrSplit(single.get<std::string>(), ' ', absl::SkipEmpty())) {
      if (piece.substr(0, 1) == "$") {
        seen_sequence = true;
        continue;
      }
      const size_t colon = piece.rfind(':');
      KVR_RETURN_IF_ERROR(add_special(std::string(piece.substr(0, colon))));
    }
    return t;
  }
  for (const json& piece : single) {
    if (piece.contains("Sequence")) {
      seen_sequence = true;
    } else if (piece.contains("SpecialToken")) {
      KVR_RETURN_IF_ERROR(add_special(piece["SpecialToken"].at("id").get<std::string>()));
    } else {
      return Malformed("TemplateProcessing", absl::StrCat("unknown template piece ", piece.dump()));
    }
  }
  return t;
}

absl::StatusOr<PostTemplate> ParsePostProcessorImpl(const json& j) {
  if (j.is_null()) return PostTemplate{};
  const std::string type = TypeOf(j);
  if (type == "TemplateProcessing") return ParseTemplate(j);
  if (type == "ByteLevel") return PostTemplate{};
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    PostTemplate t;
    t.prefix.push_back(j.at("cls").at(1).get<int32_t>());
    t.suffix.push_back(j.at("sep").at(1).get<int32_t>());
    return t;
  }
  if (type == "Sequence") {
    PostTemplate t;
    for (const json& sub : j.at("processors")) {
      KVR_ASSIGN_OR_RETURN(PostTemplate s, ParsePostProcessorImpl(sub));
      t.prefix.insert(t.prefix.begin(), s.prefix.begin(), s.prefix.end());
      t.suffix.insert(t.suffix.end(), s.suffix.begin(), s.suffix.end());
    }
    return t;
  }
  return Unsupported("post_processor", j);
}

}  // namespace

int ParseByteFallbackToken(absl::string_view token) {
  if (token.size() != 6 || token.substr(0, 3) != "<0x" || token[5] != '>') return -1;
  auto hex = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  // Rust's u8::from_str_radix(&token[3..5], 16), which also accepts a '+' sign.
  if (token[3] == '+') return hex(token[4]);
  const int hi = hex(token[3]);
  const int lo = hex(token[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const json& j) {
  return CatchJson("normalizer", [&] { return ParseNormalizerImpl(j); });
}

absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const json& j) {
  return CatchJson("pre_tokenizer", [&] { return ParsePreTokenizerImpl(j); });
}

absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const json& j) {
  return CatchJson("decoder", [&] { return ParseDecoderImpl(j); });
}

absl::StatusOr<PostTemplate> ParsePostProcessor(const json& j) {
  return CatchJson("post_processor", [&] { return ParsePostProcessorImpl(j); });
}

}  // namespace kvrelay::tokenizer

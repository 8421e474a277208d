// The configurable stages of a Hugging Face tokenizer.json pipeline:
// normalizers, pre-tokenizers, decoders and post-processors.
// Internal to the tokenizer library (exposed for tests).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace kvrelay::tokenizer {

// GPT-2 pre-tokenizer regex (also used by the ByteLevel pre-tokenizer's use_regex).
inline constexpr absl::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// Llama-3 pre-tokenizer regex.
inline constexpr absl::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------------------
// Normalizers: applied to each piece of text between added tokens.
// Supported: Sequence, Prepend, Replace (String or Regex pattern), and NFC,
// which is the identity here (ICU is not linked: input is assumed to already be
// in NFC, as virtually all text is). Anything else is rejected.
class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual std::string Normalize(std::string text) const = 0;
};

// `json` null -> nullptr (no normalization).
absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const nlohmann::json& json);

// ---------------------------------------------------------------------------
// Pre-tokenizers: split normalized text into the words BPE runs on.
struct PreToken {
  std::string text;
  bool at_origin = false;  // starts at offset 0 of the original input (Metaspace "first")
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void PreTokenize(std::vector<PreToken>* pieces) const = 0;
};

// Supported: ByteLevel, Split, Sequence, Metaspace, Digits. `json` null -> nullptr.
absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const nlohmann::json& json);

// ---------------------------------------------------------------------------
// Decoders: turn the token strings back into text (HF decode_chain semantics).
class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void DecodeChain(std::vector<std::string>* tokens) const = 0;
  // True when the chain contains a ByteFallback decoder.
  virtual bool UsesByteFallback() const { return false; }
};

// Supported: ByteLevel, Metaspace, Sequence, Replace, ByteFallback, Fuse, Strip.
// `json` null -> nullptr. ByteFallback follows HF exactly: a run of consecutive
// "<0xNN>" tokens decodes to its bytes when they are valid UTF-8, and otherwise
// to one U+FFFD per token of the run ([<0x41>, <0xFF>] -> "\uFFFD\uFFFD").
absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const nlohmann::json& json);

// The byte of a byte-fallback token "<0xNN>" (as HF's ByteFallback decoder reads
// it), or -1 when `token` is not one.
int ParseByteFallbackToken(absl::string_view token);

// ---------------------------------------------------------------------------
// Post-processor for a single sequence: ids added before and after it.
struct PostTemplate {
  std::vector<int32_t> prefix;
  std::vector<int32_t> suffix;
};

// Supported: TemplateProcessing (single), ByteLevel (no-op for ids),
// BertProcessing, RobertaProcessing, Sequence; null -> empty template.
absl::StatusOr<PostTemplate> ParsePostProcessor(const nlohmann::json& json);

}  // namespace kvrelay::tokenizer

// Hugging Face tokenizer.json: BPE models, byte-level (GPT-2 / Llama-3 / Qwen2)
// and SentencePiece style (Metaspace "▁", byte_fallback: Llama-2 / Mistral /
// TinyLlama), added and special tokens, decoding, streaming detokenization.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrelay::tokenizer {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Parses tokenizer.json text. `path` only appears in error messages.
  // Unsupported model types / normalizers / pre-tokenizers -> INVALID_ARGUMENT naming them.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(const std::string& json_text,
                                                             const std::string& path);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);

  // Encodes text. Added/special tokens occurring in the text are matched first and
  // never split. With add_special_tokens the post-processor's template (e.g. BOS) is applied.
  virtual std::vector<int32_t> Encode(absl::string_view text, bool add_special_tokens) const = 0;

  // Decodes ids to text. Invalid UTF-8 bytes are replaced by U+FFFD, one per maximal
  // invalid subsequence. (HF's ByteFallback decoder instead turns a whole run of <0xNN>
  // tokens into one U+FFFD per token as soon as any of it is invalid, which rewrites text
  // already streamed — "<0x7F><0xE5>a" is "\x7F\uFFFDa" here, "\uFFFD\uFFFDa" in HF. We keep
  // Decode() equal to what StreamingDetokenizer emits; valid byte runs decode identically.)
  virtual std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const = 0;

  virtual int32_t vocab_size() const = 0;  // 1 + largest id (model vocab and added tokens)
  virtual std::optional<int32_t> TokenToId(absl::string_view token) const = 0;
  virtual std::optional<std::string> IdToToken(int32_t id) const = 0;
  virtual bool IsSpecial(int32_t id) const = 0;
  // BOS id the post-processor adds, if any.
  virtual std::optional<int32_t> bos_token_id() const = 0;
};

// Streaming detokenizer: feed ids one at a time, get the newly completed text.
// Never returns a partial UTF-8 sequence; the concatenation of all Push() outputs
// plus Flush() equals Decode(all ids). Handles decoders whose output for a token
// depends on its neighbours (e.g. Metaspace / Strip of the leading space).
class StreamingDetokenizer {
 public:
  StreamingDetokenizer(const Tokenizer* tokenizer, bool skip_special_tokens);
  // Optionally seeds with prompt ids so the first output token decodes in context.
  void SetPrefix(const std::vector<int32_t>& prompt_ids);
  std::string Push(int32_t id);
  // Remaining text (incomplete UTF-8 at the end becomes U+FFFD).
  std::string Flush();

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_;
  std::vector<int32_t> ids_;
  size_t prefix_offset_ = 0;  // ids_[prefix_offset_..read_offset_) already emitted context
  size_t read_offset_ = 0;
};

}  // namespace kvrelay::tokenizer

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
  //
  // Added tokens follow HF's AddedVocabulary: tokens with "normalized": false are
  // found in the raw text; each piece between them is normalized and then searched
  // for the "normalized": true tokens, whose patterns are their contents run through
  // the normalizer (with Llama-2's Prepend("▁") + Replace(" ", "▁") a normalized
  // "<a b>" is looked for as "▁<a▁b>", so it is found after a space or at the start
  // of a piece only — as in HF). Matching is leftmost-longest and non-overlapping;
  // single_word uses Unicode word characters (regex \w), lstrip/rstrip remove
  // Unicode White_Space. A token without a "normalized" field (HF requires one)
  // is normalized unless it is special. Limitations: `encode_special_tokens` is
  // not supported; the Metaspace pre-tokenizer's "first" prepend scheme treats a
  // piece as the start of the input only when it starts at byte 0 of its
  // normalized piece and that piece is at the start of the input (HF maps offsets
  // back through the normalizer's alignments; this agrees for the usual normalizers).
  virtual std::vector<int32_t> Encode(absl::string_view text, bool add_special_tokens) const = 0;

  // Decodes ids to text (HF decode: skipped ids are dropped before the decoder).
  // With a ByteFallback decoder a run of consecutive "<0xNN>" tokens decodes to its
  // bytes if they are valid UTF-8 and otherwise to one U+FFFD per token, exactly as
  // HF ("<0x41><0xFF>" -> "\uFFFD\uFFFD"). Any other invalid UTF-8 (e.g. from
  // byte-level tokens) is replaced by U+FFFD per maximal invalid subsequence.
  virtual std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const = 0;

  virtual int32_t vocab_size() const = 0;  // 1 + largest id (model vocab and added tokens)
  virtual std::optional<int32_t> TokenToId(absl::string_view token) const = 0;
  virtual std::optional<std::string> IdToToken(int32_t id) const = 0;
  virtual bool IsSpecial(int32_t id) const = 0;
  // True for a byte-fallback token: "<0xNN>" with a ByteFallback decoder. A run of
  // them decodes as a unit (see Decode).
  virtual bool IsByteFallbackToken(int32_t /*id*/) const { return false; }
  // BOS id the post-processor adds, if any.
  virtual std::optional<int32_t> bos_token_id() const = 0;
};

// Streaming detokenizer: feed ids one at a time, get the newly completed text.
// Never returns a partial UTF-8 sequence; the concatenation of all Push() outputs
// plus Flush() equals Decode(all ids). Handles decoders whose output for a token
// depends on its neighbours (e.g. Metaspace / Strip of the leading space), and
// byte-fallback runs: since one more invalid byte turns a whole run into U+FFFDs,
// the text of a trailing run of byte-fallback tokens is held back until a token
// that ends the run arrives (or Flush) — a character spelled in byte tokens is
// emitted one token late.
class StreamingDetokenizer {
 public:
  StreamingDetokenizer(const Tokenizer* tokenizer, bool skip_special_tokens);
  // Optionally seeds with prompt ids so the first output token decodes in context.
  // (Should the prompt end with byte-fallback tokens and the output start with more,
  // Decode merges them into one run; if that changes the prompt's decoded text the
  // output is only emitted by Flush.)
  void SetPrefix(const std::vector<int32_t>& prompt_ids);
  std::string Push(int32_t id);
  // Remaining text (incomplete UTF-8 at the end becomes U+FFFD).
  std::string Flush();

 private:
  bool DecodesToNothing(int32_t id) const;  // skipped special or unknown id
  // End of the ids whose text is final: before a trailing byte-fallback run.
  size_t StableEnd() const;

  const Tokenizer* tokenizer_;
  bool skip_special_;
  std::vector<int32_t> ids_;
  size_t prefix_offset_ = 0;  // ids_[prefix_offset_..read_offset_) already emitted context
  size_t read_offset_ = 0;
};

}  // namespace kvrelay::tokenizer

// Trains a small byte-level BPE vocabulary and writes a complete Hugging Face
// tokenizer.json (used by `kvrelay make-model`). Deterministic: same inputs, same bytes.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvrelay::tokenizer {

enum class ByteLevelStyle {
  kGpt2,    // GPT-2 pre-tokenizer regex, <|endoftext|> special token, no BOS added
  kLlama3,  // Llama-3 regex, <|begin_of_text|> BOS added by the post-processor,
            // <|end_of_text|>, <|eot_id|> specials
};

struct BpeTrainOptions {
  ByteLevelStyle style = ByteLevelStyle::kGpt2;
  // Total vocabulary including the 256 byte tokens and the special tokens.
  int vocab_size = 512;
  // Training text; empty means the built-in English/multilingual corpus.
  std::string corpus;
};

struct TrainedTokenizer {
  std::string json;                         // tokenizer.json contents
  std::vector<std::string> special_tokens;  // in id order, after the BPE vocab
  int bos_token_id = -1;                    // -1 when the style adds no BOS
  std::vector<int> eos_token_ids;
};

absl::StatusOr<TrainedTokenizer> TrainByteLevelBpe(const BpeTrainOptions& options);

// The built-in training corpus (a few KB of varied text incl. multi-byte UTF-8).
const std::string& BuiltinCorpus();

}  // namespace kvrelay::tokenizer

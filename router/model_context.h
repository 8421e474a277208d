// What the router knows of the model it serves (DESIGN §1 step 2): tokenizer, context
// length, vocabulary, chat format and block size, loaded from the model folder without
// the weights; and the public API's request checks and tokenization, as pure functions
// so every bad field is unit-tested.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model/config.h"
#include "common/sampling/sampler.h"
#include "common/tokenizer/chat_template.h"
#include "common/tokenizer/tokenizer.h"
#include "kvrelay/v1/kvrelay.pb.h"

namespace kvrelay::router {

struct ModelContext {
  std::string model_id;  // in block hashes and GenerateRequest.model
  int block_size = 16;
  model::ModelConfig config;
  std::unique_ptr<tokenizer::Tokenizer> tokenizer;
  tokenizer::ChatFormat chat_format = tokenizer::ChatFormat::kPlain;

  // Reads config.json, generation_config.json, tokenizer.json and the chat template of
  // `dir`. `chat_format` empty: detected from the folder. Errors name the file or flag.
  static absl::StatusOr<std::unique_ptr<ModelContext>> Load(const std::string& dir,
                                                            const std::string& model_id,
                                                            int block_size,
                                                            const std::string& chat_format);
};

// A GenerateRequest checked and tokenized.
struct PreparedRequest {
  std::string id;
  std::vector<int32_t> prompt;
  sampling::SamplingParams params;  // defaults applied, validated
  v1::SamplingParams forward;       // what decode workers get (stop strings stay here)
  std::vector<std::string> stop;    // stop strings, applied by the router
  std::string cache_salt;
};

constexpr size_t kMaxRequestIdBytes = 256;
constexpr size_t kMaxCacheSaltBytes = 1024;

// NOT_FOUND for a model this router does not serve; INVALID_ARGUMENT naming the field
// for anything else wrong: no input, empty or non-UTF-8 text, bad chat messages, token
// ids outside the vocabulary, a prompt that leaves no room in the context, sampling
// values out of range, bad stop strings, an over-long request_id or cache_salt.
// An empty request_id gets `generated_id`.
absl::StatusOr<PreparedRequest> Prepare(const ModelContext& model, const v1::GenerateRequest& r,
                                        const std::string& generated_id);

// Tokenize's input: text (add_special_tokens, default true) or chat messages.
absl::StatusOr<std::vector<int32_t>> TokenizeInput(const ModelContext& model,
                                                   const v1::TokenizeRequest& r);

}  // namespace kvrelay::router

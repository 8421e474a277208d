#include "common/model/generator.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/kvcache/block_hash.h"
#include "common/kvcache/kv_sequence.h"
#include "common/util/status.h"

namespace kvrelay::model {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

absl::Status ValidatePrompt(const Model& m, absl::Span<const int32_t> prompt) {
  const ModelConfig& c = m.config();
  if (prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  if (static_cast<int64_t>(prompt.size()) >= c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("prompt has ", prompt.size(),
                                                   " tokens; the context length is ",
                                                   c.max_position_embeddings));
  }
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token ", i, " has id ", prompt[i],
                                                     ", outside [0, ", c.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

namespace {

// Reuses the cached prefix of `prompt`, prefills the rest in chunks (each chunk's full
// blocks enter the cache as soon as they are written) and leaves the last token's
// logits in *logits.
absl::Status Prefill(const Model& m, kvcache::KvPool* pool, kvcache::KvSequence* seq,
                     const std::vector<int32_t>& prompt, int chunk, std::vector<float>* logits) {
  const int64_t n = static_cast<int64_t>(prompt.size());
  const int64_t cached = seq->AcquirePrefix(prompt);
  KVR_RETURN_IF_ERROR(seq->Reserve(n));
  for (int64_t start = cached; start < n; start += chunk) {
    const int64_t len = std::min<int64_t>(chunk, n - start);
    SeqChunk c;
    c.tokens = absl::MakeConstSpan(prompt.data() + start, len);
    c.start_pos = start;
    c.block_table = seq->blocks();
    c.want_logits = start + len == n;
    KVR_RETURN_IF_ERROR(m.Forward({c}, pool->view(), logits));
    seq->Commit(prompt, start + len);
  }
  return absl::OkStatus();
}

}  // namespace

Generator::Generator(const Model* model, kvcache::KvPool* pool, kvcache::PrefixCache* cache,
                     std::string model_id, int prefill_chunk)
    : model_(model),
      pool_(pool),
      cache_(cache),
      model_id_(std::move(model_id)),
      prefill_chunk_(std::max(1, prefill_chunk)) {}

absl::StatusOr<std::vector<float>> Generator::PromptLogits(const std::vector<int32_t>& prompt,
                                                           const std::string& cache_salt,
                                                           int64_t* cached_tokens) {
  KVR_RETURN_IF_ERROR(ValidatePrompt(*model_, prompt));
  kvcache::KvSequence seq(cache_, kvcache::RootHash(model_id_, cache_salt));
  std::vector<float> logits;
  KVR_RETURN_IF_ERROR(Prefill(*model_, pool_, &seq, prompt, prefill_chunk_, &logits));
  if (cached_tokens != nullptr) *cached_tokens = seq.cached_tokens();
  return logits;
}

absl::StatusOr<GenerationResult> Generator::Generate(const std::vector<int32_t>& prompt,
                                                     const sampling::SamplingParams& params,
                                                     const GenerateOptions& options) {
  KVR_RETURN_IF_ERROR(sampling::ValidateSamplingParams(params));
  KVR_RETURN_IF_ERROR(ValidatePrompt(*model_, prompt));
  const ModelConfig& c = model_->config();
  const int64_t max_len = c.max_position_embeddings;
  const int64_t n = static_cast<int64_t>(prompt.size());

  GenerationResult result;
  kvcache::KvSequence seq(cache_, kvcache::RootHash(model_id_, options.cache_salt));
  std::vector<float> logits;
  double t0 = Now();
  KVR_RETURN_IF_ERROR(Prefill(*model_, pool_, &seq, prompt, prefill_chunk_, &logits));
  result.prefill_seconds = Now() - t0;
  result.cached_tokens = seq.cached_tokens();
  std::vector<int32_t> all = prompt;  // prompt + generated, for the block hashes

  auto is_stop = [&](int32_t tok) {
    if (!params.ignore_eos &&
        std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), tok) != c.eos_token_ids.end()) {
      return true;
    }
    return std::find(params.stop_token_ids.begin(), params.stop_token_ids.end(), tok) !=
           params.stop_token_ids.end();
  };

  t0 = Now();
  for (;;) {
    const int64_t position = n + static_cast<int64_t>(result.token_ids.size());
    sampling::SampleResult s = sampling::Sample(absl::MakeConstSpan(logits.data(), c.vocab_size),
                                                params, prompt, result.token_ids, position);
    result.token_ids.push_back(s.token);
    result.samples.push_back(std::move(s));
    if (options.keep_logits)
      result.logits.emplace_back(logits.begin(), logits.begin() + c.vocab_size);
    const int32_t tok = result.token_ids.back();
    all.push_back(tok);
    if (options.on_token && !options.on_token(tok)) {
      result.finish_reason = "abort";
      break;
    }
    if (is_stop(tok)) {
      result.finish_reason = "stop";
      break;
    }
    if (static_cast<int>(result.token_ids.size()) >= params.max_tokens || position + 1 >= max_len) {
      result.finish_reason = "length";
      break;
    }
    // Decode step: feed the new token at `position`.
    KVR_RETURN_IF_ERROR(seq.Reserve(position + 1));
    logits.clear();
    SeqChunk step;
    step.tokens = absl::MakeConstSpan(&result.token_ids.back(), 1);
    step.start_pos = position;
    step.block_table = seq.blocks();
    KVR_RETURN_IF_ERROR(model_->Forward({step}, pool_->view(), &logits));
    seq.Commit(all, position + 1);
  }
  result.decode_seconds = Now() - t0;
  return result;
}

}  // namespace kvrelay::model

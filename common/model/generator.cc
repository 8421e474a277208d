#include "common/model/generator.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/util/status.h"

namespace kvrelay::model {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Blocks of one sequence, returned to the pool when it goes out of scope.
class SequenceBlocks {
 public:
  explicit SequenceBlocks(kvcache::KvPool* pool) : pool_(pool) {}
  ~SequenceBlocks() { pool_->Free(blocks_); }
  absl::Status EnsureTokens(int64_t tokens) {
    const int64_t need = kvcache::BlocksFor(tokens, pool_->layout().block_size) -
                         static_cast<int64_t>(blocks_.size());
    if (need <= 0) return absl::OkStatus();
    KVR_ASSIGN_OR_RETURN(std::vector<int32_t> more, pool_->Allocate(need));
    blocks_.insert(blocks_.end(), more.begin(), more.end());
    return absl::OkStatus();
  }
  const std::vector<int32_t>& blocks() const { return blocks_; }

 private:
  kvcache::KvPool* pool_;
  std::vector<int32_t> blocks_;
};

absl::Status CheckPrompt(const Model& m, const std::vector<int32_t>& prompt) {
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

// Chunked prefill of prompt[0..n); logits of the last token into *logits.
absl::Status Prefill(const Model& m, kvcache::KvPool* pool, const std::vector<int32_t>& prompt,
                     const std::vector<int32_t>& blocks, int chunk, std::vector<float>* logits) {
  const int64_t n = static_cast<int64_t>(prompt.size());
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t len = std::min<int64_t>(chunk, n - start);
    SeqChunk c;
    c.tokens = absl::MakeConstSpan(prompt.data() + start, len);
    c.start_pos = start;
    c.block_table = blocks;
    c.want_logits = start + len == n;
    KVR_RETURN_IF_ERROR(m.Forward({c}, pool->view(), logits));
  }
  return absl::OkStatus();
}

}  // namespace

Generator::Generator(const Model* model, kvcache::KvPool* pool, int prefill_chunk)
    : model_(model), pool_(pool), prefill_chunk_(std::max(1, prefill_chunk)) {}

absl::StatusOr<std::vector<float>> Generator::PromptLogits(const std::vector<int32_t>& prompt) {
  KVR_RETURN_IF_ERROR(CheckPrompt(*model_, prompt));
  SequenceBlocks seq(pool_);
  KVR_RETURN_IF_ERROR(seq.EnsureTokens(static_cast<int64_t>(prompt.size())));
  std::vector<float> logits;
  KVR_RETURN_IF_ERROR(Prefill(*model_, pool_, prompt, seq.blocks(), prefill_chunk_, &logits));
  return logits;
}

absl::StatusOr<GenerationResult> Generator::Generate(const std::vector<int32_t>& prompt,
                                                     const sampling::SamplingParams& params,
                                                     const std::function<bool(int32_t)>& on_token) {
  KVR_RETURN_IF_ERROR(sampling::ValidateSamplingParams(params));
  KVR_RETURN_IF_ERROR(CheckPrompt(*model_, prompt));
  const ModelConfig& c = model_->config();
  const int64_t max_len = c.max_position_embeddings;
  const int64_t n = static_cast<int64_t>(prompt.size());

  GenerationResult result;
  SequenceBlocks seq(pool_);
  KVR_RETURN_IF_ERROR(seq.EnsureTokens(n));
  std::vector<float> logits;
  double t0 = Now();
  KVR_RETURN_IF_ERROR(Prefill(*model_, pool_, prompt, seq.blocks(), prefill_chunk_, &logits));
  result.prefill_seconds = Now() - t0;

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
    const int32_t tok = result.token_ids.back();
    if (on_token && !on_token(tok)) {
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
    KVR_RETURN_IF_ERROR(seq.EnsureTokens(position + 1));
    logits.clear();
    SeqChunk step;
    step.tokens = absl::MakeConstSpan(&result.token_ids.back(), 1);
    step.start_pos = position;
    step.block_table = seq.blocks();
    KVR_RETURN_IF_ERROR(model_->Forward({step}, pool_->view(), &logits));
  }
  result.decode_seconds = Now() - t0;
  return result;
}

}  // namespace kvrelay::model

#include "router/output_stream.h"

#include <utility>

namespace kvrelay::router {

namespace {
tokenizer::StopStringMatcher MakeMatcher(std::vector<std::string> stop) {
  absl::StatusOr<tokenizer::StopStringMatcher> m =
      tokenizer::StopStringMatcher::Create(std::move(stop));
  if (m.ok()) return *std::move(m);
  // Prepare() validated them; an invalid list cannot get here. Match nothing.
  return *tokenizer::StopStringMatcher::Create({});
}
}  // namespace

OutputStream::OutputStream(const tokenizer::Tokenizer* tokenizer,
                           const std::vector<int32_t>& prompt, std::vector<std::string> stop)
    : detok_(tokenizer, /*skip_special_tokens=*/true), stop_(MakeMatcher(std::move(stop))) {
  detok_.SetPrefix(prompt);
}

bool OutputStream::Push(const v1::DecodeResponse& in, v1::GenerateResponse* out) {
  if (matched_) return true;
  for (int i = 0; i < in.token_ids_size(); ++i) {
    const int32_t id = in.token_ids(i);
    generated_.push_back(id);
    out->add_token_ids(id);
    if (i < in.logprobs_size()) *out->add_logprobs() = in.logprobs(i);
    tokenizer::StopMatchResult r = stop_.Push(detok_.Push(id));
    out->mutable_text()->append(r.emit);
    if (r.matched) {
      matched_ = std::move(r.matched);
      return true;
    }
  }
  return false;
}

void OutputStream::Flush(v1::GenerateResponse* out) {
  if (matched_) return;
  tokenizer::StopMatchResult r = stop_.Push(detok_.Flush());
  out->mutable_text()->append(r.emit);
  if (!r.matched) {
    tokenizer::StopMatchResult f = stop_.Flush();
    out->mutable_text()->append(f.emit);
    r.matched = std::move(f.matched);
  }
  if (r.matched) matched_ = std::move(r.matched);
}

}  // namespace kvrelay::router

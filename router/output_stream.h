// The client's side of one request's output (DESIGN §1 step 6): the router turns the
// decode worker's token ids into text deltas (whole UTF-8 characters, decoded in the
// context of the prompt), applies stop strings across token boundaries, and remembers
// every token sent, so a migrated request resumes after the last token the client got
// and nothing is repeated or lost.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/tokenizer/stop_strings.h"
#include "common/tokenizer/tokenizer.h"
#include "kvrelay/v1/kvrelay.pb.h"
#include "kvrelay/v1/worker.pb.h"

namespace kvrelay::router {

class OutputStream {
 public:
  // `stop` was validated (StopStringMatcher::Validate).
  OutputStream(const tokenizer::Tokenizer* tokenizer, const std::vector<int32_t>& prompt,
               std::vector<std::string> stop);

  // Adds a decode worker's message (its tokens and logprobs) to `out`. True when a stop
  // string matched: the request ends, later tokens are not taken.
  bool Push(const v1::DecodeResponse& in, v1::GenerateResponse* out);
  // End of generation: text held back (an incomplete character, a possible stop string).
  void Flush(v1::GenerateResponse* out);

  const std::vector<int32_t>& generated() const { return generated_; }
  const std::optional<std::string>& matched_stop() const { return matched_; }

 private:
  tokenizer::StreamingDetokenizer detok_;
  tokenizer::StopStringMatcher stop_;
  std::vector<int32_t> generated_;
  std::optional<std::string> matched_;
};

}  // namespace kvrelay::router

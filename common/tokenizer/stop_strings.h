// Stop strings (SamplingParams.stop) matched on streamed, detokenized text: a stop string
// may span several text deltas (tokens), so text that could still turn out to be the start
// of a stop string is held back until the next delta decides.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrelay::tokenizer {

struct StopMatchResult {
  std::string emit;                    // text that is final and may go to the client
  std::optional<std::string> matched;  // the stop string found; generation must end
};

// Streams text through and cuts it at the first stop string, as vLLM and OpenAI do: the
// stop string and everything after it are dropped.
//
// The result is exactly what one pass over the whole text gives, however it is split into
// deltas: emit everything before the earliest occurrence of any stop string (on a tie the
// longest stop string wins) and report that string; with no occurrence emit everything. To
// keep that promise a complete occurrence is only reported once no earlier (or equally
// early and longer) occurrence can still complete — e.g. stops {"abc", "b"} on deltas
// "ab", "c" report "abc" at the second delta. That costs at most a few extra tokens, and only
// when stop strings overlap that way.
//
// Text is held back only from a position where a stop string could start, i.e. where its
// first byte (never a UTF-8 continuation byte) occurs, so a character given whole is never
// split between two emits.
//
// Not thread-safe; one per request.
class StopStringMatcher {
 public:
  static constexpr size_t kMaxStopStrings = 16;
  static constexpr size_t kMaxStopStringBytes = 256;

  // INVALID_ARGUMENT naming the offending index when there are more than kMaxStopStrings,
  // or one is empty, longer than kMaxStopStringBytes or not valid UTF-8.
  static absl::Status Validate(const std::vector<std::string>& stop_strings);
  static absl::StatusOr<StopStringMatcher> Create(std::vector<std::string> stop_strings);

  // Appends a text delta. Once a stop string was reported, further calls return nothing.
  StopMatchResult Push(absl::string_view text_delta);
  // End of generation: resolves what was held back (a complete occurrence that was waiting
  // on a possible better one is reported now; otherwise all held-back text is emitted).
  StopMatchResult Flush();

  bool stopped() const { return stopped_; }
  // Bytes currently held back.
  size_t pending_bytes() const { return pending_.size(); }

 private:
  explicit StopStringMatcher(std::vector<std::string> stop_strings);

  // Searches pending_; `final` means no more text will come.
  StopMatchResult Process(bool final);

  std::vector<std::string> stops_;
  std::string pending_;  // text received but not emitted yet
  bool stopped_ = false;
};

}  // namespace kvrelay::tokenizer

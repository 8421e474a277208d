#include "common/tokenizer/stop_strings.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/tokenizer/unicode.h"

namespace kvrelay::tokenizer {

absl::Status StopStringMatcher::Validate(const std::vector<std::string>& stop_strings) {
  if (stop_strings.size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat("stop: ", stop_strings.size(),
                                                   " stop strings given; at most ", kMaxStopStrings,
                                                   " are allowed"));
  }
  for (size_t i = 0; i < stop_strings.size(); ++i) {
    const std::string& s = stop_strings[i];
    if (s.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("stop[", i, "] is empty"));
    }
    if (s.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(absl::StrCat("stop[", i, "] is ", s.size(),
                                                     " bytes long; at most ", kMaxStopStringBytes,
                                                     " are allowed"));
    }
    // Detokenized text is always valid UTF-8, so an invalid stop string could never match;
    // it is a client bug worth reporting.
    if (!IsValidUtf8(s)) {
      return absl::InvalidArgumentError(absl::StrCat("stop[", i, "] is not valid UTF-8"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<StopStringMatcher> StopStringMatcher::Create(std::vector<std::string> stop_strings) {
  absl::Status status = Validate(stop_strings);
  if (!status.ok()) return status;
  return StopStringMatcher(std::move(stop_strings));
}

StopStringMatcher::StopStringMatcher(std::vector<std::string> stop_strings)
    : stops_(std::move(stop_strings)) {}

StopMatchResult StopStringMatcher::Push(absl::string_view text_delta) {
  if (stopped_) return {};
  pending_.append(text_delta.data(), text_delta.size());
  return Process(/*final=*/false);
}

StopMatchResult StopStringMatcher::Flush() {
  if (stopped_) return {};
  return Process(/*final=*/true);
}

StopMatchResult StopStringMatcher::Process(bool final) {
  StopMatchResult result;
  const absl::string_view text = pending_;

  // Best complete occurrence in what is pending: earliest start, then longest. Searching all
  // of pending_ is cheap: before the delta it held less than the longest stop string.
  size_t match_pos = absl::string_view::npos;
  const std::string* match = nullptr;
  for (const std::string& s : stops_) {
    const size_t pos = text.find(s);
    if (pos == absl::string_view::npos) continue;
    if (match == nullptr || pos < match_pos || (pos == match_pos && s.size() > match->size())) {
      match_pos = pos;
      match = &s;
    }
  }

  // Earliest position from which the rest of the text is a proper prefix of some stop
  // string: an occurrence that the next delta may complete starts there or later. Nothing
  // before it can ever be part of an occurrence, so it is final.
  size_t hold_from = text.size();
  if (!final) {
    for (const std::string& s : stops_) {
      const size_t max_len = std::min(s.size() - 1, text.size());
      // Longest first: the first hit is this stop string's earliest candidate.
      for (size_t len = max_len; len > 0; --len) {
        const size_t start = text.size() - len;
        if (start >= hold_from) break;
        if (text.compare(start, len, s, 0, len) == 0) {
          hold_from = start;
          break;
        }
      }
    }
  }

  // A candidate starting at q <= match_pos could still complete into a better occurrence:
  // one starting earlier, or as early and longer (a candidate at match_pos runs past the end
  // of the text, so its stop string is longer than `match`). Then wait for more text.
  if (match != nullptr && hold_from > match_pos) {
    result.emit.assign(text.data(), match_pos);
    result.matched = *match;
    pending_.clear();
    stopped_ = true;
    return result;
  }

  result.emit.assign(text.data(), hold_from);
  pending_.erase(0, hold_from);
  return result;
}

}  // namespace kvrelay::tokenizer

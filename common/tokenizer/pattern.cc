#include "common/tokenizer/pattern.h"

#include <oniguruma.h>

#include <algorithm>

#include "absl/base/call_once.h"
#include "absl/base/const_init.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/tokenizer/unicode.h"

namespace kvrelay::tokenizer {
namespace {

// Serializes regex compilation: onig_new is not documented as thread-safe (it may
// touch shared tables). Searching needs no lock.
ABSL_CONST_INIT absl::Mutex compile_mu(absl::kConstInit);

void InitOniguruma() {
  static absl::once_flag once;
  absl::call_once(once, [] {
    OnigEncoding encodings[] = {ONIG_ENCODING_UTF8};
    onig_initialize(encodings, 1);
  });
}

std::string OnigErrorString(int code, OnigErrorInfo* info) {
  UChar buf[ONIG_MAX_ERROR_MESSAGE_LEN];
  int len =
      info != nullptr ? onig_error_code_to_str(buf, code, info) : onig_error_code_to_str(buf, code);
  return std::string(reinterpret_cast<const char*>(buf), len > 0 ? len : 0);
}

// Frees an OnigRegion when it goes out of scope.
struct RegionDeleter {
  void operator()(OnigRegion* region) const { onig_region_free(region, 1); }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Regex>> Regex::Compile(absl::string_view pattern) {
  InitOniguruma();
  OnigRegex reg = nullptr;
  OnigErrorInfo info;
  const auto* begin = reinterpret_cast<const UChar*>(pattern.data());
  absl::MutexLock lock(&compile_mu);
  int r = onig_new(&reg, begin, begin + pattern.size(), ONIG_OPTION_NONE, ONIG_ENCODING_UTF8,
                   ONIG_SYNTAX_DEFAULT, &info);
  if (r != ONIG_NORMAL) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid regex '", pattern, "': ", OnigErrorString(r, &info)));
  }
  return std::unique_ptr<Regex>(new Regex(std::string(pattern), reg));
}

Regex::~Regex() { onig_free(static_cast<OnigRegex>(reg_)); }

std::vector<Span> Regex::FindAll(absl::string_view text) const {
  std::vector<Span> matches;
  std::unique_ptr<OnigRegion, RegionDeleter> region(onig_region_new());
  const auto* str = reinterpret_cast<const UChar*>(text.data());
  const UChar* end = str + text.size();
  size_t last_end = 0;
  bool have_last_match = false;
  size_t last_match_end = 0;
  while (last_end <= text.size()) {
    onig_region_clear(region.get());
    int r = onig_search(static_cast<OnigRegex>(reg_), str, end, str + last_end, end, region.get(),
                        ONIG_OPTION_NONE);
    if (r < 0) break;  // ONIG_MISMATCH (or a matcher error: treat as no more matches)
    const auto begin = static_cast<size_t>(region->beg[0]);
    const auto match_end = static_cast<size_t>(region->end[0]);
    if (begin == match_end && have_last_match && last_match_end == match_end) {
      // No empty match right after the previous match: advance one character.
      last_end += last_end < text.size() ? Utf8CharLength(text, last_end) : 1;
      continue;
    }
    last_end = match_end;
    have_last_match = true;
    last_match_end = match_end;
    matches.push_back({begin, match_end});
    if (begin == match_end && last_end == text.size()) break;
  }
  return matches;
}

absl::StatusOr<Pattern> Pattern::Literal(std::string literal) {
  Pattern p;
  p.literal_ = std::move(literal);
  return p;
}

absl::StatusOr<Pattern> Pattern::FromRegex(absl::string_view regex) {
  auto compiled = Regex::Compile(regex);
  if (!compiled.ok()) return compiled.status();
  Pattern p;
  p.regex_ = std::shared_ptr<const Regex>(std::move(compiled).value());
  return p;
}

std::vector<Span> Pattern::FindAll(absl::string_view text) const {
  if (regex_ != nullptr) return regex_->FindAll(text);
  std::vector<Span> matches;
  if (literal_.empty()) return matches;
  size_t pos = 0;
  while ((pos = text.find(literal_, pos)) != absl::string_view::npos) {
    matches.push_back({pos, pos + literal_.size()});
    pos += literal_.size();
  }
  return matches;
}

std::string Pattern::ReplaceAll(absl::string_view text, absl::string_view content) const {
  std::vector<Span> matches = FindAll(text);
  if (matches.empty()) return std::string(text);
  std::string out;
  out.reserve(text.size() + matches.size() * content.size());
  size_t prev = 0;
  for (const Span& m : matches) {
    out.append(text.data() + prev, m.begin - prev);
    out.append(content.data(), content.size());
    prev = m.end;
  }
  out.append(text.data() + prev, text.size() - prev);
  return out;
}

bool IsWordCharacter(uint32_t codepoint) {
  if (codepoint < 0x80) {
    return (codepoint >= '0' && codepoint <= '9') || (codepoint >= 'a' && codepoint <= 'z') ||
           (codepoint >= 'A' && codepoint <= 'Z') || codepoint == '_';
  }
  static const Regex* const kWord = [] {
    auto regex = Regex::Compile(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])");
    return regex.ok() ? std::move(regex).value().release() : nullptr;
  }();
  if (kWord == nullptr) return true;  // unreachable: the pattern is valid
  std::string ch;
  AppendCodepoint(codepoint, &ch);
  return !kWord->FindAll(ch).empty();
}

bool ParseSplitBehavior(absl::string_view name, SplitBehavior* behavior) {
  // HF serializes the enum in PascalCase; older files used snake_case.
  if (name == "Removed" || name == "removed") {
    *behavior = SplitBehavior::kRemoved;
  } else if (name == "Isolated" || name == "isolated") {
    *behavior = SplitBehavior::kIsolated;
  } else if (name == "MergedWithPrevious" || name == "merged_with_previous") {
    *behavior = SplitBehavior::kMergedWithPrevious;
  } else if (name == "MergedWithNext" || name == "merged_with_next") {
    *behavior = SplitBehavior::kMergedWithNext;
  } else if (name == "Contiguous" || name == "contiguous") {
    *behavior = SplitBehavior::kContiguous;
  } else {
    return false;
  }
  return true;
}

std::vector<Span> SplitByMatches(absl::string_view text, const std::vector<Span>& matches,
                                 SplitBehavior behavior, bool invert) {
  struct Piece {
    Span span;
    bool flag;  // is a match (input) / is to be removed (output)
  };
  std::vector<Piece> pieces;
  size_t prev = 0;
  for (const Span& m : matches) {
    if (m.begin != prev) pieces.push_back({{prev, m.begin}, invert});
    pieces.push_back({m, !invert});
    prev = m.end;
  }
  if (prev != text.size()) pieces.push_back({{prev, text.size()}, invert});

  std::vector<Piece> out;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const Piece& p : pieces) out.push_back({p.span, false});
      break;
    case SplitBehavior::kRemoved:
      out = pieces;
      break;
    case SplitBehavior::kContiguous: {
      bool previous_match = false;
      for (const Piece& p : pieces) {
        if (p.flag == previous_match && !out.empty()) {
          out.back().span.end = p.span.end;
        } else {
          out.push_back({p.span, false});
        }
        previous_match = p.flag;
      }
      break;
    }
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const Piece& p : pieces) {
        if (p.flag && !previous_match && !out.empty()) {
          out.back().span.end = p.span.end;
        } else {
          out.push_back({p.span, false});
        }
        previous_match = p.flag;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto it = pieces.rbegin(); it != pieces.rend(); ++it) {
        if (it->flag && !previous_match && !out.empty()) {
          out.back().span.begin = it->span.begin;
        } else {
          out.push_back({it->span, false});
        }
        previous_match = it->flag;
      }
      std::reverse(out.begin(), out.end());
      break;
    }
  }
  std::vector<Span> result;
  result.reserve(out.size());
  for (const Piece& p : out) {
    if (!p.flag && p.span.end > p.span.begin) result.push_back(p.span);
  }
  return result;
}

}  // namespace kvrelay::tokenizer

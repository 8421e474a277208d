// Oniguruma regular expressions and the Hugging Face "split with a pattern"
// semantics (SplitDelimiterBehavior). Internal to the tokenizer library.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrelay::tokenizer {

// Byte range [begin, end) in a string.
struct Span {
  size_t begin = 0;
  size_t end = 0;
  bool operator==(const Span& o) const { return begin == o.begin && end == o.end; }
};

// A compiled Oniguruma regex (UTF-8, Oniguruma syntax, no options: the same way
// Hugging Face tokenizers compiles its patterns). Immutable after compilation;
// searching from several threads at once is safe because every search uses its
// own OnigRegion and Oniguruma does not modify the regex_t while matching.
class Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(absl::string_view pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // All non-overlapping matches, left to right. Empty matches are reported but
  // never twice at the same position (same iteration as the `onig` Rust crate).
  std::vector<Span> FindAll(absl::string_view text) const;
  const std::string& pattern() const { return pattern_; }

 private:
  Regex(std::string pattern, void* reg) : pattern_(std::move(pattern)), reg_(reg) {}
  std::string pattern_;
  void* reg_;  // OnigRegex
};

// A split pattern: a literal string or a regex.
class Pattern {
 public:
  static absl::StatusOr<Pattern> Literal(std::string literal);
  static absl::StatusOr<Pattern> FromRegex(absl::string_view regex);

  std::vector<Span> FindAll(absl::string_view text) const;
  // Replaces every match with `content`.
  std::string ReplaceAll(absl::string_view text, absl::string_view content) const;

 private:
  std::string literal_;
  std::shared_ptr<const Regex> regex_;  // null for a literal
};

// A word character as Rust's regex `\w` (Unicode): Alphabetic, Mark, Decimal_Number,
// Connector_Punctuation ('_', U+203F, ...) or Join_Control. Hugging Face tests `\w`
// for the single_word flag of added tokens. (This differs slightly from Rust's
// char::is_alphanumeric || '_': that also accepts other numbers such as U+00B2 '²',
// but not non-alphabetic marks nor connector punctuation other than '_'.)
bool IsWordCharacter(uint32_t codepoint);

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// Parses "Removed", "Isolated", ... ; false for an unknown name.
bool ParseSplitBehavior(absl::string_view name, SplitBehavior* behavior);

// Splits `text` around the matches of `pattern` (as HF NormalizedString::split).
// With `invert` the matches are the pieces to keep and the rest are delimiters.
// Empty pieces are dropped.
std::vector<Span> SplitByMatches(absl::string_view text, const std::vector<Span>& matches,
                                 SplitBehavior behavior, bool invert);

}  // namespace kvrelay::tokenizer

#include "common/tokenizer/pattern.h"

#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "common/tokenizer/components.h"

namespace kvrelay::tokenizer {
namespace {

std::vector<std::string> Pieces(absl::string_view text, const std::vector<Span>& spans) {
  std::vector<std::string> out;
  for (const Span& s : spans) out.emplace_back(text.substr(s.begin, s.end - s.begin));
  return out;
}

std::vector<std::string> RegexSplit(absl::string_view pattern, absl::string_view text) {
  auto regex = Regex::Compile(pattern);
  EXPECT_TRUE(regex.ok()) << regex.status();
  return Pieces(text,
                SplitByMatches(text, (*regex)->FindAll(text), SplitBehavior::kIsolated, false));
}

TEST(RegexTest, Gpt2PatternSplitsPreTokens) {
  EXPECT_EQ(RegexSplit(kGpt2Pattern, "Hello world's 123  end"),
            (std::vector<std::string>{"Hello", " world", "'s", " 123", " ", " end"}));
  EXPECT_EQ(RegexSplit(kGpt2Pattern, "caf\xC3\xA9, \xE4\xB8\xAD\xE6\x96\x87!\n"),
            (std::vector<std::string>{"caf\xC3\xA9", ",", " \xE4\xB8\xAD\xE6\x96\x87", "!", "\n"}));
}

TEST(RegexTest, Llama3PatternSplitsPreTokens) {
  EXPECT_EQ(RegexSplit(kLlama3Pattern, "Hello WORLD'S 12345\n\nfoo"),
            (std::vector<std::string>{"Hello", " WORLD", "'S", " ", "123", "45", "\n\n", "foo"}));
  EXPECT_EQ(RegexSplit(kLlama3Pattern, "x = (a+b);  // ok"),
            (std::vector<std::string>{"x", " =", " (", "a", "+b", ");", " ", " //", " ok"}));
}

TEST(RegexTest, EmptyMatchesAdvance) {
  auto regex = Regex::Compile("a*");
  ASSERT_TRUE(regex.ok());
  const std::vector<Span> m = (*regex)->FindAll("baa");
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(m[0], (Span{0, 0}));
  EXPECT_EQ(m[1], (Span{1, 3}));
}

TEST(RegexTest, InvalidPatternIsInvalidArgument) {
  auto regex = Regex::Compile("(unclosed");
  ASSERT_FALSE(regex.ok());
  EXPECT_EQ(regex.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RegexTest, ConcurrentSearchesAgree) {
  auto regex = Regex::Compile(kLlama3Pattern);
  ASSERT_TRUE(regex.ok());
  std::string text;
  for (int i = 0; i < 200; ++i) text += "The year 2024 isn't over; caf\xC3\xA9 \xF0\x9F\x98\x80!\n";
  const std::vector<Span> expected = (*regex)->FindAll(text);
  std::vector<std::thread> threads;
  std::vector<bool> same(4, false);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      bool ok = true;
      for (int k = 0; k < 20; ++k) ok = ok && (*regex)->FindAll(text) == expected;
      same[t] = ok;
    });
  }
  for (auto& th : threads) th.join();
  for (bool s : same) EXPECT_TRUE(s);
}

TEST(PatternTest, LiteralFindAndReplace) {
  auto p = Pattern::Literal("ab");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->FindAll("abcabab").size(), 3u);
  EXPECT_EQ(p->ReplaceAll("xabyab", "-"), "x-y-");
  auto empty = Pattern::Literal("");
  EXPECT_TRUE(empty->FindAll("abc").empty());
  auto re = Pattern::FromRegex("[0-9]+");
  ASSERT_TRUE(re.ok());
  EXPECT_EQ(re->ReplaceAll("a12b345", "#"), "a#b#");
}

std::vector<std::string> SplitDash(SplitBehavior behavior, bool invert) {
  const std::string text = "the-final--countdown";
  auto p = Pattern::Literal("-");
  return Pieces(text, SplitByMatches(text, p->FindAll(text), behavior, invert));
}

TEST(SplitTest, Behaviors) {
  using V = std::vector<std::string>;
  EXPECT_EQ(SplitDash(SplitBehavior::kRemoved, false), (V{"the", "final", "countdown"}));
  EXPECT_EQ(SplitDash(SplitBehavior::kIsolated, false),
            (V{"the", "-", "final", "-", "-", "countdown"}));
  EXPECT_EQ(SplitDash(SplitBehavior::kMergedWithPrevious, false),
            (V{"the-", "final-", "-", "countdown"}));
  EXPECT_EQ(SplitDash(SplitBehavior::kMergedWithNext, false),
            (V{"the", "-final", "-", "-countdown"}));
  EXPECT_EQ(SplitDash(SplitBehavior::kContiguous, false),
            (V{"the", "-", "final", "--", "countdown"}));
  EXPECT_EQ(SplitDash(SplitBehavior::kRemoved, true), (V{"-", "-", "-"}));
}

TEST(SplitTest, ParseBehavior) {
  SplitBehavior b;
  EXPECT_TRUE(ParseSplitBehavior("Isolated", &b));
  EXPECT_EQ(b, SplitBehavior::kIsolated);
  EXPECT_TRUE(ParseSplitBehavior("MergedWithNext", &b));
  EXPECT_EQ(b, SplitBehavior::kMergedWithNext);
  EXPECT_FALSE(ParseSplitBehavior("Sideways", &b));
}

TEST(PatternTest, IsWordCharacterMatchesRustRegexWordClass) {
  // Alphabetic (any script, including Nl), marks, decimal digits, connector
  // punctuation and join controls.
  for (uint32_t c : {uint32_t{'a'}, uint32_t{'Z'}, uint32_t{'0'}, uint32_t{'_'}, 0xE9u, 0x416u,
                     0x4E2Du, 0x3042u, 0x0663u, 0x0301u, 0x203Fu, 0x200Du, 0x216Bu, 0x1D400u}) {
    EXPECT_TRUE(IsWordCharacter(c)) << std::hex << c;
  }
  // Punctuation, symbols, spaces, other numbers (No), emoji.
  for (uint32_t c : {uint32_t{'-'}, uint32_t{' '}, uint32_t{'.'}, uint32_t{'$'}, 0xA0u, 0xB2u,
                     0xBDu, 0x3000u, 0x3002u, 0x2014u, 0x1F600u, 0x200Bu}) {
    EXPECT_FALSE(IsWordCharacter(c)) << std::hex << c;
  }
}

}  // namespace
}  // namespace kvrelay::tokenizer

#include "common/tokenizer/stop_strings.h"

#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "common/tokenizer/unicode.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::tokenizer {
namespace {

using ::testing::HasSubstr;

StopStringMatcher Make(std::vector<std::string> stops) {
  absl::StatusOr<StopStringMatcher> m = StopStringMatcher::Create(std::move(stops));
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(m).value();
}

// Feeds `deltas` then flushes (unless stopped); returns everything emitted and the match.
struct Outcome {
  std::string text;
  std::optional<std::string> matched;
};
Outcome Stream(StopStringMatcher& m, const std::vector<std::string>& deltas) {
  Outcome out;
  for (const std::string& d : deltas) {
    StopMatchResult r = m.Push(d);
    if (out.matched) {
      EXPECT_EQ(r.emit, "") << "emitted after a match";
      EXPECT_FALSE(r.matched);
    }
    out.text += r.emit;
    if (r.matched) out.matched = r.matched;
  }
  StopMatchResult r = m.Flush();
  out.text += r.emit;
  if (r.matched) {
    EXPECT_FALSE(out.matched.has_value());
    out.matched = r.matched;
  }
  return out;
}

// One pass over the whole text: earliest occurrence, ties -> longest stop string.
Outcome Reference(const std::string& text, const std::vector<std::string>& stops) {
  size_t best = std::string::npos;
  const std::string* match = nullptr;
  for (const std::string& s : stops) {
    const size_t pos = text.find(s);
    if (pos == std::string::npos) continue;
    if (match == nullptr || pos < best || (pos == best && s.size() > match->size())) {
      best = pos;
      match = &s;
    }
  }
  if (match == nullptr) return {text, std::nullopt};
  return {text.substr(0, best), *match};
}

TEST(StopStringMatcherTest, NoStopStringsEmitsEverythingAtOnce) {
  StopStringMatcher m = Make({});
  StopMatchResult r = m.Push("hello ");
  EXPECT_EQ(r.emit, "hello ");
  EXPECT_FALSE(r.matched);
  r = m.Push("world");
  EXPECT_EQ(r.emit, "world");
  EXPECT_EQ(m.pending_bytes(), 0u);
  r = m.Flush();
  EXPECT_EQ(r.emit, "");
  EXPECT_FALSE(r.matched);
  EXPECT_FALSE(m.stopped());
}

TEST(StopStringMatcherTest, MatchInsideOneDelta) {
  StopStringMatcher m = Make({"STOP"});
  StopMatchResult r = m.Push("abc STOP def");
  EXPECT_EQ(r.emit, "abc ");
  ASSERT_TRUE(r.matched);
  EXPECT_EQ(*r.matched, "STOP");
  EXPECT_TRUE(m.stopped());
  // Finished: nothing more comes out.
  r = m.Push("more");
  EXPECT_EQ(r.emit, "");
  EXPECT_FALSE(r.matched);
  r = m.Flush();
  EXPECT_EQ(r.emit, "");
  EXPECT_FALSE(r.matched);
}

TEST(StopStringMatcherTest, MatchAtTheVeryStart) {
  StopStringMatcher m = Make({"\n\n"});
  StopMatchResult r = m.Push("\n\nx");
  EXPECT_EQ(r.emit, "");
  EXPECT_EQ(r.matched, "\n\n");
}

TEST(StopStringMatcherTest, MatchAcrossTwoDeltas) {
  StopStringMatcher m = Make({"STOP"});
  StopMatchResult r = m.Push("abc ST");
  EXPECT_EQ(r.emit, "abc ");  // "ST" held back
  EXPECT_FALSE(r.matched);
  EXPECT_EQ(m.pending_bytes(), 2u);
  r = m.Push("OP and more");
  EXPECT_EQ(r.emit, "");
  EXPECT_EQ(r.matched, "STOP");
}

TEST(StopStringMatcherTest, MatchAcrossThreeDeltas) {
  StopStringMatcher m = Make({"<end>"});
  StopMatchResult r = m.Push("x<");
  EXPECT_EQ(r.emit, "x");
  r = m.Push("en");
  EXPECT_EQ(r.emit, "");
  EXPECT_FALSE(r.matched);
  r = m.Push("d>tail");
  EXPECT_EQ(r.emit, "");
  EXPECT_EQ(r.matched, "<end>");
}

TEST(StopStringMatcherTest, HoldBackThenReleaseWhenTheNextDeltaDiverges) {
  StopStringMatcher m = Make({"STOP"});
  StopMatchResult r = m.Push("a STO");
  EXPECT_EQ(r.emit, "a ");
  r = m.Push("RM");
  EXPECT_EQ(r.emit, "STORM");
  EXPECT_FALSE(r.matched);
  EXPECT_EQ(m.pending_bytes(), 0u);
  // Diverging, but the new tail starts another candidate: only that is held.
  r = m.Push(" S");
  EXPECT_EQ(r.emit, " ");
  r = m.Push("SSTOP");
  EXPECT_EQ(r.emit, "SS");
  EXPECT_EQ(r.matched, "STOP");
}

TEST(StopStringMatcherTest, HoldsTheLongestCandidateSuffix) {
  // "aab" is a candidate for "aabx", "ab" for "abc": the longer (earlier) one is held.
  StopStringMatcher m = Make({"abc", "aabx"});
  StopMatchResult r = m.Push("zzaab");
  EXPECT_EQ(r.emit, "zz");
  EXPECT_EQ(m.pending_bytes(), 3u);
  r = m.Push("c");  // "aabc": "abc" occurs at 1, nothing earlier can complete
  EXPECT_EQ(r.emit, "a");
  EXPECT_EQ(r.matched, "abc");
}

TEST(StopStringMatcherTest, FlushReleasesHeldBackText) {
  StopStringMatcher m = Make({"STOP", "\n\n"});
  StopMatchResult r = m.Push("the end\n");
  EXPECT_EQ(r.emit, "the end");
  r = m.Push("ST");
  EXPECT_EQ(r.emit, "\n");
  r = m.Flush();
  EXPECT_EQ(r.emit, "ST");
  EXPECT_FALSE(r.matched);
  EXPECT_FALSE(m.stopped());
  EXPECT_EQ(m.pending_bytes(), 0u);
}

TEST(StopStringMatcherTest, EarliestOccurrenceWins) {
  // "ab" and "b": in "xab" the occurrence of "ab" (at 1) is earlier than "b" (at 2).
  {
    StopStringMatcher m = Make({"b", "ab"});
    StopMatchResult r = m.Push("xab");
    EXPECT_EQ(r.emit, "x");
    EXPECT_EQ(r.matched, "ab");
  }
  {
    StopStringMatcher m = Make({"ab", "b"});
    StopMatchResult r = m.Push("xbab");
    EXPECT_EQ(r.emit, "x");
    EXPECT_EQ(r.matched, "b");
  }
  // Split: "b" completes first but "ab" started earlier; same result.
  {
    StopStringMatcher m = Make({"ab", "b"});
    Outcome o = Stream(m, {"x", "a", "b", "y"});
    EXPECT_EQ(o.text, "x");
    EXPECT_EQ(o.matched, "ab");
  }
}

TEST(StopStringMatcherTest, TiesGoToTheLongestStopString) {
  {
    StopStringMatcher m = Make({"ab", "abc"});
    StopMatchResult r = m.Push("xabcd");
    EXPECT_EQ(r.emit, "x");
    EXPECT_EQ(r.matched, "abc");
  }
  // "ab" is complete at the first delta but "abc" may still complete at the same position:
  // the matcher waits one delta rather than report a stop string that depends on the split.
  {
    StopStringMatcher m = Make({"ab", "abc"});
    StopMatchResult r = m.Push("xab");
    EXPECT_EQ(r.emit, "x");
    EXPECT_FALSE(r.matched);
    EXPECT_FALSE(m.stopped());
    r = m.Push("c");
    EXPECT_EQ(r.emit, "");
    EXPECT_EQ(r.matched, "abc");
  }
  {
    StopStringMatcher m = Make({"ab", "abc"});
    EXPECT_FALSE(m.Push("xab").matched);
    StopMatchResult r = m.Push("d");
    EXPECT_EQ(r.emit, "");
    EXPECT_EQ(r.matched, "ab");
  }
  // At the end of generation the waiting match is reported.
  {
    StopStringMatcher m = Make({"ab", "abc"});
    EXPECT_FALSE(m.Push("xab").matched);
    StopMatchResult r = m.Flush();
    EXPECT_EQ(r.emit, "");
    EXPECT_EQ(r.matched, "ab");
    EXPECT_TRUE(m.stopped());
  }
}

TEST(StopStringMatcherTest, LaterCandidatesDoNotDelayAMatch) {
  // "b" is complete; the held "ab..." candidate at 2 starts after it and cannot win.
  StopStringMatcher m = Make({"b", "abz"});
  StopMatchResult r = m.Push("xbab");
  EXPECT_EQ(r.emit, "x");
  EXPECT_EQ(r.matched, "b");
}

TEST(StopStringMatcherTest, MultiByteUtf8StopStrings) {
  const std::string kStop = "\xE5\x81\x9C\xE6\xAD\xA2";  // "停止"
  StopStringMatcher m = Make({kStop, "\xC3\xA9!"});      // "é!"
  StopMatchResult r = m.Push("ok \xE5\x81\x9C");         // "ok 停"
  EXPECT_EQ(r.emit, "ok ");
  r = m.Push("\xE6\xAD\xA2 rest");
  EXPECT_EQ(r.emit, "");
  EXPECT_EQ(r.matched, kStop);

  StopStringMatcher m2 = Make({kStop, "\xC3\xA9!"});
  r = m2.Push("caf\xC3\xA9");
  EXPECT_EQ(r.emit, "caf");  // "é" may start "é!"
  r = m2.Push("\xE5\x81\x9C");
  EXPECT_EQ(r.emit, "\xC3\xA9");
  r = m2.Push("\xE5\x81\x9C");
  EXPECT_EQ(r.emit, "\xE5\x81\x9C");
  r = m2.Flush();
  EXPECT_EQ(r.emit, "\xE5\x81\x9C");
}

TEST(StopStringMatcherTest, NeverSplitsACharacterThatSharesLeadingBytes) {
  // "中" is E4 B8 AD; the stop "丸" is E4 B8 B8: after "中" there is nothing to hold.
  StopStringMatcher m = Make({"\xE4\xB8\xB8"});
  StopMatchResult r = m.Push("\xE4\xB8\xAD");
  EXPECT_EQ(r.emit, "\xE4\xB8\xAD");
  EXPECT_EQ(m.pending_bytes(), 0u);
}

TEST(StopStringMatcherTest, EmptyDeltas) {
  StopStringMatcher m = Make({"ab"});
  EXPECT_EQ(m.Push("").emit, "");
  EXPECT_EQ(m.Push("a").emit, "");
  EXPECT_EQ(m.Push("").emit, "");
  EXPECT_EQ(m.Push("b").matched, "ab");
}

TEST(StopStringMatcherTest, Validate) {
  EXPECT_TRUE(StopStringMatcher::Validate({}).ok());
  EXPECT_TRUE(StopStringMatcher::Validate({"a", std::string(256, 'x')}).ok());
  EXPECT_TRUE(StopStringMatcher::Validate(std::vector<std::string>(16, "s")).ok());

  const struct {
    std::vector<std::string> stops;
    const char* what;
  } cases[] = {
      {{"a", ""}, "stop[1] is empty"},
      {std::vector<std::string>(17, "s"), "17 stop strings given; at most 16"},
      {{std::string(257, 'x')}, "stop[0] is 257 bytes long; at most 256"},
      {{"ok", "bad \xFF"}, "stop[1] is not valid UTF-8"},
  };
  for (const auto& c : cases) {
    absl::Status s = StopStringMatcher::Validate(c.stops);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_THAT(s.message(), HasSubstr(c.what));
    absl::StatusOr<StopStringMatcher> m = StopStringMatcher::Create(c.stops);
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status(), s);
  }
}

// Random texts over a small alphabet (so stop strings occur and overlap often, including
// multi-byte characters), split into random whole-character deltas: the streamed result
// must equal the one-pass reference, every emit must be whole characters, and what is held
// back must stay below the longest stop string.
TEST(StopStringMatcherTest, RandomizedMatchesOneShotReference) {
  const std::vector<std::string> alphabet = {
      "a", "b", "c", "\xC3\xA9", "\xE4\xB8\xAD", "\xF0\x9F\x98\x80"};
  std::mt19937 rng(20240607);
  auto pick = [&](size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng); };
  auto random_string = [&](size_t min_chars, size_t max_chars) {
    std::vector<std::string> chars;
    const size_t n = min_chars + pick(max_chars - min_chars + 1);
    for (size_t i = 0; i < n; ++i) chars.push_back(alphabet[pick(alphabet.size())]);
    return chars;
  };

  int matched_runs = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    std::vector<std::string> stops;
    const size_t num_stops = pick(5);  // 0..4
    size_t longest = 0;
    for (size_t i = 0; i < num_stops; ++i) {
      std::string s;
      for (const std::string& c : random_string(1, 4)) s += c;
      longest = std::max(longest, s.size());
      stops.push_back(s);
    }
    const std::vector<std::string> chars = random_string(0, 30);
    std::string text;
    std::vector<std::string> deltas;
    for (size_t i = 0; i < chars.size();) {
      const size_t n = 1 + pick(4);
      std::string d;
      for (size_t k = 0; k < n && i < chars.size(); ++k, ++i) d += chars[i];
      text += d;
      deltas.push_back(d);
      if (pick(8) == 0) deltas.push_back("");  // occasionally an empty delta
    }

    StopStringMatcher m = Make(stops);
    Outcome got;
    for (const std::string& d : deltas) {
      StopMatchResult r = m.Push(d);
      ASSERT_TRUE(IsValidUtf8(r.emit)) << "split a character";
      if (got.matched) {
        ASSERT_EQ(r.emit, "");
        ASSERT_FALSE(r.matched);
      }
      got.text += r.emit;
      if (r.matched) got.matched = r.matched;
      if (!m.stopped() && !stops.empty()) {
        ASSERT_LT(m.pending_bytes(), longest);
      }
    }
    StopMatchResult r = m.Flush();
    ASSERT_TRUE(IsValidUtf8(r.emit));
    got.text += r.emit;
    if (r.matched) {
      ASSERT_FALSE(got.matched);
      got.matched = r.matched;
    }

    const Outcome want = Reference(text, stops);
    ASSERT_EQ(got.text, want.text) << "iteration " << iter << " text '" << text << "'";
    ASSERT_EQ(got.matched, want.matched) << "iteration " << iter << " text '" << text << "'";
    if (want.matched) ++matched_runs;
  }
  // The alphabet is small enough that a good share of the runs stop.
  EXPECT_GT(matched_runs, 2000);
}

}  // namespace
}  // namespace kvrelay::tokenizer

#include "router/output_stream.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/tokenizer/unicode.h"
#include "common/util/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace kvrelay::router {
namespace {

class OutputStreamTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string dir = testing::ModelDir(testing::TinyVariants()[0]);
    auto t = tokenizer::Tokenizer::FromFile(JoinPath(dir, "tokenizer.json"));
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = t->release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    tok_ = nullptr;
  }

  const tokenizer::Tokenizer& tok() const { return *tok_; }

  std::vector<int32_t> Prompt() const { return tok().Encode("Once upon a time,", true); }

  // Generated tokens: ASCII, multi-byte characters (split over several byte-level
  // tokens) and an end-of-text special token.
  std::vector<int32_t> Generated() const {
    std::vector<int32_t> ids =
        tok().Encode(" there was a fox. Ünïcødé 世界 🙂 and\nmore text, the end.", false);
    // A special token (skipped in the text) in the middle and at the end.
    std::optional<int32_t> eot = tok().TokenToId("<|eot_id|>");
    EXPECT_TRUE(eot.has_value());
    if (eot) {
      ids.insert(ids.begin() + 4, *eot);
      ids.push_back(*eot);
    }
    return ids;
  }

  static v1::DecodeResponse Msg(const std::vector<int32_t>& ids, size_t from, size_t n,
                                bool logprobs = true) {
    v1::DecodeResponse d;
    for (size_t i = from; i < from + n && i < ids.size(); ++i) {
      d.add_token_ids(ids[i]);
      if (logprobs) {
        v1::TokenLogprobs* lp = d.add_logprobs();
        lp->set_token_id(ids[i]);
        lp->set_logprob(-0.25f * static_cast<float>(i));
        v1::TopLogprob* top = lp->add_top();
        top->set_token_id(ids[i]);
        top->set_logprob(-0.25f * static_cast<float>(i));
      }
    }
    return d;
  }

  static tokenizer::Tokenizer* tok_;
};

tokenizer::Tokenizer* OutputStreamTest::tok_ = nullptr;

TEST_F(OutputStreamTest, DeltasConcatenateToTheDecodedText) {
  const std::vector<int32_t> gen = Generated();
  const std::string want = tok().Decode(gen, /*skip_special_tokens=*/true);
  ASSERT_THAT(want, ::testing::HasSubstr("世界"));
  for (size_t chunk : {1u, 3u, 100u}) {
    SCOPED_TRACE(absl::StrCat("tokens per message: ", chunk));
    OutputStream out(&tok(), Prompt(), {});
    std::string text;
    std::vector<int32_t> ids;
    int messages = 0;
    for (size_t i = 0; i < gen.size(); i += chunk) {
      v1::GenerateResponse r;
      EXPECT_FALSE(out.Push(Msg(gen, i, chunk), &r));
      ++messages;
      EXPECT_TRUE(tokenizer::IsValidUtf8(r.text())) << "delta " << i << " splits a character";
      text += r.text();
      ids.insert(ids.end(), r.token_ids().begin(), r.token_ids().end());
      ASSERT_EQ(r.logprobs_size(), r.token_ids_size());
      for (int k = 0; k < r.logprobs_size(); ++k) {
        const size_t at = i + k;
        EXPECT_EQ(r.logprobs(k).token_id(), gen[at]);
        EXPECT_FLOAT_EQ(r.logprobs(k).logprob(), -0.25f * static_cast<float>(at));
        ASSERT_EQ(r.logprobs(k).top_size(), 1);
        EXPECT_EQ(r.logprobs(k).top(0).token_id(), gen[at]);
      }
    }
    v1::GenerateResponse last;
    out.Flush(&last);
    EXPECT_EQ(last.token_ids_size(), 0);
    text += last.text();
    EXPECT_EQ(text, want);
    EXPECT_EQ(ids, gen);
    EXPECT_EQ(out.generated(), gen);
    EXPECT_FALSE(out.matched_stop().has_value());
  }
}

TEST_F(OutputStreamTest, TextIsStreamedAsItComes) {
  // Plain ASCII tokens are not held back: after each push everything decoded so far
  // has been emitted.
  const std::vector<int32_t> gen = tok().Encode(" the cat sat on the mat", false);
  OutputStream out(&tok(), Prompt(), {});
  std::string text;
  for (size_t i = 0; i < gen.size(); ++i) {
    v1::GenerateResponse r;
    out.Push(Msg(gen, i, 1), &r);
    text += r.text();
    EXPECT_EQ(text, tok().Decode(std::vector<int32_t>(gen.begin(), gen.begin() + i + 1), true));
  }
}

TEST_F(OutputStreamTest, NoLogprobsWhenNoneCame) {
  const std::vector<int32_t> gen = tok().Encode(" abc def", false);
  OutputStream out(&tok(), Prompt(), {});
  v1::GenerateResponse r;
  out.Push(Msg(gen, 0, gen.size(), /*logprobs=*/false), &r);
  EXPECT_EQ(r.logprobs_size(), 0);
  EXPECT_EQ(r.token_ids_size(), static_cast<int>(gen.size()));
}

// Finds a boundary between two generated tokens that both decode to text, and a stop
// string made of the last character before it and the first after it, occurring
// nowhere earlier.
struct Split {
  size_t second = 0;   // index of the token after the boundary
  std::string stop;    // spans the boundary
  std::string before;  // the text before the stop string
};

Split FindSplit(const tokenizer::Tokenizer& tok, const std::vector<int32_t>& gen) {
  for (size_t i = 3; i + 1 < gen.size(); ++i) {
    const std::string a = tok.Decode(std::vector<int32_t>(gen.begin(), gen.begin() + i), true);
    const std::string ab = tok.Decode(std::vector<int32_t>(gen.begin(), gen.begin() + i + 1), true);
    const std::string abc =
        tok.Decode(std::vector<int32_t>(gen.begin(), gen.begin() + i + 2), true);
    if (ab.size() <= a.size() || abc.size() < ab.size() + 2) continue;
    // The last character of token i's text and the first two of token i+1's (ASCII).
    const std::string stop = ab.substr(ab.size() - 1) + abc.substr(ab.size(), 2);
    if (abc.find(stop) != ab.size() - 1) continue;
    Split s;
    s.second = i + 1;
    s.stop = stop;
    s.before = ab.substr(0, ab.size() - 1);
    return s;
  }
  return Split();
}

TEST_F(OutputStreamTest, StopStringAcrossTwoTokensIsCut) {
  const std::vector<int32_t> gen =
      tok().Encode(" we went to a big old house in the woods and a cat sat there", false);
  const Split split = FindSplit(tok(), gen);
  ASSERT_GT(split.second, 0u) << "no suitable token boundary in the fixture text";
  SCOPED_TRACE(absl::StrCat("stop string '", split.stop, "' before token ", split.second));

  OutputStream out(&tok(), Prompt(), {"zzzq", split.stop});
  std::string text;
  for (size_t i = 0; i < split.second; ++i) {
    v1::GenerateResponse r;
    EXPECT_FALSE(out.Push(Msg(gen, i, 1), &r)) << "token " << i;
    text += r.text();
  }
  EXPECT_FALSE(out.matched_stop().has_value());
  // The stopping token comes with more tokens in the same message: they are not taken.
  v1::GenerateResponse r;
  EXPECT_TRUE(out.Push(Msg(gen, split.second, 3), &r));
  text += r.text();
  ASSERT_EQ(r.token_ids_size(), 1);
  EXPECT_EQ(r.token_ids(0), gen[split.second]);
  EXPECT_EQ(r.logprobs_size(), 1);
  ASSERT_TRUE(out.matched_stop().has_value());
  EXPECT_EQ(*out.matched_stop(), split.stop);
  EXPECT_EQ(text, split.before);
  EXPECT_EQ(out.generated(), std::vector<int32_t>(gen.begin(), gen.begin() + split.second + 1));

  // Later pushes and the flush add nothing.
  v1::GenerateResponse later;
  EXPECT_TRUE(out.Push(Msg(gen, split.second + 1, 2), &later));
  out.Flush(&later);
  EXPECT_EQ(later.token_ids_size(), 0);
  EXPECT_EQ(later.text(), "");
  EXPECT_EQ(later.logprobs_size(), 0);
  EXPECT_EQ(out.generated().size(), split.second + 1);
  EXPECT_EQ(*out.matched_stop(), split.stop);
}

TEST_F(OutputStreamTest, HeldBackTextIsReleasedByFlush) {
  const std::vector<int32_t> gen = tok().Encode(" the cat sat on the mat", false);
  const std::string full = tok().Decode(gen, true);
  ASSERT_FALSE(full.empty());
  // A stop string that starts with the last character but never completes.
  const std::string stop = std::string(1, full.back()) + "QQQ";
  ASSERT_EQ(full.find(stop), std::string::npos);
  OutputStream out(&tok(), Prompt(), {stop});
  std::string text;
  for (size_t i = 0; i < gen.size(); ++i) {
    v1::GenerateResponse r;
    EXPECT_FALSE(out.Push(Msg(gen, i, 1), &r));
    text += r.text();
  }
  EXPECT_EQ(text, full.substr(0, full.size() - 1)) << "the last character waits";
  v1::GenerateResponse last;
  out.Flush(&last);
  text += last.text();
  EXPECT_EQ(text, full);
  EXPECT_FALSE(out.matched_stop().has_value());
}

TEST_F(OutputStreamTest, StopStringCompletedOnlyAtTheEnd) {
  // The stop string is the very end of the text: reported when the last token comes
  // (or at the latest by Flush), with nothing of it emitted.
  const std::vector<int32_t> gen = tok().Encode(" the cat sat on the mat", false);
  OutputStream out(&tok(), Prompt(), {"mat"});
  std::string text;
  bool stopped = false;
  for (size_t i = 0; i < gen.size() && !stopped; ++i) {
    v1::GenerateResponse r;
    stopped = out.Push(Msg(gen, i, 1), &r);
    text += r.text();
  }
  v1::GenerateResponse last;
  out.Flush(&last);
  text += last.text();
  EXPECT_EQ(text, " the cat sat on the ");
  ASSERT_TRUE(out.matched_stop().has_value());
  EXPECT_EQ(*out.matched_stop(), "mat");
  EXPECT_EQ(out.generated(), gen);
}

}  // namespace
}  // namespace kvrelay::router

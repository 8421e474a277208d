#include "tools/bench/dataset.h"

#include <fstream>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/temp_dir.h"

namespace kvrelay::bench {
namespace {

using ::testing::HasSubstr;

DatasetOptions Base(DatasetKind kind) {
  DatasetOptions o;
  o.kind = kind;
  o.num_prompts = 20;
  o.input_len = 40;
  o.output_len = 10;
  o.vocab_size = 500;
  o.seed = 3;
  return o;
}

TEST(DatasetTest, SameSeedSameDatasetOtherSeedAnother) {
  for (DatasetKind k : {DatasetKind::kRandom, DatasetKind::kPrefix, DatasetKind::kMultiTurn}) {
    DatasetOptions o = Base(k);
    o.range_ratio = 0.5;
    auto a = MakeDataset(o), b = MakeDataset(o);
    ASSERT_TRUE(a.ok() && b.ok()) << a.status();
    ASSERT_EQ(a->size(), 20u);
    o.seed = 4;
    auto c = MakeDataset(o);
    ASSERT_TRUE(c.ok());
    bool same = true, differs = false;
    for (size_t i = 0; i < a->size(); ++i) {
      for (size_t t = 0; t < (*a)[i].turns.size(); ++t) {
        same &= (*a)[i].turns[t].tokens == (*b)[i].turns[t].tokens &&
                (*a)[i].turns[t].max_tokens == (*b)[i].turns[t].max_tokens;
        differs |= (*a)[i].turns[t].tokens != (*c)[i].turns[t].tokens;
      }
    }
    EXPECT_TRUE(same) << DatasetKindName(k);
    EXPECT_TRUE(differs) << DatasetKindName(k);
  }
}

TEST(DatasetTest, RandomLengthsStayInTheRangeAndIdsInTheVocabulary) {
  DatasetOptions o = Base(DatasetKind::kRandom);
  o.num_prompts = 500;
  o.range_ratio = 0.25;
  auto d = MakeDataset(o);
  ASSERT_TRUE(d.ok());
  std::set<size_t> lengths;
  for (const Conversation& c : *d) {
    ASSERT_EQ(c.turns.size(), 1u);
    const TurnSpec& t = c.turns[0];
    EXPECT_GE(t.tokens.size(), 30u);
    EXPECT_LE(t.tokens.size(), 50u);
    EXPECT_GE(t.max_tokens, 7);
    EXPECT_LE(t.max_tokens, 13);
    lengths.insert(t.tokens.size());
    for (int32_t id : t.tokens) ASSERT_TRUE(id >= 0 && id < 500);
  }
  EXPECT_GT(lengths.size(), 10u);  // really spread
  o.range_ratio = 0;
  d = MakeDataset(o);
  for (const Conversation& c : *d) EXPECT_EQ(c.turns[0].tokens.size(), 40u);
}

TEST(DatasetTest, PrefixRequestsShareOneOfTheGroupsSystemPrompts) {
  DatasetOptions o = Base(DatasetKind::kPrefix);
  o.prefix_groups = 3;
  o.prefix_len = 64;
  auto d = MakeDataset(o);
  ASSERT_TRUE(d.ok());
  for (size_t i = 0; i + 3 < d->size(); ++i) {
    const auto& t = (*d)[i].turns[0].tokens;
    ASSERT_EQ(t.size(), 64u + 40u);
    const auto& same_group = (*d)[i + 3].turns[0].tokens;
    const auto& other_group = (*d)[i + 1].turns[0].tokens;
    EXPECT_TRUE(std::equal(t.begin(), t.begin() + 64, same_group.begin())) << i;
    EXPECT_FALSE(std::equal(t.begin(), t.begin() + 64, other_group.begin())) << i;
    EXPECT_NE(std::vector<int32_t>(t.begin() + 64, t.end()),
              std::vector<int32_t>(same_group.begin() + 64, same_group.end()));
  }
}

TEST(DatasetTest, MultiTurnHasTurnsAndThinkTimes) {
  DatasetOptions o = Base(DatasetKind::kMultiTurn);
  o.turns = 4;
  o.think_seconds = 2;
  auto d = MakeDataset(o);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(CountRequests(*d), 80);
  double sum = 0;
  int n = 0;
  for (const Conversation& c : *d) {
    ASSERT_EQ(c.turns.size(), 4u);
    ASSERT_EQ(c.think_seconds.size(), 4u);
    EXPECT_EQ(c.think_seconds[0], 0);
    for (int t = 1; t < 4; ++t, ++n) sum += c.think_seconds[t];
  }
  EXPECT_NEAR(sum / n, 2.0, 0.6);  // exponential, mean 2, 60 samples
}

TEST(DatasetTest, JsonlReadsTextAndIdsAndNamesTheBadLine) {
  testing::ScopedTempDir tmp;
  const std::string path = tmp.path() + "/trace.jsonl";
  std::ofstream(path) << "{\"prompt\": \"hello\", \"max_tokens\": 7}\n\n"
                         "{\"prompt_token_ids\": [1, 2, 3]}\n";
  DatasetOptions o;
  o.kind = DatasetKind::kJsonl;
  o.jsonl_path = path;
  o.output_len = 5;
  o.num_prompts = 0;
  auto d = MakeDataset(o);
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_EQ(d->size(), 2u);
  EXPECT_EQ((*d)[0].turns[0].text, "hello");
  EXPECT_EQ((*d)[0].turns[0].max_tokens, 7);
  EXPECT_EQ((*d)[1].turns[0].tokens, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ((*d)[1].turns[0].max_tokens, 5);
  o.num_prompts = 1;
  EXPECT_EQ(MakeDataset(o)->size(), 1u);

  for (const auto& [line, message] : std::vector<std::pair<std::string, std::string>>{
           {"not json", "trace.jsonl:2: not a JSON object"},
           {"{\"max_tokens\": 3}", "exactly one of"},
           {"{\"prompt\": \"a\", \"prompt_token_ids\": [1]}", "exactly one of"},
           {"{\"prompt_token_ids\": [1, -2]}", "non-token-id"},
           {"{\"prompt\": \"a\", \"max_tokens\": 0}", "max_tokens"}}) {
    std::ofstream(path) << "{\"prompt\": \"ok\"}\n" << line << "\n";
    o.num_prompts = 0;
    auto bad = MakeDataset(o);
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument) << line;
    EXPECT_THAT(bad.status().message(), HasSubstr(message)) << line;
  }
  o.jsonl_path = tmp.path() + "/missing.jsonl";
  EXPECT_EQ(MakeDataset(o).status().code(), absl::StatusCode::kNotFound);
  std::ofstream(path) << "\n";
  o.jsonl_path = path;
  EXPECT_THAT(MakeDataset(o).status().message(), HasSubstr("holds no request"));
}

TEST(DatasetTest, BadOptionsAreNamed) {
  EXPECT_THAT(ParseDatasetKind("sharegpt").status().message(), HasSubstr("unknown dataset"));
  DatasetOptions o = Base(DatasetKind::kRandom);
  o.range_ratio = 1;
  EXPECT_THAT(MakeDataset(o).status().message(), HasSubstr("--random-range-ratio"));
  o = Base(DatasetKind::kPrefix);
  o.prefix_len = 0;
  EXPECT_THAT(MakeDataset(o).status().message(), HasSubstr("--prefix-len"));
  o = Base(DatasetKind::kRandom);
  o.vocab_size = 0;
  EXPECT_THAT(MakeDataset(o).status().message(), HasSubstr("vocabulary"));
}

}  // namespace
}  // namespace kvrelay::bench

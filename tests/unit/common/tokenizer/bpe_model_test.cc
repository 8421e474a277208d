#include "common/tokenizer/bpe_model.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kvrelay::tokenizer {
namespace {

using json = nlohmann::json;

std::vector<int32_t> Enc(const BpeModel& m, const std::string& word) {
  std::vector<int32_t> ids;
  m.Encode(word, &ids);
  return ids;
}

json SmallModel() {
  return json::parse(R"({
    "type": "BPE", "dropout": null, "unk_token": "<unk>",
    "continuing_subword_prefix": null, "end_of_word_suffix": null,
    "fuse_unk": false, "byte_fallback": false,
    "vocab": {"<unk>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "bc": 5, "abc": 6, "cc": 7},
    "merges": ["b c", ["a", "b"], "ab c", "c c"]})");
}

TEST(BpeModelTest, MergesByRankAndBothMergeForms) {
  auto m = BpeModel::FromJson(SmallModel());
  ASSERT_TRUE(m.ok()) << m.status();
  // "b c" (rank 0) beats "a b" (rank 1): a|bc, and "a bc" is not a merge.
  EXPECT_EQ(Enc(**m, "abc"), (std::vector<int32_t>{1, 5}));
  EXPECT_EQ(Enc(**m, "ab"), (std::vector<int32_t>{4}));
  EXPECT_EQ(Enc(**m, "abab"), (std::vector<int32_t>{4, 4}));
  // Equal ranks merge leftmost first: "ccc" -> cc|c.
  EXPECT_EQ(Enc(**m, "ccc"), (std::vector<int32_t>{7, 3}));
  EXPECT_EQ((*m)->max_id(), 7);
  EXPECT_EQ(*(*m)->IdToToken(6), "abc");
  EXPECT_EQ((*m)->IdToToken(99), nullptr);
  EXPECT_EQ((*m)->TokenToId("bc"), 5);
}

TEST(BpeModelTest, UnknownCharacters) {
  json config = SmallModel();
  auto m = BpeModel::FromJson(config);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(Enc(**m, "axxb"), (std::vector<int32_t>{1, 0, 0, 2}));
  config["fuse_unk"] = true;
  auto fused = BpeModel::FromJson(config);
  ASSERT_TRUE(fused.ok());
  EXPECT_EQ(Enc(**fused, "axxb"), (std::vector<int32_t>{1, 0, 2}));
  config["unk_token"] = nullptr;
  auto dropped = BpeModel::FromJson(config);
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(Enc(**dropped, "axxb"), (std::vector<int32_t>{4}));  // x dropped, then a+b
}

TEST(BpeModelTest, ByteFallback) {
  json config = SmallModel();
  config["byte_fallback"] = true;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    config["vocab"][name] = 100 + b;
  }
  auto m = BpeModel::FromJson(config);
  ASSERT_TRUE(m.ok()) << m.status();
  // 'é' = C3 A9 is not in the vocab: its bytes are emitted.
  EXPECT_EQ(Enc(**m, "a\xC3\xA9"), (std::vector<int32_t>{1, 100 + 0xC3, 100 + 0xA9}));
  EXPECT_EQ((*m)->max_id(), 355);
}

TEST(BpeModelTest, IgnoreMerges) {
  json config = SmallModel();
  // Without ignore_merges "abc" becomes a|bc even though "abc" is a token.
  config["ignore_merges"] = true;
  auto m = BpeModel::FromJson(config);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(Enc(**m, "abc"), (std::vector<int32_t>{6}));
  EXPECT_EQ(Enc(**m, "abcc"), (std::vector<int32_t>{1, 5, 3}));
}

TEST(BpeModelTest, CachesShortWords) {
  auto m = BpeModel::FromJson(SmallModel());
  ASSERT_TRUE(m.ok());
  EXPECT_EQ((*m)->cache_size_for_test(), 0u);
  EXPECT_EQ(Enc(**m, "abc"), Enc(**m, "abc"));
  EXPECT_EQ((*m)->cache_size_for_test(), 1u);
  const std::string long_word(BpeModel::kMaxCachedWordBytes + 1, 'c');
  EXPECT_EQ(Enc(**m, long_word).size(), (long_word.size() + 1) / 2);
  EXPECT_EQ((*m)->cache_size_for_test(), 1u);
}

TEST(BpeModelTest, LongWordEncodes) {
  auto m = BpeModel::FromJson(SmallModel());
  ASSERT_TRUE(m.ok());
  std::string word;
  for (int i = 0; i < 20000; ++i) word += "abcc";
  const std::vector<int32_t> ids = Enc(**m, word);
  ASSERT_EQ(ids.size(), 60000u);  // a|bc|c repeated
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(ids[1], 5);
  EXPECT_EQ(ids[2], 3);
}

TEST(BpeModelTest, Errors) {
  json bad_merge = SmallModel();
  bad_merge["merges"].push_back("a c");  // "ac" is not in the vocab
  auto m1 = BpeModel::FromJson(bad_merge);
  ASSERT_FALSE(m1.ok());
  EXPECT_NE(m1.status().message().find("a c"), std::string::npos);

  json prefix = SmallModel();
  prefix["continuing_subword_prefix"] = "##";
  auto m2 = BpeModel::FromJson(prefix);
  ASSERT_FALSE(m2.ok());
  EXPECT_NE(m2.status().message().find("continuing_subword_prefix"), std::string::npos);

  json wordpiece = SmallModel();
  wordpiece["type"] = "WordPiece";
  auto m3 = BpeModel::FromJson(wordpiece);
  ASSERT_FALSE(m3.ok());
  EXPECT_EQ(m3.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m3.status().message().find("WordPiece"), std::string::npos);

  json unk = SmallModel();
  unk["unk_token"] = "<missing>";
  EXPECT_FALSE(BpeModel::FromJson(unk).ok());

  json types = SmallModel();
  types["vocab"]["zz"] = "not a number";
  auto m4 = BpeModel::FromJson(types);
  ASSERT_FALSE(m4.ok());
  EXPECT_EQ(m4.status().code(), absl::StatusCode::kInvalidArgument);

  json malformed = SmallModel();
  malformed["merges"] = json::array({"abc"});
  EXPECT_FALSE(BpeModel::FromJson(malformed).ok());
}

}  // namespace
}  // namespace kvrelay::tokenizer

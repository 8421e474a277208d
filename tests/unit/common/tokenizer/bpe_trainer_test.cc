#include "common/tokenizer/bpe_trainer.h"

#include <gtest/gtest.h>

#include <string>

#include "common/tokenizer/tokenizer.h"
#include "common/tokenizer/unicode.h"
#include "nlohmann/json.hpp"

namespace kvrelay::tokenizer {
namespace {

using json = nlohmann::json;

TrainedTokenizer Train(ByteLevelStyle style, int vocab_size, std::string corpus = "") {
  BpeTrainOptions options;
  options.style = style;
  options.vocab_size = vocab_size;
  options.corpus = std::move(corpus);
  auto trained = TrainByteLevelBpe(options);
  EXPECT_TRUE(trained.ok()) << trained.status();
  return trained.ok() ? *std::move(trained) : TrainedTokenizer{};
}

TEST(BuiltinCorpusTest, IsVariedUtf8) {
  const std::string& corpus = BuiltinCorpus();
  EXPECT_GT(corpus.size(), 3000u);
  EXPECT_TRUE(IsValidUtf8(corpus));
  EXPECT_NE(corpus.find("caf\xC3\xA9"), std::string::npos);               // accents
  EXPECT_NE(corpus.find("\xE4\xBD\xA0\xE5\xA5\xBD"), std::string::npos);  // CJK
  EXPECT_NE(corpus.find("\xF0\x9F\x9A\x80"), std::string::npos);          // emoji
  EXPECT_NE(corpus.find("def fibonacci"), std::string::npos);             // code
}

class TrainerTest : public ::testing::TestWithParam<ByteLevelStyle> {};

TEST_P(TrainerTest, DeterministicBytes) {
  const TrainedTokenizer a = Train(GetParam(), 700);
  const TrainedTokenizer b = Train(GetParam(), 700);
  EXPECT_FALSE(a.json.empty());
  EXPECT_EQ(a.json, b.json);
}

TEST_P(TrainerTest, LoadsWithRequestedVocabSize) {
  const bool llama3 = GetParam() == ByteLevelStyle::kLlama3;
  for (int vocab_size : {300, 512, 1024}) {
    const TrainedTokenizer trained = Train(GetParam(), vocab_size);
    auto t = Tokenizer::FromJson(trained.json, "trained/tokenizer.json");
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ((*t)->vocab_size(), vocab_size);
    const int num_special = llama3 ? 3 : 1;
    ASSERT_EQ(trained.special_tokens.size(), static_cast<size_t>(num_special));
    for (int i = 0; i < num_special; ++i) {
      EXPECT_EQ((*t)->TokenToId(trained.special_tokens[i]), vocab_size - num_special + i);
      EXPECT_TRUE((*t)->IsSpecial(vocab_size - num_special + i));
    }
    if (llama3) {
      EXPECT_EQ(trained.bos_token_id, vocab_size - 3);
      EXPECT_EQ(trained.eos_token_ids, (std::vector<int>{vocab_size - 2, vocab_size - 1}));
      EXPECT_EQ((*t)->bos_token_id(), vocab_size - 3);
    } else {
      EXPECT_EQ(trained.bos_token_id, -1);
      EXPECT_EQ(trained.eos_token_ids, std::vector<int>{vocab_size - 1});
      EXPECT_FALSE((*t)->bos_token_id().has_value());
    }
    // The 256 byte tokens come first, in GPT-2 order.
    EXPECT_EQ((*t)->IdToToken(0), "!");
    EXPECT_EQ((*t)->IdToToken(220), "\xC4\xA0");  // "Ġ"
  }
}

TEST_P(TrainerTest, JsonHasTheHuggingFaceLayout) {
  const bool llama3 = GetParam() == ByteLevelStyle::kLlama3;
  const TrainedTokenizer trained = Train(GetParam(), 512);
  const json j = json::parse(trained.json);
  EXPECT_EQ(j["version"], "1.0");
  EXPECT_TRUE(j["truncation"].is_null());
  EXPECT_TRUE(j["padding"].is_null());
  EXPECT_TRUE(j["normalizer"].is_null());
  EXPECT_EQ(j["decoder"]["type"], "ByteLevel");
  const json& model = j["model"];
  EXPECT_EQ(model["type"], "BPE");
  EXPECT_TRUE(model["dropout"].is_null());
  EXPECT_TRUE(model["unk_token"].is_null());
  EXPECT_TRUE(model["continuing_subword_prefix"].is_null());
  EXPECT_TRUE(model["end_of_word_suffix"].is_null());
  EXPECT_EQ(model["fuse_unk"], false);
  EXPECT_EQ(model["byte_fallback"], false);
  EXPECT_EQ(model["ignore_merges"], llama3);
  EXPECT_EQ(model["vocab"].size() + trained.special_tokens.size(), 512u);
  ASSERT_FALSE(model["merges"].empty());
  EXPECT_TRUE(model["merges"][0].is_string());
  EXPECT_EQ(j["added_tokens"].size(), trained.special_tokens.size());
  EXPECT_EQ(j["added_tokens"][0]["special"], true);
  if (llama3) {
    EXPECT_EQ(j["pre_tokenizer"]["type"], "Sequence");
    EXPECT_EQ(j["pre_tokenizer"]["pretokenizers"][0]["type"], "Split");
    EXPECT_EQ(j["pre_tokenizer"]["pretokenizers"][0]["behavior"], "Isolated");
    EXPECT_EQ(j["pre_tokenizer"]["pretokenizers"][1]["use_regex"], false);
    EXPECT_EQ(j["post_processor"]["type"], "TemplateProcessing");
  } else {
    EXPECT_EQ(j["pre_tokenizer"]["type"], "ByteLevel");
    EXPECT_EQ(j["pre_tokenizer"]["use_regex"], true);
    EXPECT_EQ(j["pre_tokenizer"]["add_prefix_space"], false);
    EXPECT_EQ(j["post_processor"]["type"], "ByteLevel");
  }
  // Key order is fixed (ordered_json): "version" first, "model" last.
  EXPECT_EQ(trained.json.find("\"version\""), trained.json.find('"'));
  EXPECT_GT(trained.json.find("\"model\""), trained.json.find("\"decoder\""));
}

TEST_P(TrainerTest, TrainsVocab1024) {
  // Training time is measured in tests/bench/tokenizer_bench.cc.
  const TrainedTokenizer trained = Train(GetParam(), 1024);
  EXPECT_FALSE(trained.json.empty());
  auto t = Tokenizer::FromJson(trained.json, "trained/tokenizer.json");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->vocab_size(), 1024);
}

TEST_P(TrainerTest, SmallCorpusStopsEarly) {
  // Only a handful of pairs occur twice: the vocabulary ends up smaller.
  const TrainedTokenizer trained = Train(GetParam(), 1000, "abab abab abab xyz");
  auto t = Tokenizer::FromJson(trained.json, "small");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_LT((*t)->vocab_size(), 300);
  EXPECT_EQ((*t)->Decode((*t)->Encode("abab xyz!", false), false), "abab xyz!");
  EXPECT_LE((*t)->Encode("abab", false).size(), 1u);
}

TEST_P(TrainerTest, RejectsBadVocabSize) {
  BpeTrainOptions options;
  options.style = GetParam();
  options.vocab_size = 100;
  auto trained = TrainByteLevelBpe(options);
  ASSERT_FALSE(trained.ok());
  EXPECT_EQ(trained.status().code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Styles, TrainerTest,
                         ::testing::Values(ByteLevelStyle::kGpt2, ByteLevelStyle::kLlama3));

}  // namespace
}  // namespace kvrelay::tokenizer

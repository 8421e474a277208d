#include "common/model/model_maker.h"

#include "common/model/config.h"
#include "common/model/safetensors.h"
#include "common/tokenizer/tokenizer.h"
#include "common/util/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace kvrelay::model {
namespace {

const char* kFiles[] = {"config.json", "generation_config.json", "tokenizer.json",
                        "model.safetensors"};

TEST(MakeModelTest, SameSeedSameBytesOtherSeedOtherWeights) {
  for (Family f : {Family::kLlama, Family::kGpt2}) {
    MakeModelOptions o;
    o.family = f;
    o.seed = 42;
    const std::string base = testing::MakeTempDir("kvr_mm_");
    ASSERT_TRUE(MakeModel(o, base + "/a").ok());
    ASSERT_TRUE(MakeModel(o, base + "/b").ok());
    o.seed = 43;
    ASSERT_TRUE(MakeModel(o, base + "/c").ok());
    for (const char* f : kFiles) {
      EXPECT_EQ(*ReadFile(base + "/a/" + f), *ReadFile(base + "/b/" + f)) << f;
    }
    EXPECT_NE(*ReadFile(base + "/a/model.safetensors"), *ReadFile(base + "/c/model.safetensors"));
  }
}

TEST(MakeModelTest, WritesALoadableHuggingFaceFolder) {
  for (const testing::ModelVariant& v : testing::TinyVariants()) {
    const std::string dir = testing::ModelDir(v);
    auto cfg = LoadModelConfig(dir);
    ASSERT_TRUE(cfg.ok()) << v.name << ": " << cfg.status();
    EXPECT_EQ(cfg->family, v.options.family);
    EXPECT_EQ(cfg->num_layers, v.options.layers);
    EXPECT_EQ(cfg->vocab_size, v.options.vocab);
    EXPECT_FALSE(cfg->eos_token_ids.empty());
    auto store = WeightStore::Open(dir);
    ASSERT_TRUE(store.ok()) << store.status();
    auto tok = tokenizer::Tokenizer::FromFile(dir + "/tokenizer.json");
    ASSERT_TRUE(tok.ok()) << tok.status();
    EXPECT_LE((*tok)->vocab_size(), cfg->vocab_size);
    const std::string text = "Hello, world! Grüße 👋";
    EXPECT_EQ((*tok)->Decode((*tok)->Encode(text, false), false), text);
    for (int eos : cfg->eos_token_ids) EXPECT_TRUE((*tok)->IsSpecial(eos)) << v.name;
    const auto& loaded = testing::LoadedModel(v);
    EXPECT_GT(loaded.weights().parameter_count, 0);
  }
}

TEST(MakeModelTest, WeightDtypeAndLayout) {
  MakeModelOptions o;
  o.family = Family::kGpt2;
  o.dtype = kernels::DType::kBF16;
  const std::string dir = testing::MakeTempDir("kvr_mm_") + "/g";
  ASSERT_TRUE(MakeModel(o, dir).ok());
  auto store = std::move(*WeightStore::Open(dir));
  // GPT-2 Conv1D weights are stored [in][out].
  auto t = store->Get("h.0.attn.c_attn.weight", {o.hidden, 3 * o.hidden});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->dtype, kernels::DType::kBF16);
  EXPECT_FALSE(store->Has("lm_head.weight"));
}

TEST(MakeModelTest, BadOptionsNameTheOption) {
  MakeModelOptions o;
  o.heads = 5;  // does not divide hidden 64
  absl::Status s = MakeModel(o, testing::MakeTempDir("kvr_mm_") + "/x");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), ::testing::HasSubstr("--heads"));
  o = MakeModelOptions();
  o.kv_heads = 3;
  s = MakeModel(o, testing::MakeTempDir("kvr_mm_") + "/y");
  EXPECT_THAT(s.message(), ::testing::HasSubstr("--kv-heads"));
  o = MakeModelOptions();
  o.hidden = 1 << 14;
  o.vocab = 1 << 22;  // 64G parameters: refused before anything is allocated
  s = MakeModel(o, testing::MakeTempDir("kvr_mm_") + "/big");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), ::testing::HasSubstr("16 GiB"));
  o = MakeModelOptions();
  o.hidden = 1 << 21;
  s = MakeModel(o, testing::MakeTempDir("kvr_mm_") + "/wide");
  EXPECT_THAT(s.message(), ::testing::HasSubstr("--hidden must be in"));
  o = MakeModelOptions();
  o.model_type = "falcon";
  s = MakeModel(o, testing::MakeTempDir("kvr_mm_") + "/z");
  EXPECT_THAT(s.message(), ::testing::HasSubstr("--model-type"));
}

}  // namespace
}  // namespace kvrelay::model

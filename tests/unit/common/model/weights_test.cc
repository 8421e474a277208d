#include "common/model/weights.h"

#include <cstring>

#include "common/model/model.h"
#include "common/model/model_maker.h"
#include "common/util/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/ops.h"
#include "nlohmann/json.hpp"
#include "tests/testing/test_models.h"

namespace kvrelay::model {
namespace {

using ::testing::HasSubstr;

float At(const Linear& l, int64_t o, int64_t i) {
  float v;
  kernels::ToF32(static_cast<const uint8_t*>(l.w) + (o * l.in + i) * kernels::DTypeSize(l.dtype),
                 l.dtype, 1, &v);
  return v;
}

TEST(WeightsTest, Gpt2Conv1DIsTransposedAndTied) {
  testing::ModelVariant v = testing::TinyVariants()[4];
  ASSERT_EQ(v.options.family, Family::kGpt2);
  const std::string dir = testing::ModelDir(v);
  auto cfg = *LoadModelConfig(dir);
  auto w = LoadWeights(cfg, std::move(*WeightStore::Open(dir)));
  ASSERT_TRUE(w.ok()) << w.status();
  auto store = std::move(*WeightStore::Open(dir));
  const int64_t H = cfg.hidden_size;
  TensorInfo raw = *store->Get("h.1.attn.c_attn.weight", {H, 3 * H});
  const Linear& qkv = (*w)->layers[1].qkv;
  EXPECT_EQ(qkv.out, 3 * H);
  EXPECT_EQ(qkv.in, H);
  for (int64_t i : {0L, 5L, H - 1}) {
    for (int64_t o : {0L, 7L, 3 * H - 1}) {
      float want;
      kernels::ToF32(static_cast<const uint8_t*>(raw.data) + (i * 3 * H + o) * 4, raw.dtype, 1,
                     &want);
      EXPECT_EQ(At(qkv, o, i), want) << i << "," << o;
    }
  }
  EXPECT_EQ((*w)->lm_head.w, (*w)->embed);
  EXPECT_EQ((*w)->pos_embed.size(), static_cast<size_t>(cfg.max_position_embeddings * H));
}

TEST(WeightsTest, LlamaQkvAndGateUpAreStacked) {
  testing::ModelVariant v = testing::TinyVariants()[3];  // qwen2: with q/k/v bias
  const std::string dir = testing::ModelDir(v);
  auto cfg = *LoadModelConfig(dir);
  auto w = std::move(*LoadWeights(cfg, std::move(*WeightStore::Open(dir))));
  auto store = std::move(*WeightStore::Open(dir));
  const int64_t H = cfg.hidden_size, nq = cfg.num_heads * cfg.head_dim,
                nkv = cfg.num_kv_heads * cfg.head_dim;
  TensorInfo k = *store->Get("model.layers.0.self_attn.k_proj.weight", {nkv, H});
  const Linear& qkv = w->layers[0].qkv;
  EXPECT_EQ(qkv.out, nq + 2 * nkv);
  EXPECT_EQ(0, std::memcmp(static_cast<const uint8_t*>(qkv.w) + nq * H * 4, k.data, k.nbytes));
  ASSERT_NE(qkv.bias, nullptr);
  TensorInfo vb = *store->Get("model.layers.0.self_attn.v_proj.bias", {nkv});
  EXPECT_EQ(0, std::memcmp(qkv.bias + nq + nkv, vb.data, vb.nbytes));
  EXPECT_EQ(w->layers[0].up.out, 2 * cfg.intermediate_size);
  EXPECT_NE(w->lm_head.w, w->embed);  // untied
}

TEST(WeightsTest, TiedLlamaUsesTheEmbedding) {
  testing::ModelVariant v = testing::TinyVariants()[1];
  ASSERT_TRUE(v.options.tie_embeddings);
  const std::string dir = testing::ModelDir(v);
  auto cfg = *LoadModelConfig(dir);
  auto w = std::move(*LoadWeights(cfg, std::move(*WeightStore::Open(dir))));
  EXPECT_EQ(w->lm_head.w, w->embed);
}

TEST(WeightsTest, ShapeNotMatchingTheConfigNamesFileAndTensor) {
  testing::ModelVariant v = testing::TinyVariants()[0];
  const std::string dir = testing::ModelDir(v);
  ModelConfig cfg = *LoadModelConfig(dir);
  cfg.intermediate_size += 16;  // the file's MLP weights no longer match
  auto w = LoadWeights(cfg, std::move(*WeightStore::Open(dir)));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(w.status().message(), HasSubstr("model.safetensors"));
  EXPECT_THAT(w.status().message(), HasSubstr("mlp.gate_proj.weight"));
}

TEST(WeightsTest, MissingTensorIsNamed) {
  testing::ModelVariant v = testing::TinyVariants()[0];
  const std::string dir = testing::ModelDir(v);
  ModelConfig cfg = *LoadModelConfig(dir);
  cfg.num_layers += 1;
  auto w = LoadWeights(cfg, std::move(*WeightStore::Open(dir)));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(w.status().message(), HasSubstr("model.layers.2."));
}

}  // namespace
}  // namespace kvrelay::model

namespace kvrelay::model {
namespace {

// Safetensors offsets need not be aligned: a 2-byte tensor first shifts every f32 tensor
// after it off its 4-byte alignment. Loading must still work and give the same model.
TEST(WeightsTest, MisalignedTensorsLoadAndComputeTheSame) {
  testing::ModelVariant v = testing::TinyVariants()[0];
  const std::string src = testing::ModelDir(v);
  const std::string dir = testing::MakeTempDir("kvr_misaligned_");
  for (const char* f : {"config.json", "generation_config.json", "tokenizer.json"}) {
    ASSERT_TRUE(WriteFile(dir + "/" + f, *ReadFile(src + "/" + f)).ok());
  }
  auto file = std::move(*SafetensorsFile::Open(src + "/model.safetensors"));
  std::vector<TensorToWrite> tensors;
  tensors.push_back(TensorToWrite{"odd_f16", kernels::DType::kF16, {1}, std::string(2, '\0')});
  for (const auto& [name, t] : file->tensors()) {
    tensors.push_back(TensorToWrite{name, t.dtype, t.shape,
                                    std::string(static_cast<const char*>(t.data), t.nbytes)});
  }
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors).ok());
  auto shifted = std::move(*SafetensorsFile::Open(dir + "/model.safetensors"));
  const TensorInfo& any = shifted->tensors().at("model.norm.weight");
  ASSERT_NE(reinterpret_cast<uintptr_t>(any.data) % 4, 0u) << "the fixture is not misaligned";

  auto a = Model::Load(src, testing::TestPool());
  auto b = Model::Load(dir, testing::TestPool());
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  auto pool = std::move(*kvcache::KvPool::Create((*a)->KvLayout(kernels::DType::kF32, 16), 4));
  std::vector<int32_t> tokens = {1, 2, 3, 4, 5};
  std::vector<int32_t> blocks = {0};
  std::vector<float> la, lb;
  SeqChunk c{absl::MakeConstSpan(tokens), 0, blocks, true};
  ASSERT_TRUE((*a)->Forward({c}, pool->view(), &la).ok());
  ASSERT_TRUE((*b)->Forward({c}, pool->view(), &lb).ok());
  EXPECT_EQ(la, lb);
}

}  // namespace
}  // namespace kvrelay::model

namespace kvrelay::model {
namespace {

// A model split into two shards with model.safetensors.index.json loads and computes
// exactly what the single-file model does.
TEST(WeightsTest, ShardedModelComputesTheSame) {
  testing::ModelVariant v = testing::TinyVariants()[4];  // gpt2
  const std::string src = testing::ModelDir(v);
  const std::string dir = testing::MakeTempDir("kvr_sharded_");
  for (const char* f : {"config.json", "generation_config.json", "tokenizer.json"}) {
    ASSERT_TRUE(WriteFile(dir + "/" + f, *ReadFile(src + "/" + f)).ok());
  }
  auto file = std::move(*SafetensorsFile::Open(src + "/model.safetensors"));
  std::vector<TensorToWrite> shard[2];
  nlohmann::json index;
  int i = 0;
  for (const auto& [name, t] : file->tensors()) {
    const int s = i++ % 2;
    shard[s].push_back(TensorToWrite{name, t.dtype, t.shape,
                                     std::string(static_cast<const char*>(t.data), t.nbytes)});
    index["weight_map"][name] = "model-0000" + std::to_string(s + 1) + "-of-00002.safetensors";
  }
  ASSERT_TRUE(WriteSafetensors(dir + "/model-00001-of-00002.safetensors", shard[0]).ok());
  ASSERT_TRUE(WriteSafetensors(dir + "/model-00002-of-00002.safetensors", shard[1]).ok());
  ASSERT_TRUE(WriteFile(dir + "/model.safetensors.index.json", index.dump()).ok());

  auto a = Model::Load(src, testing::TestPool());
  auto b = Model::Load(dir, testing::TestPool());
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  auto pool = std::move(*kvcache::KvPool::Create((*a)->KvLayout(kernels::DType::kF32, 16), 4));
  std::vector<int32_t> tokens = {7, 8, 9, 10, 11, 12};
  std::vector<int32_t> blocks = {0};
  std::vector<float> la, lb;
  SeqChunk c{absl::MakeConstSpan(tokens), 0, blocks, true};
  ASSERT_TRUE((*a)->Forward({c}, pool->view(), &la).ok());
  ASSERT_TRUE((*b)->Forward({c}, pool->view(), &lb).ok());
  EXPECT_EQ(la, lb);
}

}  // namespace
}  // namespace kvrelay::model

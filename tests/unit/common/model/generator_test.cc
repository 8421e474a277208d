#include "common/model/generator.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace kvrelay::model {
namespace {

using ::testing::HasSubstr;

const testing::ModelVariant& Variant() {
  static const auto* v = new testing::ModelVariant(testing::TinyVariants()[0]);
  return *v;
}

// A KV pool with its prefix cache.
struct Kv {
  std::unique_ptr<kvcache::KvPool> pool;
  std::unique_ptr<kvcache::PrefixCache> cache;
};

Kv MakeKv(const Model& m, int blocks, int block_size = 16) {
  Kv kv;
  kv.pool =
      std::move(*kvcache::KvPool::Create(m.KvLayout(kernels::DType::kF32, block_size), blocks));
  kvcache::PrefixCache::Options o;
  o.num_blocks = blocks;
  o.block_size = block_size;
  kv.cache = std::move(*kvcache::PrefixCache::Create(o));
  return kv;
}

TEST(GeneratorTest, GreedyIsDeterministicAndMatchesPromptLogits) {
  const Model& m = testing::LoadedModel(Variant());
  Kv kv = MakeKv(m, 64);
  Generator gen(&m, kv.pool.get(), kv.cache.get(), "tiny", 7);
  sampling::SamplingParams p;
  p.max_tokens = 12;
  p.ignore_eos = true;
  std::vector<int32_t> prompt = {5, 9, 100, 42, 7, 300, 1, 2, 3};
  auto a = gen.Generate(prompt, p);
  auto b = gen.Generate(prompt, p);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(a->token_ids, b->token_ids);
  EXPECT_EQ(a->token_ids.size(), 12u);
  EXPECT_EQ(a->finish_reason, "length");
  // Each greedy token is the argmax of recomputing the whole prefix (a fresh salt per
  // step: nothing is reused).
  std::vector<int32_t> seq = prompt;
  for (int32_t tok : a->token_ids) {
    int64_t cached = -1;
    auto logits = gen.PromptLogits(seq, "step" + std::to_string(seq.size()), &cached);
    ASSERT_TRUE(logits.ok());
    EXPECT_EQ(cached, 0);
    const int32_t argmax =
        static_cast<int32_t>(std::max_element(logits->begin(), logits->end()) - logits->begin());
    EXPECT_EQ(tok, argmax);
    seq.push_back(tok);
  }
  EXPECT_EQ(kv.cache->counts().in_use, 0);  // every block released
}

TEST(GeneratorTest, StopsOnStopTokenAndOnCallback) {
  const Model& m = testing::LoadedModel(Variant());
  Kv kv = MakeKv(m, 64);
  Generator gen(&m, kv.pool.get(), kv.cache.get(), "tiny");
  sampling::SamplingParams p;
  p.max_tokens = 10;
  p.ignore_eos = true;
  std::vector<int32_t> prompt = {5, 9, 100};
  auto free_run = gen.Generate(prompt, p);
  ASSERT_TRUE(free_run.ok());
  p.stop_token_ids = {free_run->token_ids[3]};
  auto stopped = gen.Generate(prompt, p);
  ASSERT_TRUE(stopped.ok());
  EXPECT_EQ(stopped->finish_reason, "stop");
  EXPECT_LE(stopped->token_ids.size(), 4u);
  EXPECT_EQ(stopped->token_ids.back(), free_run->token_ids[3]);
  int calls = 0;
  GenerateOptions abort_after_two;
  abort_after_two.on_token = [&](int32_t) { return ++calls < 2; };
  auto aborted = gen.Generate(prompt, sampling::SamplingParams{}, abort_after_two);
  ASSERT_TRUE(aborted.ok());
  EXPECT_EQ(aborted->finish_reason, "abort");
  EXPECT_EQ(aborted->token_ids.size(), 2u);
  EXPECT_EQ(kv.cache->counts().in_use, 0);  // every block released
}

TEST(GeneratorTest, SeededSamplingIsReproducible) {
  const Model& m = testing::LoadedModel(Variant());
  Kv kv = MakeKv(m, 64);
  Generator gen(&m, kv.pool.get(), kv.cache.get(), "tiny");
  sampling::SamplingParams p;
  p.max_tokens = 16;
  p.temperature = 1.5f;
  p.top_p = 0.9f;
  p.seed = 1234;
  p.ignore_eos = true;
  p.logprobs = 3;
  auto a = gen.Generate({1, 2, 3}, p);
  auto b = gen.Generate({1, 2, 3}, p);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->token_ids, b->token_ids);
  ASSERT_EQ(a->samples.size(), a->token_ids.size());
  EXPECT_EQ(a->samples[0].top_logprobs.size(), 3u);
  // Continuing from any position reproduces the rest (randomness keyed by position).
  std::vector<int32_t> resumed_prompt = {1, 2, 3};
  resumed_prompt.insert(resumed_prompt.end(), a->token_ids.begin(), a->token_ids.begin() + 5);
  // The prompt for penalties differs, but with no penalties only position matters.
  p.max_tokens = 11;
  auto c = gen.Generate(resumed_prompt, p);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->token_ids, std::vector<int32_t>(a->token_ids.begin() + 5, a->token_ids.end()));
}

TEST(GeneratorTest, BadInputIsInvalidArgumentAndLeaksNothing) {
  const Model& m = testing::LoadedModel(Variant());
  Kv kv = MakeKv(m, 64);
  Generator gen(&m, kv.pool.get(), kv.cache.get(), "tiny");
  sampling::SamplingParams p;
  auto empty = gen.Generate({}, p);
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(empty.status().message(), HasSubstr("empty"));
  auto bad_id = gen.Generate({1, -4}, p);
  EXPECT_EQ(bad_id.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_id.status().message(), HasSubstr("token 1"));
  auto too_long = gen.Generate(std::vector<int32_t>(m.config().max_position_embeddings, 1), p);
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(too_long.status().message(), HasSubstr("context length"));
  p.temperature = -1;
  auto bad_temp = gen.Generate({1, 2}, p);
  EXPECT_EQ(bad_temp.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_temp.status().message(), HasSubstr("temperature"));
  EXPECT_EQ(kv.cache->counts().in_use, 0);  // every block released
}

TEST(GeneratorTest, PoolTooSmallIsResourceExhausted) {
  const Model& m = testing::LoadedModel(Variant());
  Kv kv = MakeKv(m, 2);  // 32 tokens
  Generator gen(&m, kv.pool.get(), kv.cache.get(), "tiny");
  sampling::SamplingParams p;
  p.max_tokens = 40;
  p.ignore_eos = true;
  auto r = gen.Generate(std::vector<int32_t>(20, 3), p);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(kv.cache->counts().in_use, 0);  // every block released
}

TEST(GeneratorTest, StopsAtContextLength) {
  const Model& m = testing::LoadedModel(Variant());
  const int max_pos = m.config().max_position_embeddings;
  Kv kv = MakeKv(m, max_pos / 16 + 1);
  Generator gen(&m, kv.pool.get(), kv.cache.get(), "tiny", 256);
  sampling::SamplingParams p;
  p.max_tokens = 100;
  p.ignore_eos = true;
  auto r = gen.Generate(std::vector<int32_t>(max_pos - 3, 3), p);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->finish_reason, "length");
  EXPECT_EQ(r->token_ids.size(), 3u);
}

}  // namespace
}  // namespace kvrelay::model

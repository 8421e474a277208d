#include "common/model/generator.h"

#include <cstring>
#include <sstream>

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

Kv MakeKv(const Model& m, int blocks, int block_size = 16,
          kernels::DType kv_dtype = kernels::DType::kF32) {
  Kv kv;
  kv.pool = std::move(*kvcache::KvPool::Create(m.KvLayout(kv_dtype, block_size), blocks));
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

// Prefix reuse (issue 3): a request served with cached KV is bit-identical to a cold
// run — same tokens, same logits bit for bit — for both families and several block
// sizes and KV dtypes.
struct ReuseCase {
  testing::ModelVariant variant;
  int block_size;
  kernels::DType kv_dtype;
};
void PrintTo(const ReuseCase& c, std::ostream* os) {
  *os << c.variant.name << "_bs" << c.block_size << "_" << kernels::DTypeName(c.kv_dtype);
}

std::vector<ReuseCase> ReuseCases() {
  std::vector<ReuseCase> out;
  for (const testing::ModelVariant& v : testing::TinyVariants()) {
    if (v.name != "llama_gqa" && v.name != "gpt2") continue;
    for (int bs : {1, 4, 16}) out.push_back({v, bs, kernels::DType::kF32});
    out.push_back({v, 8, kernels::DType::kI8});
  }
  return out;
}

class PrefixReuseTest : public ::testing::TestWithParam<ReuseCase> {
 protected:
  const Model& model() const { return testing::LoadedModel(GetParam().variant); }
  Kv NewKv(int blocks = 128) const {
    return MakeKv(model(), blocks, GetParam().block_size, GetParam().kv_dtype);
  }
  static sampling::SamplingParams Params(int max_tokens) {
    sampling::SamplingParams p;
    p.max_tokens = max_tokens;
    p.ignore_eos = true;
    return p;
  }
  // A run in a fresh pool: nothing to reuse.
  GenerationResult Cold(const std::vector<int32_t>& prompt, const sampling::SamplingParams& p) {
    Kv kv = NewKv();
    Generator gen(&model(), kv.pool.get(), kv.cache.get(), "tiny", 5);
    GenerateOptions o;
    o.keep_logits = true;
    auto r = gen.Generate(prompt, p, o);
    EXPECT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->cached_tokens, 0);
    return *std::move(r);
  }
  static void ExpectIdentical(const GenerationResult& a, const GenerationResult& b) {
    EXPECT_EQ(a.token_ids, b.token_ids);
    ASSERT_EQ(a.logits.size(), b.logits.size());
    for (size_t i = 0; i < a.logits.size(); ++i) {
      ASSERT_EQ(a.logits[i].size(), b.logits[i].size());
      EXPECT_EQ(std::memcmp(a.logits[i].data(), b.logits[i].data(), a.logits[i].size() * 4), 0)
          << "logits of token " << i << " differ";
    }
  }
  static std::vector<int32_t> Prompt(int n, int32_t salt) {
    std::vector<int32_t> t(n);
    for (int i = 0; i < n; ++i) t[i] = (i * 37 + salt * 101 + 11) % 250 + 3;
    return t;
  }
};

TEST_P(PrefixReuseTest, MultiTurnReusesPromptAndOutputExactly) {
  const int B = GetParam().block_size;
  Kv kv = NewKv();
  Generator gen(&model(), kv.pool.get(), kv.cache.get(), "tiny", 5);
  GenerateOptions o;
  o.keep_logits = true;
  const auto p = Params(9);
  std::vector<int32_t> history = Prompt(21, 1);
  for (int turn = 0; turn < 3; ++turn) {
    const std::vector<int32_t> fresh = Prompt(6 + turn, 10 + turn);
    std::vector<int32_t> prompt = history;
    prompt.insert(prompt.end(), fresh.begin(), fresh.end());
    auto warm = gen.Generate(prompt, p, o);
    ASSERT_TRUE(warm.ok()) << warm.status();
    // Every full block of the previous turns' prompt and output (whose KV was computed:
    // all but the last generated token) is reused.
    const int64_t expected = turn == 0 ? 0 : (static_cast<int64_t>(history.size()) - 1) / B * B;
    EXPECT_EQ(warm->cached_tokens, expected) << "turn " << turn;
    ExpectIdentical(*warm, Cold(prompt, p));
    history = prompt;
    history.insert(history.end(), warm->token_ids.begin(), warm->token_ids.end());
  }
  EXPECT_EQ(kv.cache->counts().in_use, 0);
  EXPECT_TRUE(kv.cache->Validate().ok());
}

TEST_P(PrefixReuseTest, SharedPrefixAndFullHitAreExact) {
  const int B = GetParam().block_size;
  Kv kv = NewKv();
  Generator gen(&model(), kv.pool.get(), kv.cache.get(), "tiny", 7);
  GenerateOptions o;
  o.keep_logits = true;
  const auto p = Params(6);
  const std::vector<int32_t> system = Prompt(19, 3);
  std::vector<int32_t> a = system, b = system;
  for (int32_t t : Prompt(5, 4)) a.push_back(t);
  for (int32_t t : Prompt(9, 5)) b.push_back(t);
  ASSERT_TRUE(gen.Generate(a, p, o).ok());
  auto rb = gen.Generate(b, p, o);
  ASSERT_TRUE(rb.ok());
  EXPECT_EQ(rb->cached_tokens, 19 / B * B);
  ExpectIdentical(*rb, Cold(b, p));
  // The same prompt again: all but the block holding the last token is reused.
  auto again = gen.Generate(b, p, o);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->cached_tokens, (static_cast<int64_t>(b.size()) - 1) / B * B);
  ExpectIdentical(*again, *rb);
}

TEST_P(PrefixReuseTest, SeededSamplingContinuesIdentically) {
  Kv kv = NewKv();
  Generator gen(&model(), kv.pool.get(), kv.cache.get(), "tiny", 5);
  sampling::SamplingParams p = Params(8);
  p.temperature = 1.3f;
  p.top_k = 20;
  p.seed = 77;
  const std::vector<int32_t> prompt = Prompt(30, 8);
  ASSERT_TRUE(gen.Generate(prompt, p).ok());
  GenerateOptions o;
  o.keep_logits = true;
  auto warm = gen.Generate(prompt, p, o);
  ASSERT_TRUE(warm.ok());
  EXPECT_GT(warm->cached_tokens, 0);
  ExpectIdentical(*warm, Cold(prompt, p));
}

TEST_P(PrefixReuseTest, OtherSaltOrModelIdNeverHits) {
  Kv kv = NewKv();
  Generator gen(&model(), kv.pool.get(), kv.cache.get(), "tiny", 5);
  Generator other_model(&model(), kv.pool.get(), kv.cache.get(), "tiny-v2", 5);
  const auto p = Params(3);
  const std::vector<int32_t> prompt = Prompt(40, 9);
  GenerateOptions tenant_a, tenant_b;
  tenant_a.cache_salt = "a";
  tenant_b.cache_salt = "b";
  ASSERT_EQ(gen.Generate(prompt, p, tenant_a)->cached_tokens, 0);
  EXPECT_EQ(gen.Generate(prompt, p, tenant_b)->cached_tokens, 0);
  EXPECT_EQ(gen.Generate(prompt, p)->cached_tokens, 0);  // no salt is its own tenant
  EXPECT_EQ(other_model.Generate(prompt, p, tenant_a)->cached_tokens, 0);
  EXPECT_GT(gen.Generate(prompt, p, tenant_a)->cached_tokens, 0);
}

TEST_P(PrefixReuseTest, PoolSmallerThanTheWorkingSetKeepsServing) {
  const int B = GetParam().block_size;
  const int blocks = static_cast<int>(kvcache::BlocksFor(48, B)) + 1;  // one request at a time
  Kv kv = NewKv(blocks);
  Generator gen(&model(), kv.pool.get(), kv.cache.get(), "tiny", 5);
  GenerateOptions o;
  o.keep_logits = true;
  const auto p = Params(4);
  for (int r = 0; r < 12; ++r) {
    const std::vector<int32_t> prompt = Prompt(40, r % 5);  // 5 prompts cycling: evictions
    auto warm = gen.Generate(prompt, p, o);
    ASSERT_TRUE(warm.ok()) << "request " << r << ": " << warm.status();
    if (r < 2) ExpectIdentical(*warm, Cold(prompt, p));
    ASSERT_TRUE(kv.cache->Validate().ok());
  }
  EXPECT_EQ(kv.cache->counts().in_use, 0);
}

INSTANTIATE_TEST_SUITE_P(Cases, PrefixReuseTest, ::testing::ValuesIn(ReuseCases()),
                         [](const ::testing::TestParamInfo<ReuseCase>& info) {
                           std::ostringstream os;
                           PrintTo(info.param, &os);
                           return os.str();
                         });

}  // namespace
}  // namespace kvrelay::model

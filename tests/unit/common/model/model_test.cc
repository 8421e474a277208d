// Forward-pass properties (DESIGN §6): cached decode == recompute, chunked prefill ==
// one-shot prefill, batched == alone — bit-identical with f32 KV — for every tiny
// model variant (GQA, MHA, tied, Llama-3 rope, qwen2 bias, GPT-2, bf16 weights).
#include "common/model/model.h"

#include <cmath>
#include <cstring>
#include <random>

#include "common/kvcache/block_allocator.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/ops.h"
#include "tests/testing/test_models.h"

namespace kvrelay::model {
namespace {

using kernels::DType;
using testing::LoadedModel;
using testing::ModelVariant;

std::vector<int32_t> RandomTokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

// A KV pool and the allocator of its block ids.
struct TestPool {
  std::unique_ptr<kvcache::KvPool> kv;
  kvcache::BlockAllocator alloc;
  const kernels::PagedKvView& view() const { return kv->view(); }
  const kernels::PagedKvLayout& layout() const { return kv->layout(); }
};

// A sequence with its own blocks in a pool, fed chunk by chunk.
class Seq {
 public:
  Seq(TestPool* pool, int64_t capacity_tokens, bool scatter = false) : pool_(pool) {
    auto b = pool->alloc.Allocate(kvcache::BlocksFor(capacity_tokens, pool->layout().block_size),
                                  -1, nullptr);
    EXPECT_TRUE(b.ok()) << b.status();
    blocks_ = *b;
    if (scatter) std::reverse(blocks_.begin(), blocks_.end());
  }
  ~Seq() { pool_->alloc.Release(blocks_); }
  SeqChunk Chunk(const std::vector<int32_t>& tokens, int64_t start, int64_t len,
                 bool logits = true) const {
    SeqChunk c;
    c.tokens = absl::MakeConstSpan(tokens.data() + start, len);
    c.start_pos = start;
    c.block_table = blocks_;
    c.want_logits = logits;
    return c;
  }
  const std::vector<int32_t>& blocks() const { return blocks_; }

 private:
  TestPool* pool_;
  std::vector<int32_t> blocks_;
};

std::unique_ptr<TestPool> MakePool(const Model& m, DType dt, int block_size, int blocks) {
  auto p = kvcache::KvPool::Create(m.KvLayout(dt, block_size), blocks);
  EXPECT_TRUE(p.ok()) << p.status();
  return std::unique_ptr<TestPool>(
      new TestPool{std::move(*p), *kvcache::BlockAllocator::Create(blocks)});
}

std::vector<float> Logits(const Model& m, TestPool* pool, const std::vector<SeqChunk>& batch) {
  std::vector<float> out;
  absl::Status s = m.Forward(batch, pool->view(), &out);
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

// Full recompute of tokens[0..n) in a fresh sequence; logits of the last token.
std::vector<float> Recompute(const Model& m, TestPool* pool, const std::vector<int32_t>& tokens,
                             int64_t n) {
  Seq s(pool, n);
  return Logits(m, pool, {s.Chunk(tokens, 0, n)});
}

bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

float MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  float d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::fabs(a[i] - b[i]));
  return d;
}

class ModelTest : public ::testing::TestWithParam<ModelVariant> {};

TEST_P(ModelTest, CachedDecodeIsBitIdenticalToRecompute) {
  const Model& m = LoadedModel(GetParam());
  for (int block_size : {1, 16}) {
    auto pool = MakePool(m, DType::kF32, block_size, 600);
    const int kPrompt = 13, kSteps = 20;
    std::vector<int32_t> tokens = RandomTokens(kPrompt + kSteps, m.config().vocab_size, 1);
    Seq seq(pool.get(), kPrompt + kSteps, /*scatter=*/true);
    std::vector<float> cached = Logits(m, pool.get(), {seq.Chunk(tokens, 0, kPrompt)});
    ASSERT_TRUE(BitEqual(cached, Recompute(m, pool.get(), tokens, kPrompt)));
    for (int step = 0; step < kSteps; ++step) {
      const int64_t pos = kPrompt + step;
      cached = Logits(m, pool.get(), {seq.Chunk(tokens, pos, 1)});
      std::vector<float> full = Recompute(m, pool.get(), tokens, pos + 1);
      ASSERT_TRUE(BitEqual(cached, full)) << "block_size " << block_size << " step " << step
                                          << " max diff " << MaxAbsDiff(cached, full);
    }
  }
}

TEST_P(ModelTest, ChunkedPrefillIsBitIdenticalToOneShot) {
  const Model& m = LoadedModel(GetParam());
  auto pool = MakePool(m, DType::kF32, 16, 200);
  const int n = 150;
  std::vector<int32_t> tokens = RandomTokens(n, m.config().vocab_size, 2);
  Seq one(pool.get(), n);
  std::vector<float> ref = Logits(m, pool.get(), {one.Chunk(tokens, 0, n)});
  for (int chunk : {1, 7, 16, 64}) {
    Seq seq(pool.get(), n);
    std::vector<float> got;
    for (int start = 0; start < n; start += chunk) {
      const int len = std::min(chunk, n - start);
      got = Logits(m, pool.get(), {seq.Chunk(tokens, start, len, start + len == n)});
    }
    ASSERT_TRUE(BitEqual(ref, got)) << "chunk " << chunk << " max diff " << MaxAbsDiff(ref, got);
    // The KV written is the same bytes too.
    const auto& L = pool->layout();
    for (size_t b = 0; b < one.blocks().size(); ++b) {
      const uint8_t* x = pool->view().base + L.block_bytes() * one.blocks()[b];
      const uint8_t* y = pool->view().base + L.block_bytes() * seq.blocks()[b];
      if (b + 1 < one.blocks().size()) {
        ASSERT_EQ(0, std::memcmp(x, y, L.block_bytes())) << "chunk " << chunk << " block " << b;
      }
    }
  }
}

TEST_P(ModelTest, BatchedIsBitIdenticalToAlone) {
  const Model& m = LoadedModel(GetParam());
  auto pool = MakePool(m, DType::kF32, 4, 400);
  const std::vector<int> lens = {5, 17, 1, 33, 9};
  const int kSteps = 6;
  std::vector<std::vector<int32_t>> toks;
  for (size_t i = 0; i < lens.size(); ++i)
    toks.push_back(RandomTokens(lens[i] + kSteps, m.config().vocab_size, 10 + i));

  // Alone: prefill, then decode step by step.
  std::vector<std::vector<std::vector<float>>> alone(lens.size());
  for (size_t i = 0; i < lens.size(); ++i) {
    Seq s(pool.get(), lens[i] + kSteps);
    alone[i].push_back(Logits(m, pool.get(), {s.Chunk(toks[i], 0, lens[i])}));
    for (int k = 0; k < kSteps; ++k)
      alone[i].push_back(Logits(m, pool.get(), {s.Chunk(toks[i], lens[i] + k, 1)}));
  }
  // Together: all prefills in one batch, then all decode steps batched; plus a mixed step
  // (sequence 0 decodes while sequence 1 is still prefilling its second half).
  std::vector<std::unique_ptr<Seq>> seqs;
  for (size_t i = 0; i < lens.size(); ++i)
    seqs.push_back(std::make_unique<Seq>(pool.get(), lens[i] + kSteps));
  std::vector<SeqChunk> batch;
  for (size_t i = 0; i < lens.size(); ++i) batch.push_back(seqs[i]->Chunk(toks[i], 0, lens[i]));
  std::vector<float> out = Logits(m, pool.get(), batch);
  const size_t V = m.config().vocab_size;
  for (size_t i = 0; i < lens.size(); ++i) {
    std::vector<float> row(out.begin() + i * V, out.begin() + (i + 1) * V);
    ASSERT_TRUE(BitEqual(row, alone[i][0])) << "prefill of sequence " << i;
  }
  for (int k = 0; k < kSteps; ++k) {
    batch.clear();
    for (size_t i = 0; i < lens.size(); ++i)
      batch.push_back(seqs[i]->Chunk(toks[i], lens[i] + k, 1));
    out = Logits(m, pool.get(), batch);
    for (size_t i = 0; i < lens.size(); ++i) {
      std::vector<float> row(out.begin() + i * V, out.begin() + (i + 1) * V);
      ASSERT_TRUE(BitEqual(row, alone[i][k + 1])) << "step " << k << " sequence " << i;
    }
  }
}

TEST_P(ModelTest, MixedPrefillAndDecodeBatch) {
  const Model& m = LoadedModel(GetParam());
  auto pool = MakePool(m, DType::kF32, 16, 100);
  std::vector<int32_t> a = RandomTokens(40, m.config().vocab_size, 3);
  std::vector<int32_t> b = RandomTokens(40, m.config().vocab_size, 4);
  std::vector<float> ref_a, ref_b;
  {
    Seq s(pool.get(), 40);
    ref_a = Logits(m, pool.get(), {s.Chunk(a, 0, 21)});
  }
  {
    Seq s(pool.get(), 40);
    ref_b = Logits(m, pool.get(), {s.Chunk(b, 0, 30)});
  }
  Seq sa(pool.get(), 40), sb(pool.get(), 40);
  Logits(m, pool.get(), {sa.Chunk(a, 0, 20), sb.Chunk(b, 0, 10, false)});
  std::vector<float> out = Logits(m, pool.get(), {sa.Chunk(a, 20, 1), sb.Chunk(b, 10, 20)});
  const size_t V = m.config().vocab_size;
  EXPECT_TRUE(BitEqual(std::vector<float>(out.begin(), out.begin() + V), ref_a));
  EXPECT_TRUE(BitEqual(std::vector<float>(out.begin() + V, out.end()), ref_b));
}

// f16 / bf16 / int8 KV: decode == recompute with the same KV dtype (attention always
// reads K/V from the cache), and close to the f32 KV result within a stated tolerance.
TEST_P(ModelTest, ReducedPrecisionKv) {
  const Model& m = LoadedModel(GetParam());
  struct Case {
    DType dt;
    float tol;  // max |logit difference| vs f32 KV, logits are O(1) for these models
  };
  for (const Case& c :
       {Case{DType::kF16, 2e-3f}, Case{DType::kBF16, 2e-2f}, Case{DType::kI8, 5e-2f}}) {
    auto pool = MakePool(m, c.dt, 16, 100);
    auto pool32 = MakePool(m, DType::kF32, 16, 100);
    const int kPrompt = 20, kSteps = 8;
    std::vector<int32_t> tokens = RandomTokens(kPrompt + kSteps, m.config().vocab_size, 5);
    Seq seq(pool.get(), kPrompt + kSteps);
    Logits(m, pool.get(), {seq.Chunk(tokens, 0, kPrompt)});
    for (int k = 0; k < kSteps; ++k) {
      std::vector<float> cached = Logits(m, pool.get(), {seq.Chunk(tokens, kPrompt + k, 1)});
      ASSERT_TRUE(BitEqual(cached, Recompute(m, pool.get(), tokens, kPrompt + k + 1)))
          << kernels::DTypeName(c.dt) << " step " << k;
      std::vector<float> f32 = Recompute(m, pool32.get(), tokens, kPrompt + k + 1);
      EXPECT_LT(MaxAbsDiff(cached, f32), c.tol) << kernels::DTypeName(c.dt) << " step " << k;
    }
  }
}

TEST_P(ModelTest, ScalarKernelsAgreeWithVectorised) {
  if (!kernels::IsaSupported(kernels::Isa::kAvx2)) GTEST_SKIP() << "CPU has no AVX2/FMA/F16C";
  const Model& m = LoadedModel(GetParam());
  auto pool = MakePool(m, DType::kF32, 16, 20);
  std::vector<int32_t> tokens = RandomTokens(50, m.config().vocab_size, 6);
  ASSERT_TRUE(kernels::SetActiveIsa(kernels::Isa::kScalar));
  std::vector<float> scalar = Recompute(m, pool.get(), tokens, 50);
  ASSERT_TRUE(kernels::SetActiveIsa(kernels::Isa::kAvx2));
  std::vector<float> avx2 = Recompute(m, pool.get(), tokens, 50);
  EXPECT_LT(MaxAbsDiff(scalar, avx2), 1e-4f);
  kernels::SetActiveIsa(kernels::DetectIsa());
}

TEST_P(ModelTest, RejectsBadInput) {
  const Model& m = LoadedModel(GetParam());
  auto pool = MakePool(m, DType::kF32, 16, 10);
  std::vector<float> out;
  std::vector<int32_t> bad = {1, m.config().vocab_size};
  Seq s(pool.get(), 16);
  absl::Status st = m.Forward({s.Chunk(bad, 0, 2)}, pool->view(), &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), ::testing::HasSubstr("token id"));
  std::vector<int32_t> ok(20, 1);
  st = m.Forward({s.Chunk(ok, 0, 20)}, pool->view(), &out);  // 16-token table
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), ::testing::HasSubstr("too few"));
  SeqChunk past = s.Chunk(ok, 0, 1);
  past.start_pos = m.config().max_position_embeddings;
  st = m.Forward({past}, pool->view(), &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), ::testing::HasSubstr("context length"));
  SeqChunk empty = s.Chunk(ok, 0, 0);
  st = m.Forward({empty}, pool->view(), &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), ::testing::HasSubstr("no tokens"));
  EXPECT_EQ(m.Forward({s.Chunk(ok, 0, 1)}, pool->view(), nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  auto other = kvcache::KvPool::Create(m.KvLayout(DType::kF32, 16), 2);
  ASSERT_TRUE(other.ok());
  kernels::PagedKvView wrong = (*other)->view();
  wrong.layout.num_layers += 1;
  st = m.Forward({s.Chunk(ok, 0, 1)}, wrong, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(out.empty());
}

INSTANTIATE_TEST_SUITE_P(Variants, ModelTest, ::testing::ValuesIn(testing::TinyVariants()),
                         [](const auto& info) { return info.param.name; });

TEST(RopeTest, Llama3ScalingMatchesReference) {
  ModelConfig c;
  c.head_dim = 64;
  c.rope_theta = 500000.0f;
  std::vector<float> plain = RopeInvFreq(c);
  c.rope_scaling.llama3 = true;
  c.rope_scaling.factor = 8;
  c.rope_scaling.low_freq_factor = 1;
  c.rope_scaling.high_freq_factor = 4;
  c.rope_scaling.original_max_position_embeddings = 8192;
  std::vector<float> scaled = RopeInvFreq(c);
  // Reference (transformers _compute_llama3_parameters) in double.
  for (int i = 0; i < 32; ++i) {
    const double inv = plain[i];
    const double wavelen = 2 * M_PI / inv;
    double want;
    if (wavelen < 8192.0 / 4) {
      want = inv;
    } else if (wavelen > 8192.0 / 1) {
      want = inv / 8;
    } else {
      const double smooth = (8192.0 / wavelen - 1) / (4 - 1);
      want = (1 - smooth) * inv / 8 + smooth * inv;
    }
    EXPECT_NEAR(scaled[i], want, 1e-6 * std::fabs(want) + 1e-12) << i;
  }
  EXPECT_EQ(scaled[0], plain[0]);                 // high frequency: unchanged
  EXPECT_NEAR(scaled[31], plain[31] / 8, 1e-12);  // low frequency: divided by factor
}

}  // namespace
}  // namespace kvrelay::model

// Tests for the Backend interface (kernels/backend.h): ParseDevice, Buffer ownership, and the CPU
// backend (kernels/cpu/cpu_backend.h), whose every op must be bit-identical to the kernels::* calls
// it wraps (kernels/ops.h) on every ISA this CPU has.
#include "kernels/backend.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "kernels/paged_kv.h"
#include "kernels/thread_pool.h"
#include "xxhash.h"

namespace kvrelay::kernels {

void PrintTo(Isa isa, std::ostream* os) { *os << IsaName(isa); }

namespace {

using ::testing::HasSubstr;

// ---------------------------------------------------------------------------- helpers

std::vector<float> RandVec(std::mt19937& rng, int64_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

// Random values stored as dtype t (f32, f16, bf16).
std::vector<uint8_t> RandStored(std::mt19937& rng, int64_t n, DType t) {
  const std::vector<float> v = RandVec(rng, n);
  std::vector<uint8_t> out(static_cast<size_t>(n) * DTypeSize(t));
  for (int64_t i = 0; i < n; ++i) {
    if (t == DType::kF32) {
      std::memcpy(&out[4 * i], &v[i], 4);
    } else {
      const uint16_t h = t == DType::kF16 ? F32ToF16(v[i]) : F32ToBf16(v[i]);
      std::memcpy(&out[2 * i], &h, 2);
    }
  }
  return out;
}

template <typename T>
bool BitEqual(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

ThreadPool* Pool() {
  static ThreadPool* pool = new ThreadPool(2);
  return pool;
}

// A KV pool in host memory, filled with 0xff (NaN for float dtypes) so reading an unwritten
// slot poisons a result.
struct HostPool {
  std::vector<uint8_t> mem;
  PagedKvView view;
  HostPool(const PagedKvLayout& L, int64_t blocks) : mem(L.block_bytes() * blocks, 0xff) {
    view.layout = L;
    view.base = mem.data();
    view.num_blocks = blocks;
  }
};

PagedKvLayout Layout(DType dt, int layers, int block_size, int kv_heads, int head_dim) {
  PagedKvLayout L;
  L.dtype = dt;
  L.num_layers = layers;
  L.block_size = block_size;
  L.num_kv_heads = kv_heads;
  L.head_dim = head_dim;
  return L;
}

std::vector<float> InvFreq(int head_dim) {
  std::vector<float> f(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) f[i] = 1.0f / std::pow(10000.0f, 2.0f * i / head_dim);
  return f;
}

// One token at position 0, in slot 0 of block 0, the only block of its sequence. The batch
// points into this object (tests change block / slot through it).
struct OneToken {
  int64_t pos[1] = {0};
  int32_t block[1] = {0};
  int32_t slot[1] = {0};
  int32_t starts[2] = {0, 1};

  TokenBatch Batch() const {
    TokenBatch tb;
    tb.num_tokens = 1;
    tb.positions = pos;
    tb.blocks = block;
    tb.slots = slot;
    tb.num_seqs = 1;
    tb.seq_starts = starts;
    tb.start_positions = pos;
    tb.block_tables = block;
    tb.max_blocks_per_seq = 1;
    return tb;
  }
};

// Sets the active ISA for a test and restores the previous one afterwards.
class CpuBackendTest : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (!IsaSupported(GetParam())) {
      GTEST_SKIP() << "ISA " << IsaName(GetParam()) << " is not supported by this CPU/build";
    }
    prev_ = ActiveKernels().isa;
    ASSERT_TRUE(SetActiveIsa(GetParam()));
    restore_ = true;
  }
  void TearDown() override {
    if (restore_) SetActiveIsa(prev_);
  }

  CpuBackend be_{Pool()};
  std::mt19937 rng_{12345};

 private:
  Isa prev_ = Isa::kScalar;
  bool restore_ = false;
};

std::string IsaParamName(const ::testing::TestParamInfo<Isa>& info) { return IsaName(info.param); }

// ---------------------------------------------------------------------------- device, factory

TEST(ParseDeviceTest, NamesRoundTrip) {
  for (Device d : {Device::kCpu, Device::kCuda}) {
    absl::StatusOr<Device> p = ParseDevice(DeviceName(d));
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(*p, d);
  }
  EXPECT_STREQ(DeviceName(Device::kCpu), "cpu");
  EXPECT_STREQ(DeviceName(Device::kCuda), "cuda");
}

TEST(ParseDeviceTest, RejectsOtherNamesNamingThem) {
  for (const char* bad : {"", "gpu", "CPU", "cuda0", "cpu "}) {
    absl::StatusOr<Device> p = ParseDevice(bad);
    ASSERT_FALSE(p.ok()) << bad;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(p.status().message(), HasSubstr(std::string("'") + bad + "'"));
  }
}

TEST(PagedKvViewTest, MemoryIsHostByDefault) {
  PagedKvView v;
  EXPECT_EQ(v.memory, MemoryKind::kHost);
  EXPECT_STREQ(MemoryKindName(MemoryKind::kHost), "host");
  EXPECT_STREQ(MemoryKindName(MemoryKind::kCuda), "cuda");
}

// ---------------------------------------------------------------------------- memory

TEST(CpuBackendMemoryTest, UploadDownloadRoundTrip) {
  CpuBackend be(nullptr);
  std::mt19937 rng(1);
  for (size_t bytes : {size_t{1}, size_t{63}, size_t{64}, size_t{4096}, size_t{100003}}) {
    absl::StatusOr<Buffer> buf = be.Allocate(bytes);
    ASSERT_TRUE(buf.ok()) << buf.status();
    EXPECT_TRUE(buf->owned());
    EXPECT_EQ(buf->bytes(), bytes);
    ASSERT_NE(buf->data(), nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(buf->data()) % 64, 0u);
    std::vector<uint8_t> in(bytes), out(bytes, 0);
    for (auto& b : in) b = static_cast<uint8_t>(rng());
    ASSERT_TRUE(be.Upload(in.data(), bytes, buf->data()).ok());
    ASSERT_TRUE(be.Synchronize().ok());
    ASSERT_TRUE(be.Download(buf->data(), bytes, out.data()).ok());
    EXPECT_EQ(in, out);
  }
}

TEST(CpuBackendMemoryTest, ZeroAndBlockChecksums) {
  CpuBackend be(nullptr);
  const uint64_t block_bytes = 100;
  std::vector<uint8_t> pool(6 * block_bytes);
  for (size_t i = 0; i < pool.size(); ++i) pool[i] = static_cast<uint8_t>(i % 255 + 1);  // never 0
  const std::vector<int32_t> blocks = {5, 0, 3, 3};
  std::vector<uint64_t> got(blocks.size());
  ASSERT_TRUE(be.BlockChecksums(pool.data(), 6, block_bytes, blocks, got.data()).ok());
  for (size_t i = 0; i < blocks.size(); ++i) {
    EXPECT_EQ(got[i], XXH3_64bits(pool.data() + blocks[i] * block_bytes, block_bytes)) << i;
  }
  const int32_t outside[] = {6};
  absl::Status s = be.BlockChecksums(pool.data(), 6, block_bytes, outside, got.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("block 6"));
  EXPECT_TRUE(be.BlockChecksums(nullptr, 6, block_bytes, {}, nullptr).ok());

  ASSERT_TRUE(be.Zero(pool.data() + 7, 150).ok());
  for (size_t i = 0; i < pool.size(); ++i) {
    EXPECT_EQ(pool[i] == 0, i >= 7 && i < 157) << i;
  }
  EXPECT_TRUE(be.Zero(nullptr, 0).ok());
  EXPECT_EQ(be.Zero(nullptr, 4).code(), absl::StatusCode::kInvalidArgument);
}

TEST(CpuBackendMemoryTest, EmptyAndInvalid) {
  CpuBackend be(nullptr);
  absl::StatusOr<Buffer> empty = be.Allocate(0);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->data(), nullptr);
  EXPECT_EQ(empty->bytes(), 0u);
  EXPECT_TRUE(be.Upload(nullptr, 0, nullptr).ok());
  EXPECT_TRUE(be.Download(nullptr, 0, nullptr).ok());
  int x = 0;
  EXPECT_EQ(be.Upload(nullptr, 4, &x).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be.Download(&x, 4, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be.UploadConstant(nullptr, 4).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CpuBackendMemoryTest, ConstantsAreTheHostMemoryItself) {
  CpuBackend be(nullptr);
  std::vector<float> weights(1000, 1.5f);
  absl::StatusOr<Buffer> c = be.UploadConstant(weights.data(), weights.size() * sizeof(float));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->data(), weights.data());  // no copy
  EXPECT_EQ(c->bytes(), weights.size() * sizeof(float));
  EXPECT_FALSE(c->owned());
  c->Reset();  // a view frees nothing
  EXPECT_EQ(c->data(), nullptr);
  EXPECT_EQ(weights[999], 1.5f);
}

TEST(CpuBackendMemoryTest, BufferMovesOwnership) {
  CpuBackend be(nullptr);
  absl::StatusOr<Buffer> a = be.Allocate(128);
  ASSERT_TRUE(a.ok());
  void* p = a->data();
  Buffer b = std::move(*a);
  EXPECT_EQ(b.data(), p);
  EXPECT_TRUE(b.owned());
  EXPECT_EQ(a->data(), nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty
  EXPECT_FALSE(a->owned());
  Buffer c;
  c = std::move(b);
  EXPECT_EQ(c.data(), p);
  EXPECT_EQ(c.as<float>(), static_cast<float*>(p));
  c.Reset();
  EXPECT_EQ(c.bytes(), 0u);
}

// ---------------------------------------------------------------------------- ops == kernels::*

TEST_P(CpuBackendTest, EmbeddingGatherMatchesKernel) {
  for (DType et : {DType::kF32, DType::kF16, DType::kBF16}) {
    const int64_t vocab = 50, dim = 37, n = 9;
    const std::vector<uint8_t> table = RandStored(rng_, vocab * dim, et);
    std::vector<int32_t> ids(n);
    for (auto& id : ids) id = static_cast<int32_t>(rng_() % vocab);
    std::vector<float> want(n * dim), got(n * dim, -1.0f);
    EmbeddingGather(ids.data(), n, table.data(), et, dim, want.data());
    ASSERT_TRUE(be_.EmbeddingGather(ids.data(), n, table.data(), et, vocab, dim, got.data()).ok());
    EXPECT_TRUE(BitEqual(want, got)) << DTypeName(et);
  }
}

TEST_P(CpuBackendTest, AddPositionEmbeddingMatchesKernel) {
  const int64_t max_pos = 40, dim = 24, n = 7;
  const std::vector<float> table = RandVec(rng_, max_pos * dim);
  const std::vector<int64_t> pos = {0, 5, 6, 39, 12, 12, 1};
  std::vector<float> want = RandVec(rng_, n * dim), got = want;
  for (int64_t t = 0; t < n; ++t) AddInPlace(&want[t * dim], &table[pos[t] * dim], dim);
  ASSERT_TRUE(be_.AddPositionEmbedding(table.data(), max_pos, pos.data(), n, dim, got.data()).ok());
  EXPECT_TRUE(BitEqual(want, got));
}

TEST_P(CpuBackendTest, NormsMatchKernels) {
  const int64_t rows = 5, dim = 67;
  const std::vector<float> x = RandVec(rng_, rows * dim, -3, 3), w = RandVec(rng_, dim),
                           b = RandVec(rng_, dim);
  std::vector<float> want(rows * dim), got(rows * dim);
  RmsNorm(x.data(), w.data(), rows, dim, 1e-5f, want.data());
  ASSERT_TRUE(be_.RmsNorm(x.data(), w.data(), rows, dim, 1e-5f, got.data()).ok());
  EXPECT_TRUE(BitEqual(want, got));
  LayerNorm(x.data(), w.data(), b.data(), rows, dim, 1e-5f, want.data());
  ASSERT_TRUE(be_.LayerNorm(x.data(), w.data(), b.data(), rows, dim, 1e-5f, got.data()).ok());
  EXPECT_TRUE(BitEqual(want, got));
}

TEST_P(CpuBackendTest, LinearMatchesMatMul) {
  for (DType wt : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (bool with_bias : {false, true}) {
      const int64_t rows = 6, in = 75, out = 130;
      const std::vector<float> x = RandVec(rng_, rows * in), bias = RandVec(rng_, out);
      const std::vector<uint8_t> w = RandStored(rng_, out * in, wt);
      const float* bp = with_bias ? bias.data() : nullptr;
      std::vector<float> want(rows * out), got(rows * out);
      MatMul(Pool(), x.data(), rows, in, w.data(), wt, out, bp, want.data());
      ASSERT_TRUE(be_.Linear(x.data(), rows, in, w.data(), wt, out, bp, got.data()).ok());
      EXPECT_TRUE(BitEqual(want, got)) << DTypeName(wt) << " bias " << with_bias;
    }
  }
}

TEST_P(CpuBackendTest, ActivationsAndResidualMatchKernels) {
  const int64_t rows = 4, inter = 53;
  const std::vector<float> gu = RandVec(rng_, rows * 2 * inter, -6, 6);
  std::vector<float> want(rows * inter), got(rows * inter);
  SiluMul(gu.data(), rows, inter, want.data());
  ASSERT_TRUE(be_.SiluMul(gu.data(), rows, inter, got.data()).ok());
  EXPECT_TRUE(BitEqual(want, got));

  std::vector<float> a = RandVec(rng_, 301, -6, 6), b = a;
  GeluTanh(a.data(), 301);
  ASSERT_TRUE(be_.GeluTanh(b.data(), 301).ok());
  EXPECT_TRUE(BitEqual(a, b));
  GeluErf(a.data(), 301);
  ASSERT_TRUE(be_.GeluErf(b.data(), 301).ok());
  EXPECT_TRUE(BitEqual(a, b));

  const std::vector<float> y = RandVec(rng_, 301);
  AddInPlace(a.data(), y.data(), 301);
  ASSERT_TRUE(be_.AddInPlace(b.data(), y.data(), 301).ok());
  EXPECT_TRUE(BitEqual(a, b));
}

TEST_P(CpuBackendTest, GatherRowsCopiesRows) {
  const int64_t dim = 19;
  const std::vector<float> x = RandVec(rng_, 10 * dim);
  const std::vector<int64_t> rows = {9, 0, 4, 4};
  std::vector<float> got(rows.size() * dim);
  ASSERT_TRUE(be_.GatherRows(x.data(), 10, dim, rows.data(), 4, got.data()).ok());
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(std::memcmp(&got[i * dim], &x[rows[i] * dim], sizeof(float) * dim), 0) << i;
  }
}

// RopeAndWriteKv == for each token: Rope(q), Rope(k), copy q, WriteKv(k, v) — the per-token
// calls the forward pass made before — for every KV dtype, with and without rotation.
TEST_P(CpuBackendTest, RopeAndWriteKvMatchesPerTokenKernels) {
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8}) {
    for (bool rope : {true, false}) {
      const int nh = 6, nkv = 2, hd = 16, layers = 2, bs = 4;
      const int64_t n = 11, blocks = 8;
      const PagedKvLayout L = Layout(dt, layers, bs, nkv, hd);
      HostPool want_pool(L, blocks), got_pool(L, blocks);
      const std::vector<float> inv = InvFreq(hd);
      const int64_t qkv_dim = (nh + 2 * nkv) * hd;
      const std::vector<float> qkv = RandVec(rng_, n * qkv_dim, -2, 2);
      std::vector<int64_t> pos(n);
      std::vector<int32_t> blk(n), slot(n);
      for (int64_t t = 0; t < n; ++t) {
        pos[t] = 3 + 5 * t;
        blk[t] = static_cast<int32_t>((7 * t + 1) % blocks);
        slot[t] = static_cast<int32_t>(t % bs);
      }
      std::vector<float> want_q(n * nh * hd), got_q(n * nh * hd);
      std::vector<float> work = qkv;
      for (int64_t t = 0; t < n; ++t) {
        float* qr = &work[t * qkv_dim];
        float* kr = qr + nh * hd;
        float* vr = kr + nkv * hd;
        if (rope) {
          Rope(qr, nh, hd, pos[t], inv.data());
          Rope(kr, nkv, hd, pos[t], inv.data());
        }
        std::memcpy(&want_q[t * nh * hd], qr, sizeof(float) * nh * hd);
        WriteKv(want_pool.view, blk[t], slot[t], 1, kr, vr);
      }
      std::vector<float> qkv2 = qkv;
      TokenBatch tb;
      tb.num_tokens = n;
      tb.positions = pos.data();
      tb.blocks = blk.data();
      tb.slots = slot.data();
      ASSERT_TRUE(be_.RopeAndWriteKv(got_pool.view, 1, tb, qkv2.data(), nh,
                                     rope ? inv.data() : nullptr, got_q.data())
                      .ok());
      EXPECT_TRUE(BitEqual(want_q, got_q)) << DTypeName(dt) << " rope " << rope;
      EXPECT_TRUE(BitEqual(want_pool.mem, got_pool.mem)) << DTypeName(dt) << " rope " << rope;
    }
  }
}

// PagedAttention over a TokenBatch (per-sequence rows of a padded block-table matrix) ==
// kernels::PagedAttention over per-token table pointers, for a batch mixing a prefill chunk
// and decode tokens, with and without a thread pool.
TEST_P(CpuBackendTest, PagedAttentionMatchesKernel) {
  for (DType dt : {DType::kF32, DType::kBF16, DType::kI8}) {
    const int nh = 8, nkv = 2, hd = 32, layers = 2, bs = 4;
    const int64_t blocks = 24;
    const PagedKvLayout L = Layout(dt, layers, bs, nkv, hd);
    HostPool pool(L, blocks);
    // Fill every slot of every block with random K/V.
    for (int64_t b = 0; b < blocks; ++b)
      for (int s = 0; s < bs; ++s)
        for (int layer = 0; layer < layers; ++layer) {
          const std::vector<float> k = RandVec(rng_, nkv * hd), v = RandVec(rng_, nkv * hd);
          WriteKv(pool.view, b, s, layer, k.data(), v.data());
        }
    // Three sequences: a 6-token chunk at positions 10..15 (table A), then one decode
    // token each for tables B (position 20) and C (position 3).
    const std::vector<std::vector<int32_t>> seq_tables = {{5, 1, 9, 13}, {2, 3, 4, 0, 7, 8}, {11}};
    const std::vector<int64_t> starts = {10, 20, 3};
    const std::vector<int64_t> lens = {6, 1, 1};
    const int64_t max_blocks = 6;
    std::vector<int32_t> padded(3 * max_blocks, -1), seq_starts = {0};
    std::vector<int64_t> pos;
    std::vector<const int32_t*> ptrs;
    for (int s = 0; s < 3; ++s) {
      std::copy(seq_tables[s].begin(), seq_tables[s].end(), padded.begin() + s * max_blocks);
      for (int64_t i = 0; i < lens[s]; ++i) {
        pos.push_back(starts[s] + i);
        ptrs.push_back(seq_tables[s].data());
      }
      seq_starts.push_back(static_cast<int32_t>(pos.size()));
    }
    const int64_t n = static_cast<int64_t>(pos.size());
    TokenBatch tb;
    tb.num_tokens = n;
    tb.positions = pos.data();
    tb.num_seqs = 3;
    tb.seq_starts = seq_starts.data();
    tb.start_positions = starts.data();
    tb.block_tables = padded.data();
    tb.max_blocks_per_seq = max_blocks;
    tb.max_query_len = 6;
    tb.max_context = 21;
    const std::vector<float> q = RandVec(rng_, n * nh * hd);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    std::vector<float> want(n * nh * hd), got(n * nh * hd), got1(n * nh * hd);
    PagedAttention(Pool(), pool.view, 1, q.data(), n, ptrs.data(), pos.data(), nh, scale,
                   want.data());
    ASSERT_TRUE(be_.PagedAttention(pool.view, 1, tb, q.data(), nh, scale, got.data()).ok());
    EXPECT_TRUE(BitEqual(want, got)) << DTypeName(dt);
    CpuBackend single(nullptr);
    ASSERT_TRUE(single.PagedAttention(pool.view, 1, tb, q.data(), nh, scale, got1.data()).ok());
    EXPECT_TRUE(BitEqual(want, got1)) << DTypeName(dt);
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, CpuBackendTest, ::testing::Values(Isa::kScalar, Isa::kAvx2),
                         IsaParamName);

// ---------------------------------------------------------------------------- bad arguments

TEST(CpuBackendArgsTest, EmptyOpsAreNoOps) {
  CpuBackend be(nullptr);
  PagedKvView kv;
  EXPECT_TRUE(be.EmbeddingGather(nullptr, 0, nullptr, DType::kF32, 10, 4, nullptr).ok());
  EXPECT_TRUE(be.AddPositionEmbedding(nullptr, 10, nullptr, 0, 4, nullptr).ok());
  EXPECT_TRUE(be.RmsNorm(nullptr, nullptr, 0, 4, 1e-5f, nullptr).ok());
  EXPECT_TRUE(be.LayerNorm(nullptr, nullptr, nullptr, 0, 4, 1e-5f, nullptr).ok());
  EXPECT_TRUE(be.Linear(nullptr, 0, 4, nullptr, DType::kF32, 4, nullptr, nullptr).ok());
  const TokenBatch none;
  EXPECT_TRUE(be.RopeAndWriteKv(kv, 0, none, nullptr, 1, nullptr, nullptr).ok());
  EXPECT_TRUE(be.PagedAttention(kv, 0, none, nullptr, 1, 1.0f, nullptr).ok());
  EXPECT_TRUE(be.SiluMul(nullptr, 0, 4, nullptr).ok());
  EXPECT_TRUE(be.GeluTanh(nullptr, 0).ok());
  EXPECT_TRUE(be.GeluErf(nullptr, 0).ok());
  EXPECT_TRUE(be.AddInPlace(nullptr, nullptr, 0).ok());
  EXPECT_TRUE(be.GatherRows(nullptr, 10, 4, nullptr, 0, nullptr).ok());
}

TEST(CpuBackendArgsTest, RejectsBadArguments) {
  CpuBackend be(nullptr);
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  std::vector<float> buf(64);
  float* f = buf.data();
  EXPECT_EQ(be.RmsNorm(f, f, -1, 4, 1e-5f, f).code(), kInvalid);
  EXPECT_EQ(be.RmsNorm(nullptr, f, 1, 4, 1e-5f, f).code(), kInvalid);
  EXPECT_EQ(be.Linear(f, 1, 4, nullptr, DType::kF32, 4, nullptr, f).code(), kInvalid);
  EXPECT_EQ(be.Linear(f, 1, 4, f, DType::kI8, 4, nullptr, f).code(), kInvalid);
  EXPECT_EQ(be.GeluTanh(f, -3).code(), kInvalid);
  EXPECT_EQ(be.AddInPlace(f, nullptr, 4).code(), kInvalid);

  const int32_t bad_id[] = {3, 10};
  absl::Status s = be.EmbeddingGather(bad_id, 2, f, DType::kF32, 10, 4, f);
  EXPECT_EQ(s.code(), kInvalid);
  EXPECT_THAT(s.message(), HasSubstr("id 10"));
  EXPECT_EQ(be.EmbeddingGather(bad_id, 1, f, DType::kI8, 10, 4, f).code(), kInvalid);
  const int64_t bad_pos[] = {1, 8};
  s = be.AddPositionEmbedding(f, 8, bad_pos, 2, 4, f);
  EXPECT_EQ(s.code(), kInvalid);
  EXPECT_THAT(s.message(), HasSubstr("position 8"));
  s = be.GatherRows(f, 8, 4, bad_pos, 2, f + 32);
  EXPECT_EQ(s.code(), kInvalid);
  EXPECT_THAT(s.message(), HasSubstr("row 8"));

  const PagedKvLayout L = Layout(DType::kF32, 2, 4, 1, 2);
  HostPool pool(L, 3);
  std::vector<float> qkv(3 * 2), q(2);
  OneToken one;
  const TokenBatch tb = one.Batch();
  ASSERT_TRUE(be.RopeAndWriteKv(pool.view, 0, tb, qkv.data(), 1, nullptr, q.data()).ok());
  one.block[0] = 3;
  s = be.RopeAndWriteKv(pool.view, 0, tb, qkv.data(), 1, nullptr, q.data());
  EXPECT_EQ(s.code(), kInvalid);
  EXPECT_THAT(s.message(), HasSubstr("block 3"));
  one.block[0] = 0;
  one.slot[0] = 4;
  s = be.RopeAndWriteKv(pool.view, 0, tb, qkv.data(), 1, nullptr, q.data());
  EXPECT_EQ(s.code(), kInvalid);
  EXPECT_THAT(s.message(), HasSubstr("slot 4"));
  one.slot[0] = 0;
  s = be.RopeAndWriteKv(pool.view, 2, tb, qkv.data(), 1, nullptr, q.data());
  EXPECT_EQ(s.code(), kInvalid);
  EXPECT_THAT(s.message(), HasSubstr("layer 2"));
  ASSERT_TRUE(be.PagedAttention(pool.view, 0, tb, q.data(), 1, 1.0f, q.data()).ok());
  // A position past the block table.
  const int64_t far[] = {4};
  TokenBatch past = tb;
  past.positions = far;
  s = be.PagedAttention(pool.view, 0, past, q.data(), 1, 1.0f, q.data());
  EXPECT_EQ(s.code(), kInvalid);
  EXPECT_THAT(s.message(), HasSubstr("position 4"));
  // Sequences not covering the tokens.
  const int32_t short_starts[] = {0, 0};
  TokenBatch uncovered = tb;
  uncovered.seq_starts = short_starts;
  EXPECT_EQ(be.PagedAttention(pool.view, 0, uncovered, q.data(), 1, 1.0f, q.data()).code(),
            kInvalid);
  // 3 query heads do not group over 2 kv heads.
  const PagedKvLayout L2 = Layout(DType::kF32, 1, 4, 2, 2);
  HostPool pool2(L2, 1);
  s = be.PagedAttention(pool2.view, 0, tb, f, 3, 1.0f, f);
  EXPECT_EQ(s.code(), kInvalid);
}

TEST(CpuBackendArgsTest, PoolMustBeHostMemory) {
  CpuBackend be(nullptr);
  const PagedKvLayout L = Layout(DType::kF32, 1, 4, 1, 2);
  HostPool pool(L, 1);
  pool.view.memory = MemoryKind::kCuda;
  std::vector<float> qkv(3 * 2), q(2);
  const OneToken one;
  const TokenBatch tb = one.Batch();
  absl::Status s = be.RopeAndWriteKv(pool.view, 0, tb, qkv.data(), 1, nullptr, q.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("cuda"));
  s = be.PagedAttention(pool.view, 0, tb, q.data(), 1, 1.0f, q.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace kvrelay::kernels

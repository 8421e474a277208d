#include "prefill_worker/prefill_engine.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <string>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/kvcache/block_hash.h"
#include "common/model/generator.h"
#include "common/transfer/checksum.h"
#include "common/transfer/local/local_transport.h"
#include "common/worker/kv_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "tests/testing/metric_values.h"
#include "tests/testing/test_models.h"

namespace kvrelay::prefill {
namespace {

using ::testing::HasSubstr;

constexpr int kBlock = 16;

const model::Model& M() { return testing::LoadedModel(testing::TinyVariants()[0]); }

std::vector<int32_t> Prompt(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> p(n);
  for (auto& t : p) t = static_cast<int32_t>(rng() % 400);
  return p;
}

// A prefill engine on its own transport and pool, and a "decode worker" pool on another.
struct Rig {
  std::unique_ptr<transfer::KvTransport> p_transport = transfer::NewLocalTransport();
  std::unique_ptr<transfer::KvTransport> d_transport = transfer::NewLocalTransport();
  worker::KvStore p_kv, d_kv;
  std::unique_ptr<PrefillEngine> engine;

  explicit Rig(int d_block = kBlock, PrefillEngineOptions o = {}) {
    worker::KvStoreOptions ko;
    ko.kv_blocks = 64;
    ko.block_size = kBlock;
    p_kv = std::move(*worker::CreateKvStore(*p_transport, M(), ko));
    ko.block_size = d_block;
    d_kv = std::move(*worker::CreateKvStore(*d_transport, M(), ko));
    if (o.prefill_chunk == 256) o.prefill_chunk = 20;  // several chunks per prompt
    engine = std::make_unique<PrefillEngine>(&M(), p_kv.pool.get(), p_kv.memory.get(),
                                             p_kv.cache.get(), p_transport.get(), "tiny", o);
  }
  ~Rig() { engine.reset(); }

  PrefillJob Job(const std::vector<int32_t>& prompt, int64_t first_block,
                 std::vector<int32_t> dst) {
    PrefillJob j;
    j.id = "job";
    j.prompt = prompt;
    j.params.max_tokens = 1;
    j.destination = d_kv.memory->descriptor();
    j.first_block = first_block;
    j.destination_blocks = std::move(dst);
    j.model_id = "tiny";
    j.block_size = kBlock;
    j.kv_dtype = "f32";
    return j;
  }

  absl::StatusOr<PrefillOutcome> Run(PrefillJob job) {
    absl::Notification done;
    absl::StatusOr<PrefillOutcome> out = absl::UnknownError("not run");
    auto h = engine->Submit(std::move(job), [&](absl::StatusOr<PrefillOutcome> r) {
      out = std::move(r);
      done.Notify();
    });
    if (!h.ok()) return h.status();
    done.WaitForNotification();
    return out;
  }

  const uint8_t* DBlock(int32_t b) const {
    return d_kv.memory->data() + static_cast<size_t>(b) * d_kv.pool->layout().block_bytes();
  }
};

using ::kvrelay::testing::Metric;

// The prompt's KV and last-token logits computed in a fresh pool, blocks 0, 1, ...
struct Reference {
  std::unique_ptr<kvcache::KvPool> pool;
  std::vector<float> logits;
};

Reference ComputeReference(const std::vector<int32_t>& prompt) {
  Reference r;
  const int64_t nblocks = kvcache::BlocksFor(static_cast<int64_t>(prompt.size()), kBlock);
  r.pool = std::move(*kvcache::KvPool::Create(M().KvLayout(kernels::DType::kF32, kBlock), nblocks));
  std::vector<int32_t> table(nblocks);
  std::iota(table.begin(), table.end(), 0);
  model::SeqChunk c;
  c.tokens = prompt;
  c.block_table = table;
  EXPECT_TRUE(M().Forward({c}, r.pool->view(), &r.logits).ok());
  return r;
}

TEST(PrefillEngineTest, PushesExactKvAndTheFirstToken) {
  PrefillEngineOptions o;
  o.metrics = std::make_shared<prometheus::Registry>();
  const prometheus::Registry& reg = *o.metrics;
  Rig s(kBlock, o);
  EXPECT_EQ(s.engine->metrics(), o.metrics);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_blocks", {{"state", "free"}}), 64);
  const auto prompt = Prompt(50, 1);  // blocks of 16, 16, 16 and 2 tokens
  const std::vector<int32_t> dst = {10, 11, 12, 30};
  auto out = s.Run(s.Job(prompt, 0, dst));
  ASSERT_TRUE(out.ok()) << out.status();
  const uint64_t bb = s.d_kv.pool->layout().block_bytes();
  // The checksums match what landed, and what landed is the KV of a local computation.
  EXPECT_TRUE(transfer::VerifyBlockChecksums(s.d_kv.memory->data(), bb, dst, out->checksums).ok());
  const Reference ref = ComputeReference(prompt);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(std::memcmp(s.DBlock(dst[i]), ref.pool->view().base + i * bb, bb), 0)
        << "block " << i;
  }
  const int32_t argmax = static_cast<int32_t>(
      std::max_element(ref.logits.begin(), ref.logits.end()) - ref.logits.begin());
  EXPECT_EQ(out->first.token, argmax);
  EXPECT_EQ(out->cached_tokens, 0);
  EXPECT_EQ(out->computed_tokens, 50);
  EXPECT_EQ(out->transfer_bytes, 4 * bb);
  EXPECT_EQ(out->transport, "memcpy");
  EXPECT_EQ(s.p_kv.cache->counts().in_use, 0);  // P keeps nothing but its cache

  // Again: P reuses its 3 cached full blocks, computes 2 tokens, and sends the same bytes.
  std::memset(s.d_kv.memory->data(), 0, s.d_kv.memory->size());
  auto again = s.Run(s.Job(prompt, 0, dst));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->cached_tokens, 48);
  EXPECT_EQ(again->computed_tokens, 2);
  EXPECT_EQ(again->checksums, out->checksums);
  EXPECT_EQ(again->first.token, out->first.token);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(std::memcmp(s.DBlock(dst[i]), ref.pool->view().base + i * bb, bb), 0)
        << "block " << i;
  }

  // The metrics (DESIGN §7) saw both jobs: tokens computed and reused, the bytes, puts
  // and time of each transfer by transport, each job's duration, and the pool by state.
  EXPECT_EQ(Metric(reg, "kvrelay_prefill_computed_tokens_total"), 52);
  EXPECT_EQ(Metric(reg, "kvrelay_prefill_cached_tokens_total"), 48);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_bytes_total", {{"transport", "memcpy"}}),
            static_cast<double>(8 * bb));
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_bytes_total"), static_cast<double>(8 * bb));
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_puts_total", {{"transport", "memcpy"}}),
            static_cast<double>(out->puts + again->puts));
  EXPECT_GT(out->puts, 0);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_seconds", {{"transport", "memcpy"}}), 2);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_failures_total"), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_prefill_seconds"), 2);
  EXPECT_EQ(Metric(reg, "kvrelay_prefill_queue_depth"), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_blocks", {{"state", "in_use"}}), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_blocks", {{"state", "cached_free"}}), 3);  // full blocks only
  EXPECT_EQ(Metric(reg, "kvrelay_kv_blocks"), 64);
}

TEST(PrefillEngineTest, SendsOnlyTheBlocksTheDecodeWorkerLacks) {
  Rig s;
  const auto prompt = Prompt(40, 2);  // 3 blocks
  auto out = s.Run(s.Job(prompt, 2, {7}));
  ASSERT_TRUE(out.ok()) << out.status();
  const uint64_t bb = s.d_kv.pool->layout().block_bytes();
  EXPECT_EQ(out->transfer_bytes, bb);
  ASSERT_EQ(out->checksums.size(), 1u);
  const Reference ref = ComputeReference(prompt);
  EXPECT_EQ(std::memcmp(s.DBlock(7), ref.pool->view().base + 2 * bb, bb), 0);
}

TEST(PrefillEngineTest, BadJobsAreInvalidArgumentNamingWhatIsWrong) {
  Rig s(/*d_block=*/8);  // the destination's blocks are half the size
  const auto prompt = Prompt(20, 3);
  auto st = s.Run(s.Job(prompt, 0, {1, 2})).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("destination.block_bytes"));

  Rig ok;
  struct Case {
    int64_t first;
    std::vector<int32_t> dst;
    std::string want;
  };
  for (const Case& c : std::vector<Case>{
           {0, {1}, "destination_blocks has 1 entries; the prompt needs 2"},
           {0, {1, 1}, "repeats an earlier block"},
           {0, {1, 64}, "outside the destination pool of 64 blocks"},
           {0, {-1, 2}, "destination_blocks[0] = -1"},
           {2, {}, "first_block must be in [0, 2)"},
           {-1, {1, 2, 3}, "first_block"},
       }) {
    st = ok.Run(ok.Job(prompt, c.first, c.dst)).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << c.want;
    EXPECT_THAT(st.message(), HasSubstr(c.want));
  }
  PrefillJob j = ok.Job({}, 0, {});
  EXPECT_THAT(ok.Run(j).status().message(), HasSubstr("prompt is empty"));
  j = ok.Job(prompt, 0, {1, 2});
  j.params.top_p = 2;
  EXPECT_THAT(ok.Run(j).status().message(), HasSubstr("top_p"));
  EXPECT_EQ(ok.p_kv.cache->counts().in_use, 0);
}

TEST(PrefillEngineTest, KvOfAnotherModelOrLayoutIsRefused) {
  Rig s;
  const auto prompt = Prompt(20, 3);
  PrefillJob j = s.Job(prompt, 0, {1, 2});
  j.model_id = "another-model";
  EXPECT_EQ(s.Run(j).status().code(), absl::StatusCode::kFailedPrecondition);
  // Same block bytes, other layout: 32-token f16 blocks are as large as 16-token f32 ones.
  j = s.Job(prompt, 0, {1, 2});
  j.block_size = 32;
  j.kv_dtype = "f16";
  const absl::Status st = s.Run(j).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("block size 32, f16"));
}

TEST(PrefillEngineTest, CancelEndsRunningAndQueuedJobs) {
  PrefillEngineOptions o;
  o.prefill_chunk = 1;            // 480 forward passes: still running when cancelled
  o.transfer.chunk_bytes = 4096;  // and many small writes
  Rig s(kBlock, o);
  absl::Notification first_done, second_done;
  absl::Status first_status, second_status;
  std::vector<int32_t> dst(30);
  std::iota(dst.begin(), dst.end(), 0);
  auto h1 = s.engine->Submit(s.Job(Prompt(480, 4), 0, dst), [&](absl::StatusOr<PrefillOutcome> r) {
    first_status = r.status();
    first_done.Notify();
  });
  ASSERT_TRUE(h1.ok());
  auto h2 =
      s.engine->Submit(s.Job(Prompt(20, 5), 0, {40, 41}), [&](absl::StatusOr<PrefillOutcome> r) {
        second_status = r.status();
        second_done.Notify();
      });
  ASSERT_TRUE(h2.ok());
  const prometheus::Registry& reg = *s.engine->metrics();
  for (int i = 0; i < 10000 && s.engine->load().running == 0; ++i)
    absl::SleepFor(absl::Milliseconds(1));
  EXPECT_EQ(s.engine->queued(), 1);
  EXPECT_EQ(Metric(reg, "kvrelay_prefill_queue_depth"), 1);
  s.engine->Cancel(*h2);  // queued behind the long first job
  second_done.WaitForNotification();
  EXPECT_EQ(Metric(reg, "kvrelay_prefill_queue_depth"), 0);
  EXPECT_EQ(second_status.code(), absl::StatusCode::kCancelled) << second_status;
  EXPECT_THAT(second_status.message(), HasSubstr("before it started"));
  s.engine->Cancel(*h1);
  first_done.WaitForNotification();
  EXPECT_EQ(first_status.code(), absl::StatusCode::kCancelled) << first_status;
  // Writes still in flight when it was cancelled count as a cancelled transfer (there
  // may have been none).
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_failures_total"),
            Metric(reg, "kvrelay_kv_transfer_failures_total", {{"reason", "cancelled"}}));
  EXPECT_EQ(Metric(reg, "kvrelay_prefill_seconds"), 0);  // only successful jobs
  EXPECT_EQ(s.p_kv.cache->counts().in_use, 0);
  // Nothing of the second job reached the destination.
  const uint64_t bb = s.d_kv.pool->layout().block_bytes();
  std::vector<uint8_t> zero(bb, 0);
  EXPECT_EQ(std::memcmp(s.DBlock(40), zero.data(), bb), 0);
  s.engine->Cancel(*h1);  // already ended: no effect
}

TEST(PrefillEngineTest, RepeatedDestinationBlocksAreRejectedAtSubmit) {
  Rig s;
  auto h = s.engine->Submit(s.Job(Prompt(40, 4), 0, {5, 5, 6}),
                            [](absl::StatusOr<PrefillOutcome>) { ADD_FAILURE() << "ran"; });
  EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.engine->queued(), 0);
}

TEST(PrefillEngineTest, DeadDestinationFailsTheJobAndReleasesEverything) {
  Rig s;
  const auto prompt = Prompt(40, 6);
  PrefillJob j = s.Job(prompt, 0, {1, 2, 3});
  s.d_kv = worker::KvStore();  // the decode worker's pool and transport are gone
  s.d_transport.reset();
  auto out = s.Run(std::move(j));
  EXPECT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kUnavailable) << out.status();
  EXPECT_EQ(s.p_kv.cache->counts().in_use, 0);
  const prometheus::Registry& reg = *s.engine->metrics();
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_failures_total", {{"reason", "unavailable"}}), 1);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_failures_total"), 1);
  EXPECT_LE(Metric(reg, "kvrelay_kv_transfer_seconds"), 0);  // no successful transfer
  EXPECT_EQ(Metric(reg, "kvrelay_kv_blocks", {{"state", "in_use"}}), 0);
}

}  // namespace
}  // namespace kvrelay::prefill

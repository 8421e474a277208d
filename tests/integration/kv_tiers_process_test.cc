// The tiered KV cache (issue 19) with real processes on 127.0.0.1: a decode worker whose
// pool is too small for its prompts brings their blocks back from its host and disk tiers
// (exact tokens, against the single-process `kvrelay generate`), finds its disk blocks
// again after a restart, a prefill worker ships a prefix from its host tier without
// recomputing it, and the router learns every tier from the KV events and reports the
// hit rate per tier.
#include <signal.h>

#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
#include "kvrelay/v1/registry.grpc.pb.h"
#include "kvrelay/v1/worker.grpc.pb.h"
#include "tests/testing/decode_client.h"
#include "tests/testing/http.h"
#include "tests/testing/processes.h"
#include "tests/testing/temp_dir.h"
#include "tests/testing/test_models.h"

namespace kvrelay {
namespace {

using testing::RandomPrompt;

constexpr int kBlock = 16;

std::string ModelDir() { return testing::ModelDir(testing::TinyVariants()[0]); }

uint64_t BlockBytes() { return testing::TinyBlockBytes(kBlock); }

using Reply = testing::DecodeReply;

v1::DecodeRequest Request(const std::string& id, const std::vector<int32_t>& prompt, int max_tokens,
                          const std::string& prefill_address = "") {
  v1::DecodeRequest r;
  r.set_request_id(id);
  for (int32_t t : prompt) r.add_prompt_token_ids(t);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  if (prefill_address.empty()) {
    r.mutable_plan()->set_mode(v1::PREFILL_MODE_LOCAL);
  } else {
    r.mutable_plan()->set_mode(v1::PREFILL_MODE_REMOTE);
    r.mutable_plan()->set_prefill_address(prefill_address);
  }
  return r;
}

Reply Generate(const testing::WorkerProcess& w, const v1::DecodeRequest& req) {
  auto stub = v1::DecodeWorker::NewStub(
      grpc::CreateChannel(w.address(), grpc::InsecureChannelCredentials()));
  return testing::DecodeGenerate(*stub, req);
}

// Scrapes a process's /metrics until `ok` holds (bounded); the last text.
std::string ScrapeUntil(int port, const std::function<bool(const std::string&)>& ok) {
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  std::string text;
  while (absl::Now() < deadline) {
    text = testing::ScrapeMetrics(port);
    if (ok(text)) return text;
    absl::SleepFor(absl::Milliseconds(20));
  }
  ADD_FAILURE() << "metrics never reached the expected state:\n" << text;
  return text;
}

// Waits until the tier holds at least `blocks` blocks (offloads run off the request path).
void WaitForTier(const testing::WorkerProcess& w, const std::string& tier, double blocks) {
  ScrapeUntil(w.metrics_port, [&](const std::string& t) {
    return testing::MetricSum(t, "kvrelay_kv_tier_blocks", "tier=\"" + tier + "\"") >= blocks;
  });
}

std::vector<std::string> TierFlags(int pool_blocks, int host_blocks, const std::string& disk_dir) {
  std::vector<std::string> f = {"--model",
                                ModelDir(),
                                "--threads",
                                "1",
                                "--kv_blocks",
                                std::to_string(pool_blocks),
                                "--metrics_listen",
                                "127.0.0.1:0",
                                "--exit_linger_seconds",
                                "0",
                                "--kv_host_bytes",
                                std::to_string(host_blocks * BlockBytes())};
  if (!disk_dir.empty()) {
    f.insert(f.end(), {"--kv_disk_dir", disk_dir, "--kv_disk_bytes", std::to_string(1 << 30)});
  }
  return f;
}

// Prompts that fill a 16-block pool several times over: the first one's blocks are evicted.
void Flood(const testing::WorkerProcess& w, const std::string& prefill = "") {
  for (int i = 0; i < 4; ++i) {
    const Reply r =
        Generate(w, Request(absl::StrCat("flood", i), RandomPrompt(100, 700 + i), 2, prefill));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  }
}

TEST(KvTiersProcessTest, DecodeWorkerReloadsFromHostAndDiskAndAfterARestart) {
  testing::ScopedTempDir disk;
  const std::vector<int32_t> prompt = RandomPrompt(100, 41);  // 6 full blocks + 4 tokens
  const std::vector<int32_t> want = testing::CliGenerate(ModelDir(), prompt, 8);
  {
    testing::WorkerProcess d =
        testing::StartWorker("kvrelay-decode", TierFlags(16, 4, disk.path()));
    ASSERT_TRUE(d.process);
    Reply r = Generate(d, Request("a1", prompt, 8));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, want);
    Flood(d);
    WaitForTier(d, "disk", 6);
    r = Generate(d, Request("a2", prompt, 8));  // evicted from the pool: from the tiers
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, want);
    EXPECT_EQ(r.usage.cached_tokens(), 96);
    EXPECT_EQ(r.usage.host_cached_tokens() + r.usage.disk_cached_tokens(), 96);
    EXPECT_GT(r.usage.disk_cached_tokens(), 0);  // the host tier holds only 4 blocks
    const std::string m = testing::ScrapeMetrics(d.metrics_port);
    EXPECT_GT(testing::MetricSum(m, "kvrelay_kv_tier_hits_total", "tier=\"disk\""), 0);
    EXPECT_EQ(testing::MetricSum(m, "kvrelay_kv_tier_corrupt_blocks_total"), 0);
    d.process->Kill(SIGTERM);
    EXPECT_TRUE(d.process->Wait(testing::kProcessTimeout).has_value());
  }
  // A new process on the same folder: its pool and host tier are empty, the disk is not.
  testing::WorkerProcess d = testing::StartWorker("kvrelay-decode", TierFlags(16, 4, disk.path()));
  ASSERT_TRUE(d.process);
  const Reply r = Generate(d, Request("a3", prompt, 8));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, want);
  EXPECT_EQ(r.usage.cached_tokens(), 96);
  EXPECT_EQ(r.usage.disk_cached_tokens(), 96);
}

TEST(KvTiersProcessTest, PrefillWorkerShipsAPrefixFromItsHostTier) {
  testing::WorkerProcess p = testing::StartWorker("kvrelay-prefill", TierFlags(16, 64, ""));
  std::vector<std::string> plain = {"--model", ModelDir(), "--threads", "1", "--kv_blocks", "256"};
  testing::WorkerProcess d1 = testing::StartWorker("kvrelay-decode", plain);
  testing::WorkerProcess d2 = testing::StartWorker("kvrelay-decode", plain);
  ASSERT_TRUE(p.process && d1.process && d2.process);
  const std::vector<int32_t> prompt = RandomPrompt(100, 42);
  const std::vector<int32_t> want = testing::CliGenerate(ModelDir(), prompt, 8);
  Reply r = Generate(d1, Request("b1", prompt, 8, p.address()));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, want);
  Flood(d1, p.address());  // evicts the prompt from the prefill worker's pool
  WaitForTier(p, "host", 6 + 4 * 6);
  // Another decode worker (nothing cached there): the prefill worker reloads 6 blocks from
  // its host tier, computes the last 4 tokens, and ships all 7 blocks.
  r = Generate(d2, Request("b2", prompt, 8, p.address()));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, want);
  EXPECT_EQ(r.usage.prefill_mode(), v1::PREFILL_MODE_REMOTE);
  EXPECT_EQ(r.usage.cached_tokens(), 0);
  EXPECT_EQ(r.usage.prefill_cached_tokens(), 96);
  EXPECT_EQ(r.usage.host_cached_tokens(), 96);
  EXPECT_EQ(r.usage.transfer_bytes(), 7 * BlockBytes());
  const std::string m = testing::ScrapeMetrics(p.metrics_port);
  EXPECT_GE(testing::MetricSum(m, "kvrelay_kv_tier_hits_total", "tier=\"host\""), 6);
}

// Through the router: the index learns the tiers from the events, routes by them, and
// reports the hit rate available / predicted / delivered per tier.
TEST(KvTiersProcessTest, RouterKnowsTiersAndReportsTheHitRatePerTier) {
  testing::WorkerProcess router = testing::StartWorker(
      "kvrelay-router",
      {"--model", ModelDir(), "--metrics_listen", "127.0.0.1:0", "--exit_linger_seconds", "0"});
  ASSERT_TRUE(router.process);
  std::vector<std::string> flags = TierFlags(16, 64, "");
  flags.insert(flags.end(), {"--router", router.address()});
  testing::WorkerProcess d = testing::StartWorker("kvrelay-decode", flags);
  ASSERT_TRUE(d.process);
  auto channel = grpc::CreateChannel(router.address(), grpc::InsecureChannelCredentials());
  auto gen = v1::Generation::NewStub(channel);
  auto registry = v1::Registry::NewStub(channel);
  auto generate = [&](const std::vector<int32_t>& prompt, v1::Final* final) {
    v1::GenerateRequest req;
    for (int32_t t : prompt) req.mutable_token_ids()->add_ids(t);
    req.mutable_sampling()->set_max_tokens(8);
    req.mutable_sampling()->set_ignore_eos(true);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    auto reader = gen->Generate(&ctx, req);
    v1::GenerateResponse m;
    std::vector<int32_t> tokens;
    while (reader->Read(&m)) {
      tokens.insert(tokens.end(), m.token_ids().begin(), m.token_ids().end());
      if (m.has_final()) *final = m.final();
    }
    EXPECT_TRUE(reader->Finish().ok());
    return tokens;
  };
  // The decode worker registered.
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  auto indexed = [&]() -> int64_t {
    grpc::ClientContext ctx;
    v1::ListWorkersResponse r;
    if (!registry->ListWorkers(&ctx, v1::ListWorkersRequest(), &r).ok()) return -1;
    for (const auto& w : r.workers()) {
      if (w.alive() && w.synced()) return w.indexed_blocks();
    }
    return -1;
  };
  while (indexed() < 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(20));
  const std::vector<int32_t> prompt = RandomPrompt(100, 43);
  const std::vector<int32_t> want = testing::CliGenerate(ModelDir(), prompt, 8);
  v1::Final f;
  EXPECT_EQ(generate(prompt, &f), want);
  for (int i = 0; i < 4; ++i) {
    v1::Final ignored;
    generate(RandomPrompt(100, 800 + i), &ignored);
  }
  WaitForTier(d, "host", 6 + 4 * 6);
  // The index counts the host tier's blocks too (more than the 16-block pool holds).
  while (indexed() < 30 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(20));
  EXPECT_GE(indexed(), 30);
  EXPECT_EQ(generate(prompt, &f), want);
  EXPECT_EQ(f.usage().cached_tokens(), 96);
  EXPECT_EQ(f.usage().host_cached_tokens(), 96);
  EXPECT_EQ(f.route().predicted_cached_tokens(), 96);  // the router knew it was below
  const std::string m = testing::ScrapeMetrics(router.metrics_port);
  auto tier = [&](const std::string& kind, const std::string& t) {
    return testing::MetricSum(m, "kvrelay_router_prefix_tier_tokens_total",
                              "kind=\"" + kind + "\",tier=\"" + t + "\"");
  };
  EXPECT_GE(tier("predicted", "host"), 96);
  EXPECT_GE(tier("delivered", "host"), 96);
  EXPECT_GE(tier("available", "host"), 96);
}

}  // namespace
}  // namespace kvrelay

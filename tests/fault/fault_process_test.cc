// The fault suite (issue 17, ctest label "fault"): real kvrelay processes on 127.0.0.1,
// a fault injected while they serve, then the outcome counted and the books checked
// from every worker's /metrics: no KV block left in use or quarantined, nothing running
// or queued. Each case prints one "RELIABILITY|..." line; tools/reliability.sh turns
// them into docs/reliability.md.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
#include "kvrelay/v1/registry.grpc.pb.h"
#include "tests/testing/http.h"
#include "tests/testing/processes.h"
#include "tests/testing/test_models.h"

namespace kvrelay {
namespace {

using testing::RandomPrompt;

std::string ModelDir() { return testing::ModelDir(testing::TinyVariants()[0]); }

constexpr int kLocalMax = 24;  // prompts with more uncached tokens are prefilled remotely

struct Result {
  grpc::Status status;
  std::vector<int32_t> tokens;
  v1::Final final;
};

v1::GenerateRequest Greedy(const std::vector<int32_t>& prompt, int max_tokens) {
  v1::GenerateRequest r;
  for (int32_t t : prompt) r.mutable_token_ids()->add_ids(t);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  return r;
}

// One Generate call; `on_message(ctx, m)` sees every message (and may cancel).
Result Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& req,
                const std::function<void(grpc::ClientContext&, const v1::GenerateResponse&)>&
                    on_message = nullptr,
                const std::function<void(grpc::ClientContext&)>& on_start = nullptr) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(240));
  Result out;
  auto reader = stub.Generate(&ctx, req);
  if (on_start) on_start(ctx);
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    out.tokens.insert(out.tokens.end(), m.token_ids().begin(), m.token_ids().end());
    if (m.has_final()) out.final = m.final();
    if (on_message) on_message(ctx, m);
  }
  out.status = reader->Finish();
  return out;
}

// Runs f(i) for i in [0, n) on `threads` threads.
void ParallelFor(int n, int threads, const std::function<void(int)>& f) {
  std::atomic<int> next{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (int i = next++; i < n; i = next++) f(i);
    });
  }
  for (auto& t : pool) t.join();
}

// What a Cluster starts: its workers, and flags appended to each kind's defaults (a
// later flag wins); `decode_wrapper` runs each decode worker, e.g. {"/usr/bin/env", "VAR=1"}.
struct ClusterSpec {
  int prefill = 1, decode = 1;
  std::vector<std::string> router_flags, prefill_flags, decode_flags, decode_wrapper;
};

ClusterSpec TwoDecodeWorkers() {
  ClusterSpec s;
  s.decode = 2;
  return s;
}

class Cluster {
 public:
  explicit Cluster(ClusterSpec spec) : spec_(std::move(spec)) {
    StartRouter(0);
    for (int i = 0; i < spec_.prefill; ++i) {
      StartWorker("kvrelay-prefill", absl::StrCat("prefill-", i));
    }
    for (int i = 0; i < spec_.decode; ++i)
      StartWorker("kvrelay-decode", absl::StrCat("decode-", i));
    WaitForRegistry([&](const v1::ListWorkersResponse& r) {
      return AliveSynced(r) == spec_.prefill + spec_.decode;
    });
  }

  void StartRouter(int port) {
    std::vector<std::string> args = {"--model",
                                     ModelDir(),
                                     "--listen",
                                     absl::StrCat("127.0.0.1:", port),
                                     "--local_prefill_max_tokens",
                                     std::to_string(kLocalMax),
                                     "--heartbeat_interval_ms",
                                     "200",
                                     "--heartbeat_timeout_ms",
                                     "10000",
                                     "--max_running",
                                     "64",
                                     "--exit_linger_seconds",
                                     "0",
                                     "--metrics_listen",
                                     "127.0.0.1:0"};
    args.insert(args.end(), spec_.router_flags.begin(), spec_.router_flags.end());
    router_ =
        std::make_unique<testing::WorkerProcess>(testing::StartWorker("kvrelay-router", args));
    ASSERT_TRUE(router_->process);
    auto channel = grpc::CreateChannel(router_->address(), grpc::InsecureChannelCredentials());
    gen_ = v1::Generation::NewStub(channel);
    registry_ = v1::Registry::NewStub(channel);
  }

  void StartWorker(const std::string& binary, const std::string& id) {
    std::vector<std::string> args = {"--model",
                                     ModelDir(),
                                     "--threads",
                                     "1",
                                     "--kv_blocks",
                                     "512",
                                     "--prefill_chunk",
                                     "32",
                                     "--router",
                                     router_->address(),
                                     "--worker_id",
                                     id,
                                     "--exit_linger_seconds",
                                     "0",
                                     "--metrics_listen",
                                     "127.0.0.1:0"};
    const bool decode = binary == "kvrelay-decode";
    const std::vector<std::string>& flags = decode ? spec_.decode_flags : spec_.prefill_flags;
    args.insert(args.end(), flags.begin(), flags.end());
    testing::WorkerProcess w = testing::StartWorker(
        binary, args, decode ? spec_.decode_wrapper : std::vector<std::string>{});
    ASSERT_TRUE(w.process) << id;
    workers_.erase(id);
    workers_.emplace(id, std::move(w));
  }

  static int AliveSynced(const v1::ListWorkersResponse& r) {
    int n = 0;
    for (const auto& w : r.workers()) n += w.alive() && w.synced() ? 1 : 0;
    return n;
  }
  v1::ListWorkersResponse List() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ListWorkersResponse r;
    (void)registry_->ListWorkers(&ctx, v1::ListWorkersRequest(), &r);
    return r;
  }
  bool WaitForRegistry(const std::function<bool(const v1::ListWorkersResponse&)>& pred) {
    const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
    while (absl::Now() < deadline) {
      if (pred(List())) return true;
      absl::SleepFor(absl::Milliseconds(20));
    }
    ADD_FAILURE() << "registry: " << List().DebugString();
    return false;
  }

  // A worker's books: KV blocks in use and quarantined, sequences running or waiting,
  // prefills queued. Zero everywhere when nothing is left behind.
  double Outstanding(const std::string& id) {
    return testing::OutstandingWork(testing::ScrapeMetrics(workers_.at(id).metrics_port));
  }
  // Waits (bounded) until every listed worker's books are balanced; what is left.
  double WaitBalanced(const std::vector<std::string>& ids) {
    const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
    double left = 0;
    do {
      left = 0;
      for (const std::string& id : ids) left += std::abs(Outstanding(id));
      if (left == 0) return 0;
      absl::SleepFor(absl::Milliseconds(50));
    } while (absl::Now() < deadline);
    return left;
  }
  double Metric(const std::string& id, const std::string& name, const std::string& label = "") {
    return testing::MetricSum(testing::ScrapeMetrics(workers_.at(id).metrics_port), name, label);
  }

  v1::Generation::Stub& gen() { return *gen_; }
  testing::WorkerProcess& worker(const std::string& id) { return workers_.at(id); }
  testing::WorkerProcess& router() { return *router_; }
  const v1::WorkerStatus* Find(const v1::ListWorkersResponse& r, const std::string& id) {
    for (const auto& w : r.workers()) {
      if (w.registration().worker_id() == id) return &w;
    }
    return nullptr;
  }

 private:
  const ClusterSpec spec_;
  std::unique_ptr<testing::WorkerProcess> router_;
  std::map<std::string, testing::WorkerProcess> workers_;
  std::unique_ptr<v1::Generation::Stub> gen_;
  std::unique_ptr<v1::Registry::Stub> registry_;
};

void Report(const std::string& name, const std::string& injected, int completed, int failed,
            int lost, double leaked, const std::string& note = "") {
  std::printf("RELIABILITY|%s|%s|%d|%d|%d|%g|%s\n", name.c_str(), injected.c_str(), completed,
              failed, lost, leaked, note.c_str());
  std::fflush(stdout);
}

// Runs `fault` on a thread once every one of `n` streams has delivered a token
// (`started` is told each stream that did); Join() waits for it.
class OnceAllStarted {
 public:
  OnceAllStarted(int n, std::function<void()> fault) : n_(n) {
    thread_ = std::thread([this, fault = std::move(fault)] {
      {
        absl::MutexLock l(&mu_);
        auto all = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return static_cast<int>(started_.size()) == n_;
        };
        mu_.AwaitWithTimeout(absl::Condition(&all), testing::kProcessTimeout);
      }
      fault();
    });
  }
  ~OnceAllStarted() { Join(); }
  // For on_message: stream `i` got message `m`.
  void Saw(int i, const v1::GenerateResponse& m) {
    if (m.token_ids_size() == 0) return;
    absl::MutexLock l(&mu_);
    started_.insert(i);
  }
  void Join() {
    if (thread_.joinable()) thread_.join();
  }

 private:
  const int n_;
  absl::Mutex mu_;
  std::set<int> started_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

// Prompts of mixed lengths: short ones prefilled on the decode worker, long ones on the
// prefill worker (KV over UCX).
std::vector<std::vector<int32_t>> Prompts(int n, uint32_t seed) {
  std::vector<std::vector<int32_t>> p;
  for (int i = 0; i < n; ++i) p.push_back(RandomPrompt(8 + (i * 37) % 150, seed + i));
  return p;
}

TEST(FaultTest, DecodeWorkerKilledMidStreamUnder50ConcurrentRequests) {
  Cluster c(TwoDecodeWorkers());
  constexpr int kN = 50, kTokens = 340;  // long streams: still running at the kill
  const auto prompts = Prompts(kN, 5000);
  std::vector<Result> reference(kN);
  ParallelFor(kN, kN,
              [&](int i) { reference[i] = Generate(c.gen(), Greedy(prompts[i], kTokens)); });
  for (int i = 0; i < kN; ++i) ASSERT_TRUE(reference[i].status.ok()) << i;

  double running_at_kill = 0;
  OnceAllStarted killer(kN, [&] {
    // ... and decode-1 is serving some of them (its gauge, updated every step).
    const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
    while (absl::Now() < deadline &&
           (running_at_kill = c.Metric("decode-1", "kvrelay_decode_running_sequences")) <= 0) {
      absl::SleepFor(absl::Milliseconds(5));
    }
    c.worker("decode-1").process->Kill(SIGKILL);
  });
  std::vector<Result> results(kN);
  ParallelFor(kN, kN, [&](int i) {
    results[i] =
        Generate(c.gen(), Greedy(prompts[i], kTokens),
                 [&, i](grpc::ClientContext&, const v1::GenerateResponse& m) { killer.Saw(i, m); });
  });
  killer.Join();
  int completed = 0, failed = 0, lost = 0, migrated = 0;
  for (int i = 0; i < kN; ++i) {
    if (results[i].status.ok()) {
      ++completed;
      migrated += results[i].final.route().migrations() > 0 ? 1 : 0;
      if (results[i].tokens != reference[i].tokens) ++lost;  // a token lost or repeated
    } else {
      EXPECT_EQ(results[i].status.error_code(), grpc::StatusCode::UNAVAILABLE)
          << i << ": " << results[i].status.error_message();
      ++failed;
    }
  }
  EXPECT_EQ(lost, 0);
  EXPECT_GT(running_at_kill, 0);
  EXPECT_GT(migrated, 0);
  const double leaked = c.WaitBalanced({"decode-0", "prefill-0"});
  EXPECT_EQ(leaked, 0);
  Report("decode worker SIGKILL mid-stream", "50 concurrent streams, 1 of 2 decode workers killed",
         completed, failed, lost, leaked, absl::StrCat(migrated, " migrated"));
}

TEST(FaultTest, PrefillWorkerHungLongerThanItsCallFallsBackToLocalPrefill) {
  ClusterSpec spec;
  spec.decode_flags = {"--prefill_timeout_seconds=2"};
  Cluster c(spec);
  constexpr int kN = 8, kTokens = 8;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kN; ++i) prompts.push_back(RandomPrompt(100 + 10 * i, 6000 + i));
  std::vector<std::vector<int32_t>> want(kN);
  for (int i = 0; i < kN; ++i) want[i] = testing::CliGenerate(ModelDir(), prompts[i], kTokens);
  c.worker("prefill-0").process->Kill(SIGSTOP);  // a hang, not a crash
  std::vector<Result> results(kN);
  ParallelFor(kN, kN, [&](int i) { results[i] = Generate(c.gen(), Greedy(prompts[i], kTokens)); });
  c.worker("prefill-0").process->Kill(SIGCONT);
  int completed = 0, failed = 0, lost = 0;
  for (int i = 0; i < kN; ++i) {
    if (results[i].status.ok()) {
      ++completed;
      lost += results[i].tokens == want[i] ? 0 : 1;
    } else {
      ++failed;
      EXPECT_EQ(results[i].status.error_code(), grpc::StatusCode::UNAVAILABLE);
    }
  }
  EXPECT_EQ(completed, kN);  // each fell back to a local prefill on the decode worker
  EXPECT_EQ(lost, 0);
  EXPECT_GT(c.Metric("decode-0", "kvrelay_decode_remote_prefills_total"), 0);
  // Once it runs again, the stopped worker's late jobs are aborted and every block of
  // both workers comes back.
  const double leaked = c.WaitBalanced({"decode-0", "prefill-0"});
  EXPECT_EQ(leaked, 0);
  Report("prefill worker hung (SIGSTOP)",
         "8 remote prefills, the prefill worker stopped past --prefill_timeout_seconds", completed,
         failed, lost, leaked, "all fell back to local prefill");
}

TEST(FaultTest, PrefillWorkerKilledMidTransfer) {
  // Two slow prefill workers (one token per forward pass, each finished block sent at
  // once): killing one while its first job is half computed kills it mid-transfer.
  ClusterSpec spec;
  spec.prefill = 2;
  spec.prefill_flags = {"--prefill_chunk", "1"};
  Cluster c(spec);
  constexpr int kN = 12, kTokens = 8;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kN; ++i) prompts.push_back(RandomPrompt(160 + 12 * i, 6500 + i));
  std::vector<std::vector<int32_t>> want(kN);
  for (int i = 0; i < kN; ++i) want[i] = testing::CliGenerate(ModelDir(), prompts[i], kTokens);
  double computed_at_kill = 0;
  std::thread killer([&] {
    // 64 tokens computed: its first job's first 4 blocks are on their way or written,
    // the rest of it still to come.
    const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
    while (absl::Now() < deadline &&
           (computed_at_kill = c.Metric("prefill-0", "kvrelay_prefill_computed_tokens_total")) <
               64) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    c.worker("prefill-0").process->Kill(SIGKILL);
  });
  std::vector<Result> results(kN);
  ParallelFor(kN, kN, [&](int i) { results[i] = Generate(c.gen(), Greedy(prompts[i], kTokens)); });
  killer.join();
  int completed = 0, failed = 0, lost = 0;
  for (int i = 0; i < kN; ++i) {
    if (results[i].status.ok()) {
      ++completed;
      lost += results[i].tokens == want[i] ? 0 : 1;
    } else {
      ++failed;
      EXPECT_EQ(results[i].status.error_code(), grpc::StatusCode::UNAVAILABLE)
          << i << ": " << results[i].status.error_message();
    }
  }
  EXPECT_EQ(lost, 0);
  EXPECT_GE(computed_at_kill, 64);
  const double fell_back =
      c.Metric("decode-0", "kvrelay_decode_remote_prefills_total", "result=\"failed\"");
  EXPECT_GE(fell_back, 1);  // at least the job it was computing
  // The dead worker's leases come back to the decode pool; the survivor's books balance.
  const double leaked = c.WaitBalanced({"decode-0", "prefill-1"});
  EXPECT_EQ(leaked, 0);
  Report("prefill worker SIGKILL mid-transfer",
         absl::StrCat(kN, " remote prefills on 2 prefill workers, one killed after ",
                      computed_at_kill, " prompt tokens"),
         completed, failed, lost, leaked,
         absl::StrCat(fell_back, " prefilled again on the decode worker, the rest elsewhere"));
}

TEST(FaultTest, RouterRestartUnderLoad) {
  Cluster c(TwoDecodeWorkers());
  const auto repeated = RandomPrompt(96, 7000);
  const Result first = Generate(c.gen(), Greedy(repeated, 4));
  ASSERT_TRUE(first.status.ok());
  constexpr int kN = 20, kTokens = 400;
  const auto prompts = Prompts(kN, 7100);
  OnceAllStarted killer(kN, [&] { c.router().process->Kill(SIGKILL); });
  std::vector<Result> results(kN);
  ParallelFor(kN, kN, [&](int i) {
    results[i] =
        Generate(c.gen(), Greedy(prompts[i], kTokens),
                 [&, i](grpc::ClientContext&, const v1::GenerateResponse& m) { killer.Saw(i, m); });
  });
  killer.Join();
  int completed = 0, failed = 0;
  for (const Result& r : results) {
    if (r.status.ok()) {
      ++completed;
    } else {
      ++failed;
      EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r.status.error_message();
    }
  }
  // The requests in flight went with the router: the workers cancel them and free
  // their blocks.
  double leaked = c.WaitBalanced({"decode-0", "decode-1", "prefill-0"});
  EXPECT_EQ(leaked, 0);
  // A new router on the same port: the workers register again and their snapshots
  // rebuild the index, without stale entries (what each worker indexes is what it
  // caches), and the repeated prompt hits again.
  const int port = c.router().port;
  ASSERT_TRUE(c.router().process->Wait(testing::kProcessTimeout));
  c.StartRouter(port);
  ASSERT_TRUE(c.WaitForRegistry([&](const v1::ListWorkersResponse& r) {
    if (Cluster::AliveSynced(r) != 3) return false;
    for (const char* id : {"decode-0", "decode-1"}) {
      const v1::WorkerStatus* w = c.Find(r, id);
      if (w == nullptr ||
          w->indexed_blocks() != c.Metric(id, "kvrelay_kv_blocks", "state=\"cached_free\"")) {
        return false;
      }
    }
    return true;
  }));
  const Result again = Generate(c.gen(), Greedy(repeated, 4));
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_GT(again.final.usage().cached_tokens(), 0);
  EXPECT_EQ(again.tokens, first.tokens);
  leaked = c.WaitBalanced({"decode-0", "decode-1", "prefill-0"});
  EXPECT_EQ(leaked, 0);
  Report("router restart under load", "SIGKILL of the router with 20 streams running, restart",
         completed, failed, 0, leaked,
         absl::StrCat("index resynced, repeated prompt reused ",
                      again.final.usage().cached_tokens(), " cached tokens"));
}

TEST(FaultTest, AThousandClientCancelsAtRandomPoints) {
  Cluster c(ClusterSpec{});
  constexpr int kN = 1000;
  std::atomic<int> cancelled{0}, completed{0}, other{0};
  ParallelFor(kN, 25, [&](int i) {
    std::mt19937 rng(9000 + i);
    const int after = static_cast<int>(rng() % 6);  // 0: before the first message
    const int delay_us = static_cast<int>(rng() % 20000);
    int seen = 0;
    const Result r = Generate(
        c.gen(), Greedy(RandomPrompt(8 + static_cast<int>(rng() % 150), 9000 + i), 32),
        [&](grpc::ClientContext& ctx, const v1::GenerateResponse&) {
          if (++seen == after) ctx.TryCancel();
        },
        [&](grpc::ClientContext& ctx) {
          if (after > 0) return;
          // During admission, prefill or transfer: a random moment after the call starts.
          std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
          ctx.TryCancel();
        });
    if (r.status.error_code() == grpc::StatusCode::CANCELLED) {
      ++cancelled;
    } else if (r.status.ok()) {
      ++completed;
    } else {
      ++other;
      ADD_FAILURE() << r.status.error_code() << ": " << r.status.error_message();
    }
  });
  EXPECT_GT(cancelled.load(), kN / 2);
  EXPECT_EQ(other.load(), 0);
  const double leaked = c.WaitBalanced({"decode-0", "prefill-0"});
  EXPECT_EQ(leaked, 0);
  Report("1,000 client cancels", "cancel at a random point: queued, prefill, transfer, decode",
         completed.load(), cancelled.load(), 0, leaked, "failed = cancelled by the client");
}

// Peak resident memory of a process (kB), from /proc; -1 if unreadable.
double PeakRssKb(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    double kb = 0;
    if (absl::StartsWith(line, "VmHWM:") &&
        absl::SimpleAtod(absl::StripAsciiWhitespace(absl::StripSuffix(line.substr(6), "kB")),
                         &kb)) {
      return kb;
    }
  }
  return -1;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

TEST(FaultTest, OverloadTenTimesTheDecodePool) {
  // The decode pool holds about 8 of these requests (128 blocks of 16 tokens; a request
  // needs 11 to 17); the router runs 8 and queues 8, for at most 5 s each. Each runs
  // long enough (160 tokens) that its slot stays taken while the 80 calls arrive.
  constexpr int kHeld = 8, kN = 10 * kHeld, kTokens = 160, kDistinct = 8;
  constexpr double kQueueSeconds = 5;
  ClusterSpec spec;
  spec.router_flags = {"--max_running",       std::to_string(kHeld), "--max_queued",
                       std::to_string(kHeld), "--max_queue_seconds", absl::StrCat(kQueueSeconds)};
  spec.decode_flags = {"--kv_blocks", "128"};
  Cluster c(spec);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::vector<int32_t>> want;
  for (int i = 0; i < kDistinct; ++i) {
    prompts.push_back(RandomPrompt(16 + 12 * i, 9500 + i));
    want.push_back(testing::CliGenerate(ModelDir(), prompts.back(), kTokens));
  }
  // A warm-up through every process, then each one's peak memory so far.
  for (const auto& p : prompts) ASSERT_TRUE(Generate(c.gen(), Greedy(p, kTokens)).status.ok());
  const std::vector<std::string> ids = {"decode-0", "prefill-0"};
  std::map<std::string, pid_t> pids = {{"router", c.router().process->pid()}};
  for (const std::string& id : ids) pids[id] = c.worker(id).process->pid();
  std::map<std::string, double> rss_before;
  for (const auto& [id, pid] : pids) rss_before[id] = PeakRssKb(pid);

  std::vector<Result> results(kN);
  std::vector<double> seconds(kN), ttft(kN, -1);
  ParallelFor(kN, kN, [&](int i) {
    const absl::Time t0 = absl::Now();
    results[i] = Generate(c.gen(), Greedy(prompts[i % kDistinct], kTokens),
                          [&, i](grpc::ClientContext&, const v1::GenerateResponse& m) {
                            if (ttft[i] < 0 && m.token_ids_size() > 0) {
                              ttft[i] = absl::ToDoubleSeconds(absl::Now() - t0);
                            }
                          });
    seconds[i] = absl::ToDoubleSeconds(absl::Now() - t0);
  });
  int completed = 0, refused = 0, other = 0, lost = 0;
  std::vector<double> refusal_seconds, admitted_ttft;
  for (int i = 0; i < kN; ++i) {
    if (results[i].status.ok()) {
      ++completed;
      admitted_ttft.push_back(ttft[i]);
      lost += results[i].tokens == want[i % kDistinct] ? 0 : 1;
    } else if (results[i].status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ++refused;
      refusal_seconds.push_back(seconds[i]);
    } else {
      ++other;
      ADD_FAILURE() << i << ": " << results[i].status.error_code() << " "
                    << results[i].status.error_message();
    }
  }
  EXPECT_EQ(other, 0);
  EXPECT_EQ(lost, 0);
  EXPECT_GE(completed, kHeld);         // the pool was used ...
  EXPECT_GE(refused, kN - 4 * kHeld);  // ... and most of the excess shed
  // Shed quickly: a refused call waited at most its queue time (plus slack for a loaded
  // machine), never for a runner it could not get; admitted calls' first token is
  // bounded by the same queue time plus their own service.
  const double refusal_p99 = Percentile(refusal_seconds, 0.99);
  const double ttft_p99 = Percentile(admitted_ttft, 0.99);
  EXPECT_LE(refusal_p99, kQueueSeconds + 10);
  EXPECT_LE(ttft_p99, kQueueSeconds + 30);
  // Memory bounded: the KV pool is allocated at start; the overload adds little.
  double rss_growth_mib = 0;
  for (const auto& [id, pid] : pids) {
    const double after = PeakRssKb(pid);
    ASSERT_GT(after, 0) << id << " is gone";  // no crash
    rss_growth_mib = std::max(rss_growth_mib, (after - rss_before[id]) / 1024);
  }
  EXPECT_LE(rss_growth_mib, 128);
  // Still serving, exactly, and nothing left behind.
  const Result after = Generate(c.gen(), Greedy(prompts[0], kTokens));
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.tokens, want[0]);
  const double leaked = c.WaitBalanced(ids);
  EXPECT_EQ(leaked, 0);
  Report("overload 10x the decode pool",
         absl::StrCat(kN, " concurrent calls; the pool holds ~", kHeld, ", the router runs ", kHeld,
                      " and queues ", kHeld),
         completed, refused + other, lost, leaked,
         absl::StrFormat("failed = %d RESOURCE_EXHAUSTED (p99 %.3f s); admitted p99 TTFT %.3f s; "
                         "peak RSS +%.1f MiB",
                         refused, refusal_p99, ttft_p99, rss_growth_mib));
}

TEST(FaultTest, CorruptedKvIsCaughtByTheChecksumsAndNeverDecoded) {
#ifndef KVRELAY_FAULT_INJECTION
  GTEST_SKIP() << "built without KVRELAY_FAULT_INJECTION (the test-only transfer hooks)";
#endif
  // Every second KV transfer the decode worker receives has one byte flipped
  // (common/transfer/fault_hooks.h).
  ClusterSpec spec;
  spec.decode_wrapper = {"/usr/bin/env", "KVRELAY_FAULT_CORRUPT_KV=2"};
  Cluster c(spec);
  constexpr int kN = 6, kTokens = 6;
  int completed = 0, failed = 0, lost = 0;
  for (int i = 0; i < kN; ++i) {
    const std::vector<int32_t> prompt = RandomPrompt(60 + 20 * i, 8000 + i);
    const Result r = Generate(c.gen(), Greedy(prompt, kTokens));
    if (!r.status.ok()) {
      ++failed;
      ADD_FAILURE() << r.status.error_message();
      continue;
    }
    ++completed;
    // Never decoded from bad KV: the output is the single-process one.
    lost += r.tokens == testing::CliGenerate(ModelDir(), prompt, kTokens) ? 0 : 1;
  }
  EXPECT_EQ(lost, 0);
  const double mismatches =
      c.Metric("decode-0", "kvrelay_decode_remote_prefills_total", "result=\"checksum_mismatch\"");
  EXPECT_GE(mismatches, 2);  // caught every time, then prefilled locally
  EXPECT_GE(c.Metric("decode-0", "kvrelay_kv_checksum_failures_total"), mismatches);
  const double leaked = c.WaitBalanced({"decode-0", "prefill-0"});
  EXPECT_EQ(leaked, 0);
  Report("corrupted KV bytes", "one byte flipped in every 2nd received transfer (test hook)",
         completed, failed, lost, leaked,
         absl::StrCat(mismatches, " caught by the checksums, recomputed locally"));
}

}  // namespace
}  // namespace kvrelay

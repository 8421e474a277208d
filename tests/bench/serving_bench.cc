// Serving through the router: kvrelay-router with one kvrelay-prefill and one
// kvrelay-decode worker as real processes (gRPC + UCX on 127.0.0.1), the ~134M-parameter
// bench model, a client of the public API (kvrelay.v1.Generation).
//
//   build/bin/serving_bench [--lengths 1024,2048] [--reps 3] [--cached 0.9] [--threads 1]
//
// For each prompt length: TTFT (client: request sent -> first token) of a cold prompt
// (nothing cached anywhere) and of a prompt whose first `cached` share was sent before
// (by a request that primes the caches; the router's index learns of it from the KV
// events, and the test waits for that), and their ratio. Fresh random prompts every rep.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "grpcpp/grpcpp.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
#include "kvrelay/v1/registry.grpc.pb.h"
#include "tests/bench/bench_model.h"
#include "tests/bench/bench_util.h"
#include "tests/testing/processes.h"

namespace kvrelay::bench {
namespace {

struct Timing {
  bool ok = false;
  double ttft = 0;
  v1::Final final;
};

Timing Run(v1::Generation::Stub& stub, const std::vector<int32_t>& prompt, int max_tokens) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(600));
  v1::GenerateRequest req;
  for (int32_t t : prompt) req.mutable_token_ids()->add_ids(t);
  req.mutable_sampling()->set_max_tokens(max_tokens);
  req.mutable_sampling()->set_ignore_eos(true);
  Timing t;
  const double t0 = NowSeconds();
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse m;
  bool first = true;
  while (reader->Read(&m)) {
    if (first && m.token_ids_size() > 0) {
      t.ttft = NowSeconds() - t0;
      first = false;
    }
    if (m.has_final()) t.final = m.final();
  }
  const grpc::Status st = reader->Finish();
  t.ok = st.ok();
  if (!st.ok()) std::fprintf(stderr, "request failed: %s\n", st.error_message().c_str());
  return t;
}

int64_t IndexedBlocks(v1::Registry::Stub& registry) {
  grpc::ClientContext ctx;
  v1::ListWorkersResponse r;
  if (!registry.ListWorkers(&ctx, v1::ListWorkersRequest(), &r).ok()) return -1;
  int64_t n = 0;
  for (const auto& w : r.workers()) {
    if (w.registration().role() == v1::WORKER_ROLE_DECODE) n += w.indexed_blocks();
  }
  return n;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Main(int argc, char** argv) {
  std::vector<int> lengths = {1024, 2048};
  int reps = 3;
  double cached = 0.9;
  std::string threads = "1";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--lengths") {
      lengths.clear();
      for (absl::string_view s : absl::StrSplit(v, ',')) {
        int n = 0;
        if (absl::SimpleAtoi(s, &n)) lengths.push_back(n);
      }
    }
    if (f == "--reps") (void)absl::SimpleAtoi(v, &reps);
    if (f == "--cached") (void)absl::SimpleAtod(v, &cached);
    if (f == "--threads") threads = v;
  }
  const std::string dir = EnsureBenchModel();
  testing::WorkerProcess router = testing::StartWorker("kvrelay-router", {"--model", dir});
  if (!router.process) return 1;
  // 2,048 blocks (2.4 GB of f32 KV) per worker: nothing is evicted during the run.
  const std::vector<std::string> worker = {"--model",     dir,    "--threads", threads,
                                           "--kv_blocks", "2048", "--router",  router.address()};
  testing::WorkerProcess p = testing::StartWorker("kvrelay-prefill", worker);
  testing::WorkerProcess d = testing::StartWorker("kvrelay-decode", worker);
  if (!p.process || !d.process) return 1;
  auto channel = grpc::CreateChannel(router.address(), grpc::InsecureChannelCredentials());
  auto gen = v1::Generation::NewStub(channel);
  auto registry = v1::Registry::NewStub(channel);
  uint32_t seed = 1;
  // Warm-up (and wait until both workers are registered: the first request succeeds).
  for (int i = 0; i < 100 && !Run(*gen, testing::RandomPrompt(300, seed++, 32000), 2).ok; ++i) {
    absl::SleepFor(absl::Milliseconds(100));
  }

  std::printf(
      "model: 12 layers, hidden 768, bf16 weights, f32 KV, block 16; %s thread(s) per "
      "worker; %d reps, medians; cached share %.2f\n\n",
      threads.c_str(), reps, cached);
  std::printf("%-7s %-14s %-14s %-8s %-22s %-22s\n", "prompt", "TTFT cold (ms)", "TTFT warm (ms)",
              "w/c", "cold: mode / cached", "warm: mode / cached");
  for (int n : lengths) {
    std::vector<double> cold, warm;
    v1::Final cold_final, warm_final;
    for (int r = 0; r < reps; ++r) {
      // Each request's full blocks reach the router's index (the pools are large enough
      // that nothing is evicted during the run, so the count only grows).
      auto run_and_index = [&](const std::vector<int32_t>& prompt) {
        const int64_t before = IndexedBlocks(*registry);
        Timing t = Run(*gen, prompt, 1);
        const int64_t want = before + static_cast<int64_t>(prompt.size()) / 16;
        for (int i = 0; i < 2000 && IndexedBlocks(*registry) < want; ++i) {
          absl::SleepFor(absl::Milliseconds(5));
        }
        return t;
      };
      const Timing c = run_and_index(testing::RandomPrompt(n, seed++, 32000));
      // Prime the caches with the first `cached` share.
      const int prefix_len = static_cast<int>(n * cached);
      std::vector<int32_t> prompt = testing::RandomPrompt(prefix_len, seed++, 32000);
      const Timing prime = run_and_index(prompt);
      const std::vector<int32_t> tail = testing::RandomPrompt(n - prefix_len, seed++, 32000);
      prompt.insert(prompt.end(), tail.begin(), tail.end());
      const Timing w = Run(*gen, prompt, 1);
      if (!c.ok || !prime.ok || !w.ok) return 1;
      cold.push_back(c.ttft);
      warm.push_back(w.ttft);
      cold_final = c.final;
      warm_final = w.final;
    }
    auto mode = [](const v1::Final& f) {
      return std::string(f.route().prefill_mode() == v1::PREFILL_MODE_REMOTE ? "remote" : "local") +
             " / " + std::to_string(f.usage().cached_tokens());
    };
    std::printf("%-7d %-14.1f %-14.1f %-8.3f %-22s %-22s\n", n, Median(cold) * 1e3,
                Median(warm) * 1e3, Median(warm) / Median(cold), mode(cold_final).c_str(),
                mode(warm_final).c_str());
  }
  return 0;
}

}  // namespace
}  // namespace kvrelay::bench

int main(int argc, char** argv) { return kvrelay::bench::Main(argc, argv); }

// Disaggregated serving benchmark: kvrelay-prefill and kvrelay-decode as real processes
// (gRPC + UCX on 127.0.0.1) with the ~134M-parameter bench model.
//
//   build/bin/worker_bench [--lengths 128,256,512,1024,2048] [--reps 3]
//                          [--concurrency 1,4,16] [--decode-tokens 64] [--threads 1]
//                          [--prefill-chunk 256]
//
// 1. TTFT (client: request sent -> first token received) with remote prefill vs local
//    prefill, per prompt length, with the time spent moving KV (transfer: first write
//    issued to last write complete, overlapping the chunked prefill; not overlapped: end of
//    the computation to last write complete) and that part's share of the remote TTFT.
//    Fresh random prompts every time: no prefix hits.
// 2. Decode throughput: N concurrent requests (32-token prompts, local prefill, greedy,
//    --decode-tokens each); tokens/s = all generated tokens / wall time.
// Each worker gets --threads CPU threads (default 1: the two workers then share the two
// cores of the CI machine instead of fighting over them).
#include <signal.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "grpcpp/grpcpp.h"
#include "kvrelay/v1/worker.grpc.pb.h"
#include "tests/bench/bench_model.h"
#include "tests/bench/bench_util.h"
#include "tests/testing/processes.h"

namespace kvrelay::bench {
namespace {

std::vector<int> Ints(const std::string& csv) {
  std::vector<int> out;
  for (absl::string_view s : absl::StrSplit(csv, ',')) {
    int v = 0;
    if (absl::SimpleAtoi(s, &v)) out.push_back(v);
  }
  return out;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Timing {
  bool ok = false;
  double ttft = 0;   // seconds
  double total = 0;  // seconds
  int64_t tokens = 0;
  v1::DecodeUsage usage;
};

Timing Run(v1::DecodeWorker::Stub& stub, const v1::DecodeRequest& req) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(600));
  Timing t;
  const double t0 = NowSeconds();
  auto reader = stub.Generate(&ctx, req);
  v1::DecodeResponse m;
  while (reader->Read(&m)) {
    if (t.tokens == 0 && m.token_ids_size() > 0) t.ttft = NowSeconds() - t0;
    t.tokens += m.token_ids_size();
    if (m.has_usage()) t.usage = m.usage();
  }
  t.total = NowSeconds() - t0;
  const grpc::Status st = reader->Finish();
  t.ok = st.ok();
  if (!st.ok()) std::fprintf(stderr, "request failed: %s\n", st.error_message().c_str());
  return t;
}

v1::DecodeRequest Request(const std::string& id, const std::vector<int32_t>& prompt, int max_tokens,
                          const std::string& prefill_address) {
  v1::DecodeRequest r;
  r.set_request_id(id);
  for (int32_t t : prompt) r.add_prompt_token_ids(t);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  if (!prefill_address.empty()) {
    r.mutable_plan()->set_mode(v1::PREFILL_MODE_REMOTE);
    r.mutable_plan()->set_prefill_address(prefill_address);
  } else {
    r.mutable_plan()->set_mode(v1::PREFILL_MODE_LOCAL);
  }
  return r;
}

int Main(int argc, char** argv) {
  std::vector<int> lengths = {128, 256, 512, 1024, 2048}, concurrency = {1, 4, 16};
  int reps = 3, decode_tokens = 64;
  std::string threads = "1", prefill_chunk = "256";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--lengths") lengths = Ints(v);
    if (f == "--concurrency") concurrency = Ints(v);
    if (f == "--reps") (void)absl::SimpleAtoi(v, &reps);
    if (f == "--decode-tokens") (void)absl::SimpleAtoi(v, &decode_tokens);
    if (f == "--threads") threads = v;
    if (f == "--prefill-chunk") prefill_chunk = v;
  }
  const std::string dir = EnsureBenchModel();
  const std::string blocks = "1024";  // 16K tokens per worker
  testing::WorkerProcess p =
      testing::StartWorker("kvrelay-prefill", {"--model", dir, "--threads", threads, "--kv_blocks",
                                               blocks, "--prefill_chunk", prefill_chunk});
  testing::WorkerProcess d =
      testing::StartWorker("kvrelay-decode", {"--model", dir, "--threads", threads, "--kv_blocks",
                                              blocks, "--prefill_chunk", prefill_chunk});
  if (!p.process || !d.process) return 1;
  auto stub = v1::DecodeWorker::NewStub(
      grpc::CreateChannel(d.address(), grpc::InsecureChannelCredentials()));
  uint32_t seed = 1;
  // Warm-up: connections, UCX endpoints, first-touch of pages.
  Run(*stub, Request("warm-r", testing::RandomPrompt(64, seed++, 32000), 2, p.address()));
  Run(*stub, Request("warm-l", testing::RandomPrompt(64, seed++, 32000), 2, ""));

  std::printf(
      "model: 12 layers, hidden 768, bf16 weights, f32 KV, block 16; %s thread(s) per "
      "worker; %d reps, medians\n\n",
      threads.c_str(), reps);
  std::printf("%-7s %-12s %-12s %-8s %-14s %-14s %-8s %s\n", "prompt", "TTFT remote", "TTFT local",
              "r/l", "transfer (ms)", "not overlapped", "share", "KV bytes");
  int id = 0;
  for (int n : lengths) {
    std::vector<double> remote, local, transfer, wait;
    uint64_t bytes = 0;
    for (int r = 0; r < reps; ++r) {
      const Timing tr =
          Run(*stub, Request("r" + std::to_string(id++), testing::RandomPrompt(n, seed++, 32000), 1,
                             p.address()));
      const Timing tl = Run(*stub, Request("l" + std::to_string(id++),
                                           testing::RandomPrompt(n, seed++, 32000), 1, ""));
      if (!tr.ok || !tl.ok || tr.usage.prefill_mode() != v1::PREFILL_MODE_REMOTE) return 1;
      remote.push_back(tr.ttft);
      local.push_back(tl.ttft);
      transfer.push_back(tr.usage.transfer_seconds());
      wait.push_back(tr.usage.transfer_wait_seconds());
      bytes = tr.usage.transfer_bytes();
    }
    const double rm = Median(remote), lm = Median(local), xm = Median(transfer), wm = Median(wait);
    std::printf("%-7d %-12.1f %-12.1f %-8.3f %-14.2f %-14.2f %-8.4f %.1f MiB\n", n, rm * 1e3,
                lm * 1e3, rm / lm, xm * 1e3, wm * 1e3, wm / rm, bytes / 1048576.0);
    std::fflush(stdout);
  }

  std::printf("\n%-12s %-12s %-14s %s\n", "concurrency", "tokens/s", "vs 1 request", "wall (s)");
  double single = 0;
  for (int c : concurrency) {
    std::vector<Timing> t(c);
    std::vector<std::thread> clients;
    const double t0 = NowSeconds();
    for (int i = 0; i < c; ++i) {
      clients.emplace_back([&, i, s = seed++] {
        t[i] = Run(*stub, Request("c" + std::to_string(id + i), testing::RandomPrompt(32, s, 32000),
                                  decode_tokens, ""));
      });
    }
    for (auto& th : clients) th.join();
    id += c;
    const double wall = NowSeconds() - t0;
    int64_t tokens = 0;
    for (const Timing& x : t) {
      if (!x.ok) return 1;
      tokens += x.tokens;
    }
    const double tps = tokens / wall;
    if (single == 0) single = tps;
    std::printf("%-12d %-12.1f %-14.2f %.2f\n", c, tps, tps / single, wall);
    std::fflush(stdout);
  }
  p.process->Kill(SIGTERM);
  d.process->Kill(SIGTERM);
  p.process->Wait(testing::kProcessTimeout);
  d.process->Wait(testing::kProcessTimeout);
  return 0;
}

}  // namespace
}  // namespace kvrelay::bench

int main(int argc, char** argv) { return kvrelay::bench::Main(argc, argv); }

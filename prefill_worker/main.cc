// kvrelay-prefill: a prefill worker. Prints "READY <port>" once it serves; SIGTERM or
// SIGINT lets running prefills finish (up to --drain_seconds) and exits.
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/metrics/metrics.h"
#include "common/util/stop_signal.h"
#include "prefill_worker/prefill_worker.h"

ABSL_FLAG(std::string, model, "", "Hugging Face model folder (required)");
ABSL_FLAG(std::string, model_id, "", "model id in block hashes (default: the folder's name)");
ABSL_FLAG(std::string, listen, "127.0.0.1:0", "host:port to serve on (port 0: any free port)");
ABSL_FLAG(int64_t, kv_blocks, 0, "KV pool size in blocks (0: use --kv_bytes)");
ABSL_FLAG(uint64_t, kv_bytes, 0, "KV pool size in bytes (0 with --kv_blocks 0: 4 contexts)");
ABSL_FLAG(int, block_size, 16, "tokens per KV block (must match the decode workers)");
ABSL_FLAG(std::string, kv_dtype, "f32", "KV dtype: f32 | f16 | bf16 | int8 (must match)");
ABSL_FLAG(std::string, device, "auto",
          "where the forward pass runs: cpu | cuda | auto (cuda when built with CUDA and a GPU is "
          "found, else cpu)");
ABSL_FLAG(bool, cuda_split_k_decode, false,
          "cuda: decode steps through the split-K flash-decoding kernel (faster at long contexts; "
          "a token's last bits may then differ between a decode step and a prefill chunk)");
ABSL_FLAG(int, threads, 0, "CPU threads for the forward pass on the cpu device (0: all cores)");
ABSL_FLAG(int, prefill_chunk, 256, "tokens per prefill forward pass");
ABSL_FLAG(int, max_queue, 256, "queued prefills beyond this get RESOURCE_EXHAUSTED");
ABSL_FLAG(uint64_t, transfer_chunk_bytes, 512 << 10, "KV puts larger than this are split");
ABSL_FLAG(int, transfer_max_in_flight, 8, "KV put chunks outstanding at once");
ABSL_FLAG(double, transfer_timeout_seconds, 30, "one KV write, issue to remote completion");
ABSL_FLAG(std::string, router, "",
          "routers to register with: host:port[,...]; dns:///host:port means every address the "
          "name resolves to, e.g. a headless Service (empty: none)");
ABSL_FLAG(double, router_resolve_seconds, 10,
          "how often dns:///host:port --router entries are resolved again");
ABSL_FLAG(std::string, worker_id, "",
          "this worker's id in the registry (default: prefill-HOST:PORT)");
ABSL_FLAG(std::string, advertise_host, "127.0.0.1",
          "host routers and decode workers use to reach this worker");
ABSL_FLAG(std::string, metrics_listen, "",
          "host:port serving Prometheus /metrics (port 0: any free port; empty: off)");
ABSL_FLAG(double, drain_seconds, 30, "on SIGTERM, how long running prefills may finish");
ABSL_FLAG(double, exit_linger_seconds, 1,
          "after draining, how long connections stay open before the server closes them");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("kvrelay-prefill --model DIR [--listen HOST:PORT] ...");
  absl::ParseCommandLine(argc, argv);
  if (absl::Status s = kvrelay::InstallStopSignals(); !s.ok()) {
    std::fprintf(stderr, "kvrelay-prefill: %s\n", s.ToString().c_str());
    return 1;
  }

  kvrelay::prefill::PrefillWorkerOptions o;
  o.model_dir = absl::GetFlag(FLAGS_model);
  o.model_id = absl::GetFlag(FLAGS_model_id);
  o.listen = absl::GetFlag(FLAGS_listen);
  o.kv.kv_blocks = absl::GetFlag(FLAGS_kv_blocks);
  o.kv.kv_bytes = absl::GetFlag(FLAGS_kv_bytes);
  o.kv.block_size = absl::GetFlag(FLAGS_block_size);
  o.kv.kv_dtype = absl::GetFlag(FLAGS_kv_dtype);
  o.device = absl::GetFlag(FLAGS_device);
  o.backend.cuda_split_k_decode = absl::GetFlag(FLAGS_cuda_split_k_decode);
  o.threads = absl::GetFlag(FLAGS_threads);
  o.engine.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  o.engine.max_queue = static_cast<size_t>(std::max(1, absl::GetFlag(FLAGS_max_queue)));
  o.engine.transfer.chunk_bytes = absl::GetFlag(FLAGS_transfer_chunk_bytes);
  o.engine.transfer.max_in_flight = absl::GetFlag(FLAGS_transfer_max_in_flight);
  o.engine.transfer.timeout = absl::Seconds(absl::GetFlag(FLAGS_transfer_timeout_seconds));
  auto routers = kvrelay::rpc::ParseRouterList(absl::GetFlag(FLAGS_router), "--router");
  if (!routers.ok()) {
    std::fprintf(stderr, "kvrelay-prefill: %s\n", routers.status().ToString().c_str());
    return 2;
  }
  o.registry.routers = *routers;
  o.registry.worker_id = absl::GetFlag(FLAGS_worker_id);
  if (!(absl::GetFlag(FLAGS_router_resolve_seconds) > 0)) {
    std::fprintf(stderr, "kvrelay-prefill: --router_resolve_seconds must be > 0\n");
    return 2;
  }
  o.registry.resolve_interval = absl::Seconds(absl::GetFlag(FLAGS_router_resolve_seconds));
  o.registry.advertise_host = absl::GetFlag(FLAGS_advertise_host);
  auto registry = std::make_shared<prometheus::Registry>();
  o.metrics = registry;
  auto metrics =
      kvrelay::metrics::MetricsServer::StartFromFlag(absl::GetFlag(FLAGS_metrics_listen), registry);
  if (!metrics.ok()) {
    std::fprintf(stderr, "kvrelay-prefill: %s\n", metrics.status().ToString().c_str());
    return 2;
  }
  auto worker = kvrelay::prefill::PrefillWorker::Start(o);
  if (!worker.ok()) {
    std::fprintf(stderr, "kvrelay-prefill: %s\n", worker.status().ToString().c_str());
    return 1;
  }
  std::fprintf(stderr, "kvrelay-prefill: %s\n", (*worker)->device_note().c_str());
  std::printf("READY %d\n", (*worker)->port());
  std::fflush(stdout);
  const int sig = kvrelay::WaitForStopSignal();
  std::fprintf(stderr, "kvrelay-prefill: signal %d, draining\n", sig);
  (*worker)->Shutdown(absl::Seconds(absl::GetFlag(FLAGS_drain_seconds)),
                      absl::Seconds(absl::GetFlag(FLAGS_exit_linger_seconds)));
  worker->reset();
  return 0;
}

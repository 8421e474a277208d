// kvrelay-router: the router. Prints "READY <port>" once it serves; SIGTERM or SIGINT
// lets running requests finish (up to --drain_seconds) and exits. The flags every server
// process has (metrics, drain, TLS, cluster token) are in common/process/process_flags.cc.
#include <cmath>
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "common/process/process_flags.h"
#include "common/util/file.h"
#include "common/util/status.h"
#include "router/router.h"

ABSL_FLAG(std::string, model, "", "Hugging Face model folder: tokenizer and config (required)");
ABSL_FLAG(std::string, model_id, "", "model id in block hashes (default: the folder's name)");
ABSL_FLAG(std::string, chat_format, "",
          "chat template: chatml | llama3 | llama2 | mistral | gemma | plain (default: detected)");
ABSL_FLAG(int, block_size, 16, "tokens per KV block (must match the workers)");
ABSL_FLAG(std::string, listen, "127.0.0.1:0", "host:port to serve on (port 0: any free port)");
ABSL_FLAG(std::string, http_listen, "",
          "serve the OpenAI HTTP API on host:port (port 0: any free port; prints HTTP <port> "
          "before READY); empty: none");
ABSL_FLAG(std::string, http_tls_cert, "",
          "PEM certificate (chain) of the HTTP API, e.g. one a public CA signed (default: "
          "--tls_cert: the HTTP API speaks HTTPS whenever the router has a certificate)");
ABSL_FLAG(std::string, http_tls_key, "", "PEM private key of --http_tls_cert");
ABSL_FLAG(bool, http_plaintext, false,
          "serve the HTTP API without TLS even though the router has a certificate (TLS "
          "ended in front of it, e.g. by an ingress or a mesh sidecar)");
ABSL_FLAG(double, http_request_timeout_seconds, 0,
          "deadline of each HTTP API request; past it: 504 (0: none)");
ABSL_FLAG(int, http_threads, 128, "HTTP connections served at once (a stream holds one)");
ABSL_FLAG(std::string, api_keys_file, "",
          "API keys, one per line, required on the public API (gRPC metadata and HTTP "
          "'authorization: Bearer KEY'); empty: open");
ABSL_FLAG(std::string, router_id, "", "this router's id (default: random)");
ABSL_FLAG(int, max_running, 64, "requests served at once");
ABSL_FLAG(int, max_queued, 1024, "requests waiting beyond this get RESOURCE_EXHAUSTED");
ABSL_FLAG(double, max_queue_seconds, 0,
          "requests waiting longer than this for a runner get RESOURCE_EXHAUSTED (0: no limit)");
ABSL_FLAG(int, migration_limit, 2, "times a request may move to another decode worker");
ABSL_FLAG(int, max_request_bytes, 4 << 20, "largest request message accepted");
ABSL_FLAG(int, heartbeat_interval_ms, 500, "workers report load at least this often");
ABSL_FLAG(int, heartbeat_timeout_ms, 5000, "a worker silent this long is dead");
ABSL_FLAG(int, max_workers, kvrelay::router::PrefixIndex::kDefaultMaxWorkers,
          "workers this router tracks (live and dead); more registrations are refused");
ABSL_FLAG(double, overlap_weight, 1.0, "routing cost of each prompt block a worker lacks");
ABSL_FLAG(double, host_hit_cost, 0.05,
          "routing cost of a prompt block a worker holds only in its host-memory KV tier, as a "
          "fraction of a block it lacks (0: as good as a KV pool hit, 1: no better than a miss)");
ABSL_FLAG(double, disk_hit_cost, 0.2,
          "routing cost of a prompt block a worker holds only in its disk KV tier, as a "
          "fraction of a block it lacks");
ABSL_FLAG(double, decode_busy_threshold, 0.95, "decode workers above this KV use are avoided");
ABSL_FLAG(int64_t, decode_max_waiting, 64, "decode workers with more waiting are avoided");
ABSL_FLAG(double, decode_max_load_ratio, 0,
          "decode workers with more active KV blocks than this times the fleet mean are "
          "avoided (0: off; else >= 1)");
ABSL_FLAG(int64_t, prefill_max_queued_tokens, 65536, "prefill workers above this are avoided");
ABSL_FLAG(int64_t, local_prefill_max_tokens, 256,
          "prefill on the decode worker when fewer prompt tokens are uncached");
ABSL_FLAG(double, local_prefill_max_ratio, 0.0,
          "... or when uncached / prompt tokens is below this (0: off)");

namespace {

// The HTTP API's certificate and key, PEM, from --http_tls_cert/--http_tls_key, else
// the router's own (--tls_cert/--tls_key); none with --http_plaintext.
absl::Status HttpTls(const kvrelay::rpc::Security& security, kvrelay::router::RouterOptions& o) {
  const std::string cert = absl::GetFlag(FLAGS_http_tls_cert);
  const std::string key = absl::GetFlag(FLAGS_http_tls_key);
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError("--http_tls_cert and --http_tls_key go together");
  }
  if (absl::GetFlag(FLAGS_http_plaintext)) {
    if (!cert.empty()) {
      return absl::InvalidArgumentError("--http_plaintext contradicts --http_tls_cert");
    }
    return absl::OkStatus();
  }
  if (cert.empty()) {
    o.http_tls_cert_pem = security.cert_pem();
    o.http_tls_key_pem = security.key_pem();
    return absl::OkStatus();
  }
  KVR_ASSIGN_OR_RETURN(o.http_tls_cert_pem, kvrelay::ReadFile(cert));
  KVR_ASSIGN_OR_RETURN(o.http_tls_key_pem, kvrelay::ReadFile(key));
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  namespace process = kvrelay::process;
  absl::StatusOr<process::Process> p = process::SetUp(
      "kvrelay-router", "kvrelay-router --model DIR [--listen HOST:PORT] ...", argc, argv);
  if (!p.ok()) return process::Failed("kvrelay-router", p.status());

  kvrelay::router::RouterOptions o;
  o.model_dir = absl::GetFlag(FLAGS_model);
  o.model_id = absl::GetFlag(FLAGS_model_id);
  o.chat_format = absl::GetFlag(FLAGS_chat_format);
  o.block_size = absl::GetFlag(FLAGS_block_size);
  o.listen = absl::GetFlag(FLAGS_listen);
  o.router_id = absl::GetFlag(FLAGS_router_id);
  o.http_listen = absl::GetFlag(FLAGS_http_listen);
  o.http_threads = absl::GetFlag(FLAGS_http_threads);
  if (const absl::Status st = HttpTls(p->security, o); !st.ok()) return p->Fail(st);
  if (!o.http_listen.empty()) {
    std::fprintf(stderr, "kvrelay-router: HTTP API %s\n",
                 o.http_tls_cert_pem.empty() ? "plaintext (http)" : "https");
  }
  if (const double t = absl::GetFlag(FLAGS_http_request_timeout_seconds);
      !std::isfinite(t) || t < 0) {
    std::fprintf(stderr, "kvrelay-router: --http_request_timeout_seconds must be >= 0, got %g\n",
                 t);
    return 2;
  } else {
    o.http_request_timeout = absl::Seconds(t);
  }
  if (const std::string keys = absl::GetFlag(FLAGS_api_keys_file); !keys.empty()) {
    absl::StatusOr<kvrelay::router::ApiKeys> k = kvrelay::router::ApiKeys::Load(keys);
    if (!k.ok()) {
      std::fprintf(stderr, "kvrelay-router: %s\n", k.status().ToString().c_str());
      return 2;
    }
    o.api_keys = *std::move(k);
    std::fprintf(stderr, "kvrelay-router: %zu API keys required on the public API\n",
                 o.api_keys.size());
  } else {
    std::fprintf(stderr,
                 "kvrelay-router: warning: no --api_keys_file: the public API is open to anyone "
                 "who can reach it\n");
  }
  o.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  o.heartbeat_interval = absl::Milliseconds(absl::GetFlag(FLAGS_heartbeat_interval_ms));
  o.heartbeat_timeout = absl::Milliseconds(absl::GetFlag(FLAGS_heartbeat_timeout_ms));
  o.max_workers = absl::GetFlag(FLAGS_max_workers);
  o.generation.max_running = absl::GetFlag(FLAGS_max_running);
  o.generation.max_queued = static_cast<size_t>(std::max(0, absl::GetFlag(FLAGS_max_queued)));
  const double max_queue_seconds = absl::GetFlag(FLAGS_max_queue_seconds);
  if (!std::isfinite(max_queue_seconds) || max_queue_seconds < 0) {
    std::fprintf(stderr, "kvrelay-router: --max_queue_seconds must be >= 0, got %g\n",
                 max_queue_seconds);
    return 2;
  }
  o.generation.max_queue_time = absl::Seconds(max_queue_seconds);
  o.generation.migration_limit = absl::GetFlag(FLAGS_migration_limit);
  auto& s = o.generation.scheduler;
  s.overlap_weight = absl::GetFlag(FLAGS_overlap_weight);
  s.host_hit_cost = absl::GetFlag(FLAGS_host_hit_cost);
  s.disk_hit_cost = absl::GetFlag(FLAGS_disk_hit_cost);
  s.decode_busy_threshold = absl::GetFlag(FLAGS_decode_busy_threshold);
  s.decode_max_waiting = absl::GetFlag(FLAGS_decode_max_waiting);
  s.decode_max_load_ratio = absl::GetFlag(FLAGS_decode_max_load_ratio);
  s.prefill_max_queued_tokens = absl::GetFlag(FLAGS_prefill_max_queued_tokens);
  s.local_prefill_max_tokens = absl::GetFlag(FLAGS_local_prefill_max_tokens);
  s.local_prefill_max_ratio = absl::GetFlag(FLAGS_local_prefill_max_ratio);
  o.metrics = p->metrics;
  o.security = p->security;
  auto router = kvrelay::router::Router::Start(o);
  if (!router.ok()) return p->Fail(router.status());
  if ((*router)->http_port() > 0) std::printf("HTTP %d\n", (*router)->http_port());
  const int code = p->ServeUntilStopped(
      (*router)->port(),
      [&](absl::Duration grace, absl::Duration linger) { (*router)->Shutdown(grace, linger); });
  router->reset();
  return code;
}

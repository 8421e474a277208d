// The OpenAI-compatible HTTP API of the router (issue 16), served with civetweb (the HTTP
// server prometheus-cpp already brings): POST /v1/completions, POST /v1/chat/completions,
// GET /v1/models, GET /health. A thin layer: each request becomes GenerateRequests sent
// through the router's own kvrelay.v1.Generation service over an in-process channel, so
// validation, routing, prefix reuse, migration, stop strings, cancellation and metrics
// are the gRPC path's. `stream: true` answers with Server-Sent Events, one event per
// token message, flushed as they come, then `data: [DONE]`; a client that disconnects
// cancels its request (the gRPC cancel path, down to the prefill worker).
//
// HTTPS: with a certificate and key (PEM) the port speaks TLS 1.2+ only (OpenSSL, which
// civetweb loads at run time); clients need no certificate of their own (the public
// API's authentication is its API keys).
//
// Metrics: kvrelay_http_requests_total{endpoint,status}, kvrelay_http_requests_in_flight.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/channel.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "router/api_keys.h"
#include "router/model_context.h"
#include "router/openai_api.h"

struct mg_context;
struct mg_connection;

namespace kvrelay::router {

struct OpenAIServerOptions {
  std::string listen = "127.0.0.1:0";  // host:port (port 0: any free port)
  size_t max_body_bytes = 4 << 20;     // larger bodies: 413
  int threads = 128;                   // connections served at once (a stream holds one)
  ApiKeys keys;                        // none: open
  // Each request's deadline (its gRPC calls'); past it: 504. Zero: none (OpenAI's API
  // has no deadline of its own).
  absl::Duration request_timeout = absl::ZeroDuration();
  // HTTPS: the certificate (chain, leaf first) and its private key, PEM; both empty:
  // plaintext HTTP.
  std::string tls_cert_pem, tls_key_pem;
};

class OpenAIServer {
 public:
  // `generation`: a channel to this router's kvrelay.v1.Generation (in-process).
  // INVALID_ARGUMENT for a bad listen address or TLS material (a certificate without its
  // key, PEM that does not parse, a key that does not match), UNAVAILABLE when it cannot
  // listen (or, for HTTPS, when civetweb cannot load OpenSSL).
  static absl::StatusOr<std::unique_ptr<OpenAIServer>> Start(
      const OpenAIServerOptions& options, std::shared_ptr<grpc::Channel> generation,
      const ModelContext* model, std::shared_ptr<prometheus::Registry> metrics);
  ~OpenAIServer();  // stops listening; waits for the requests in flight

  int port() const { return port_; }
  bool tls() const { return !options_.tls_cert_pem.empty(); }

 private:
  OpenAIServer() = default;
  static int Handle(mg_connection* conn, void* self);
  static int InitTls(void* ssl_ctx, void* self);  // civetweb's init_ssl: loads the PEM
  static int Log(const mg_connection* conn, const char* message);
  int Serve(mg_connection* conn);
  void Reply(mg_connection* conn, int status, const std::string& body, const std::string& endpoint);
  void ReplyError(mg_connection* conn, const openai::Error& e, const std::string& endpoint);
  void Generate(mg_connection* conn, openai::Kind kind, const std::string& body,
                const std::string& authorization, const std::string& endpoint);
  void Count(const std::string& endpoint, int status);

  OpenAIServerOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  const ModelContext* model_ = nullptr;
  std::shared_ptr<prometheus::Registry> metrics_;
  prometheus::Family<prometheus::Counter>* requests_ = nullptr;
  prometheus::Gauge* in_flight_ = nullptr;
  mg_context* ctx_ = nullptr;
  int port_ = 0;
  int64_t created_ = 0;               // the model's "created" (server start, unix seconds)
  std::atomic<bool> started_{false};  // mg_start returned
  absl::Mutex log_mu_;                // civetweb logs from its threads
  std::string start_error_ ABSL_GUARDED_BY(log_mu_);  // what it logged while starting
};

}  // namespace kvrelay::router

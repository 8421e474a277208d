#include "router/openai_server.h"

#include <civetweb.h>
#include <dlfcn.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <unistd.h>

#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/util/status.h"
#include "grpcpp/client_context.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"

namespace kvrelay::router {
namespace {

// An OpenSSL error queue's last reason, e.g. "key values mismatch".
std::string SslError() {
  const unsigned long e = ERR_get_error();  // NOLINT(runtime/int): OpenSSL's type
  ERR_clear_error();
  if (e == 0) return "unknown error";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  return buf;
}

// Puts the certificate chain (leaf first) and key into `ctx`, TLS 1.2 or newer only.
absl::Status LoadTlsMaterial(SSL_CTX* ctx, const std::string& cert_pem,
                             const std::string& key_pem) {
  std::unique_ptr<BIO, decltype(&BIO_free)> certs(
      BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size())), &BIO_free);
  X509* leaf = PEM_read_bio_X509(certs.get(), nullptr, nullptr, nullptr);
  if (leaf == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("HTTPS certificate is not a PEM certificate: ", SslError()));
  }
  const int used = SSL_CTX_use_certificate(ctx, leaf);
  X509_free(leaf);
  if (used != 1) return absl::InvalidArgumentError(absl::StrCat("HTTPS certificate: ", SslError()));
  SSL_CTX_clear_chain_certs(ctx);
  while (X509* ca = PEM_read_bio_X509(certs.get(), nullptr, nullptr, nullptr)) {
    if (SSL_CTX_add0_chain_cert(ctx, ca) != 1) {  // takes `ca` on success
      X509_free(ca);
      return absl::InvalidArgumentError(absl::StrCat("HTTPS certificate chain: ", SslError()));
    }
  }
  ERR_clear_error();  // the end of the chain reads as "no start line"
  std::unique_ptr<BIO, decltype(&BIO_free)> key_bio(
      BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size())), &BIO_free);
  EVP_PKEY* key = PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr);
  if (key == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("HTTPS key is not a PEM private key: ", SslError()));
  }
  const int key_used = SSL_CTX_use_PrivateKey(ctx, key);
  EVP_PKEY_free(key);
  if (key_used != 1 || SSL_CTX_check_private_key(ctx) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("HTTPS key does not match the certificate: ", SslError()));
  }
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1) {
    return absl::InternalError(absl::StrCat("HTTPS: cannot require TLS 1.2: ", SslError()));
  }
  return absl::OkStatus();
}

// Loads router/civetweb_openssl's shims (once): afterwards civetweb's dlopen("libssl.so")
// and dlopen("libcrypto.so") get OpenSSL 3 with what civetweb 1.15 expects of it.
absl::Status LoadOpenSslForCivetweb() {
  static const absl::Status* loaded = [] {
    char exe[4096];
    const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n <= 0) return new absl::Status(absl::InternalError("cannot read /proc/self/exe"));
    const std::string path(exe, static_cast<size_t>(n));
    const std::string dir = absl::StrCat(path.substr(0, path.rfind('/')), "/../lib/kvrelay/");
    for (const char* shim : {"libkvrelay_civetweb_crypto.so", "libkvrelay_civetweb_ssl.so"}) {
      const std::string file = dir + shim;
      if (::dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL) == nullptr) {  // kept for good
        return new absl::Status(
            absl::UnavailableError(absl::StrCat("HTTPS: cannot load ", file, ": ", ::dlerror())));
      }
    }
    return new absl::Status();
  }();
  return *loaded;
}

// LoadTlsMaterial on a scratch context: bad PEM is INVALID_ARGUMENT before civetweb starts.
absl::Status CheckTlsMaterial(const std::string& cert_pem, const std::string& key_pem) {
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(SSL_CTX_new(TLS_server_method()),
                                                        &SSL_CTX_free);
  if (ctx == nullptr) return absl::InternalError(absl::StrCat("HTTPS: ", SslError()));
  return LoadTlsMaterial(ctx.get(), cert_pem, key_pem);
}

using nlohmann::json;

const char* StatusText(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 413:
      return "Payload Too Large";
    case 429:
      return "Too Many Requests";
    case 500:
      return "Internal Server Error";
    case 503:
      return "Service Unavailable";
    case 504:
      return "Gateway Timeout";
    default:
      return "Error";
  }
}

bool WriteAll(mg_connection* conn, const std::string& s) {
  return mg_write(conn, s.data(), s.size()) == static_cast<int>(s.size());
}

std::string RandomHex() {
  thread_local std::mt19937_64 rng(std::random_device{}());
  return absl::StrCat(absl::Hex(rng(), absl::kZeroPad16));
}

// The endpoint label: the known paths, "other" for the rest (bounded cardinality).
std::string EndpointOf(const std::string& uri) {
  for (const char* e : {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}) {
    if (uri == e) return e;
  }
  return "other";
}

}  // namespace

absl::StatusOr<std::unique_ptr<OpenAIServer>> OpenAIServer::Start(
    const OpenAIServerOptions& options, std::shared_ptr<grpc::Channel> generation,
    const ModelContext* model, std::shared_ptr<prometheus::Registry> metrics) {
  const size_t colon = options.listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(options.listen.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http_listen must be HOST:PORT, got '", options.listen, "'"));
  }
  if (options.threads < 1) return absl::InvalidArgumentError("--http_threads must be >= 1");
  const bool tls = !options.tls_cert_pem.empty();
  if (tls != !options.tls_key_pem.empty()) {
    return absl::InvalidArgumentError("HTTPS needs both a certificate and its private key");
  }
  if (tls) KVR_RETURN_IF_ERROR(CheckTlsMaterial(options.tls_cert_pem, options.tls_key_pem));
  std::unique_ptr<OpenAIServer> s(new OpenAIServer());
  s->options_ = options;
  s->channel_ = std::move(generation);
  s->model_ = model;
  s->metrics_ = metrics != nullptr ? std::move(metrics) : std::make_shared<prometheus::Registry>();
  s->requests_ = &prometheus::BuildCounter()
                      .Name("kvrelay_http_requests_total")
                      .Help("OpenAI HTTP API requests by endpoint and HTTP status")
                      .Register(*s->metrics_);
  s->in_flight_ = &prometheus::BuildGauge()
                       .Name("kvrelay_http_requests_in_flight")
                       .Help("OpenAI HTTP API requests being served")
                       .Register(*s->metrics_)
                       .Add({});
  s->created_ = absl::ToUnixSeconds(absl::Now());

  if (tls) KVR_RETURN_IF_ERROR(LoadOpenSslForCivetweb());
  mg_init_library(tls ? MG_FEATURES_SSL : 0);
  const std::string threads = std::to_string(options.threads);
  // civetweb marks a TLS port with a trailing 's'.
  const std::string listening = tls ? options.listen + "s" : options.listen;
  std::vector<const char*> opts = {"listening_ports", listening.c_str(), "num_threads",
                                   threads.c_str(), "enable_keep_alive", "no",
                                   // A stream may be idle between tokens for a long prefill.
                                   "request_timeout_ms", "3600000"};
  if (tls) {
    opts.insert(opts.end(), {"ssl_protocol_version", "4"});  // TLS 1.2 and newer
  }
  opts.push_back(nullptr);
  mg_callbacks callbacks{};
  callbacks.log_message = &OpenAIServer::Log;
  if (tls) callbacks.init_ssl = &OpenAIServer::InitTls;
  s->ctx_ = mg_start(&callbacks, s.get(), opts.data());
  if (s->ctx_ == nullptr) {
    mg_exit_library();
    absl::MutexLock l(&s->log_mu_);
    return absl::UnavailableError(absl::StrCat("cannot serve ", tls ? "HTTPS" : "HTTP", " on ",
                                               options.listen, s->start_error_.empty() ? "" : ": ",
                                               s->start_error_));
  }
  s->started_ = true;
  mg_server_port ports[4];
  const int n = mg_get_server_ports(s->ctx_, 4, ports);
  if (n < 1) return absl::InternalError("civetweb reports no listening port");
  s->port_ = ports[0].port;
  mg_set_request_handler(s->ctx_, "/", &OpenAIServer::Handle, s.get());
  return s;
}

OpenAIServer::~OpenAIServer() {
  if (ctx_ != nullptr) {
    mg_stop(ctx_);
    mg_exit_library();
  }
}

int OpenAIServer::InitTls(void* ssl_ctx, void* self) {
  const OpenAIServerOptions& o = static_cast<OpenAIServer*>(self)->options_;
  const absl::Status st =
      LoadTlsMaterial(static_cast<SSL_CTX*>(ssl_ctx), o.tls_cert_pem, o.tls_key_pem);
  if (!st.ok()) {
    auto* server = static_cast<OpenAIServer*>(self);
    absl::MutexLock l(&server->log_mu_);
    server->start_error_ = std::string(st.message());
    return -1;
  }
  return 1;  // the certificate is set up: civetweb needs no ssl_certificate file
}

int OpenAIServer::Log(const mg_connection* conn, const char* message) {
  const mg_context* ctx = conn != nullptr ? mg_get_context(conn) : nullptr;
  auto* self = ctx != nullptr ? static_cast<OpenAIServer*>(mg_get_user_data(ctx)) : nullptr;
  if (self == nullptr || self->started_.load()) return 0;  // civetweb's default: no log
  absl::MutexLock l(&self->log_mu_);
  // The first is the cause (e.g. InitTls's); civetweb's own summary follows it.
  if (self->start_error_.empty()) self->start_error_ = message;
  return 1;
}

int OpenAIServer::Handle(mg_connection* conn, void* self) {
  return static_cast<OpenAIServer*>(self)->Serve(conn);
}

void OpenAIServer::Count(const std::string& endpoint, int status) {
  requests_->Add({{"endpoint", endpoint}, {"status", std::to_string(status)}}).Increment();
}

void OpenAIServer::Reply(mg_connection* conn, int status, const std::string& body,
                         const std::string& endpoint) {
  Count(endpoint, status);
  WriteAll(conn, absl::StrCat("HTTP/1.1 ", status, " ", StatusText(status),
                              "\r\nContent-Type: application/json\r\nContent-Length: ", body.size(),
                              "\r\nConnection: close\r\n\r\n", body));
}

void OpenAIServer::ReplyError(mg_connection* conn, const openai::Error& e,
                              const std::string& endpoint) {
  Reply(conn, e.http_status, openai::ErrorJson(e), endpoint);
}

int OpenAIServer::Serve(mg_connection* conn) {
  const mg_request_info* ri = mg_get_request_info(conn);
  const std::string method = ri->request_method != nullptr ? ri->request_method : "";
  const std::string uri = ri->local_uri != nullptr ? ri->local_uri : "";
  const std::string endpoint = EndpointOf(uri);
  in_flight_->Increment();
  struct Done {
    prometheus::Gauge* g;
    ~Done() { g->Decrement(); }
  } done{in_flight_};

  auto error = [&](int status, const std::string& message, const std::string& type,
                   const std::string& code = "") {
    openai::Error e;
    e.http_status = status;
    e.message = message;
    e.type = type;
    e.code = code;
    ReplyError(conn, e, endpoint);
    return status;
  };
  if (endpoint == "/health") {
    if (method != "GET") return error(405, "use GET /health", "invalid_request_error");
    Reply(conn, 200, "{}", endpoint);
    return 200;
  }
  if (endpoint == "other") {
    return error(404, absl::StrCat("no such endpoint: ", method, " ", uri),
                 "invalid_request_error");
  }
  const char* auth_header = mg_get_header(conn, "Authorization");
  const std::string authorization = auth_header != nullptr ? auth_header : "";
  if (!options_.keys.Allows(authorization)) {
    return error(401,
                 authorization.empty() ? "missing API key: send 'Authorization: Bearer KEY'"
                                       : "incorrect API key provided",
                 "invalid_request_error", "invalid_api_key");
  }
  if (endpoint == "/v1/models") {
    if (method != "GET") return error(405, "use GET /v1/models", "invalid_request_error");
    Reply(conn, 200, openai::ModelsResponse(model_->model_id, created_).dump(), endpoint);
    return 200;
  }
  if (method != "POST") {
    return error(405, absl::StrCat("use POST ", endpoint), "invalid_request_error");
  }
  // The body, refused beyond max_body_bytes (declared or actual).
  if (ri->content_length > static_cast<long long>(options_.max_body_bytes)) {
    return error(413,
                 absl::StrCat("the request body has ", ri->content_length, " bytes; the limit is ",
                              options_.max_body_bytes),
                 "invalid_request_error");
  }
  std::string body;
  char buf[16384];
  while (true) {
    const int r = mg_read(conn, buf, sizeof(buf));
    if (r <= 0) break;
    body.append(buf, static_cast<size_t>(r));
    if (body.size() > options_.max_body_bytes) {
      return error(
          413,
          absl::StrCat("the request body is over the limit of ", options_.max_body_bytes, " bytes"),
          "invalid_request_error");
    }
  }
  Generate(conn,
           endpoint == "/v1/chat/completions" ? openai::Kind::kChat : openai::Kind::kCompletion,
           body, authorization, endpoint);
  return 200;
}

void OpenAIServer::Generate(mg_connection* conn, openai::Kind kind, const std::string& body,
                            const std::string& authorization, const std::string& endpoint) {
  std::variant<openai::Request, openai::Error> parsed = openai::ParseRequest(kind, body);
  if (auto* e = std::get_if<openai::Error>(&parsed)) return ReplyError(conn, *e, endpoint);
  const openai::Request& r = std::get<openai::Request>(parsed);
  const std::string id =
      absl::StrCat(kind == openai::Kind::kChat ? "chatcmpl-" : "cmpl-", RandomHex());
  const std::string model = r.model.empty() ? model_->model_id : r.model;
  const int64_t created = absl::ToUnixSeconds(absl::Now());
  const openai::TokenText token_text = [this](int32_t t) {
    return model_->tokenizer->Decode({t}, /*skip_special_tokens=*/false);
  };
  auto stub = v1::Generation::NewStub(channel_);
  const std::optional<absl::Time> deadline =
      options_.request_timeout > absl::ZeroDuration()
          ? std::optional<absl::Time>(absl::Now() + options_.request_timeout)
          : std::nullopt;
  // Prompt i's gRPC call, with the client's key and the request's deadline.
  auto call = [&](size_t i, grpc::ClientContext* ctx) {
    if (!authorization.empty()) ctx->AddMetadata("authorization", authorization);
    if (deadline) ctx->set_deadline(absl::ToChronoTime(*deadline));
    return stub->Generate(ctx, r.prompts[i]);
  };
  // Adds one response message to choice `c` (and its final's usage to the total).
  openai::Usage usage;
  auto absorb = [&usage](const v1::GenerateResponse& m, openai::Choice* c) {
    c->text += m.text();
    c->logprobs.insert(c->logprobs.end(), m.logprobs().begin(), m.logprobs().end());
    if (m.has_final()) {
      c->finish_reason = m.final().finish_reason();
      usage.prompt_tokens += m.final().usage().prompt_tokens();
      usage.completion_tokens += m.final().usage().completion_tokens();
      usage.cached_tokens += m.final().usage().cached_tokens();
    }
  };

  if (!r.stream) {
    std::vector<openai::Choice> choices;
    for (size_t i = 0; i < r.prompts.size(); ++i) {
      grpc::ClientContext ctx;
      std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader = call(i, &ctx);
      openai::Choice c;
      c.index = static_cast<int>(i);
      v1::GenerateResponse m;
      while (reader->Read(&m)) absorb(m, &c);
      const grpc::Status st = reader->Finish();
      if (!st.ok()) return ReplyError(conn, openai::FromGrpc(st), endpoint);
      choices.push_back(std::move(c));
    }
    Reply(conn, 200,
          openai::Response(r, id, created, model, choices, usage, token_text)
              .dump(-1, ' ', false, json::error_handler_t::replace),
          endpoint);
    return;
  }

  // Streaming: the 200 and the event-stream headers go out with the first message, so
  // that a request refused before it starts still gets its HTTP error status.
  bool started = false;
  auto start = [&]() {
    if (started) return true;
    started = true;
    Count(endpoint, 200);
    return WriteAll(conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: "
                    "no-cache\r\nConnection: close\r\n\r\n");
  };
  auto send = [&](const json& j) {
    return WriteAll(
        conn,
        absl::StrCat("data: ", j.dump(-1, ' ', false, json::error_handler_t::replace), "\n\n"));
  };
  for (size_t i = 0; i < r.prompts.size(); ++i) {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader = call(i, &ctx);
    v1::GenerateResponse m;
    bool first = true, gone = false;
    size_t offset = 0;
    while (reader->Read(&m)) {
      openai::Choice c;  // this message's delta
      c.index = static_cast<int>(i);
      absorb(m, &c);
      const bool role = first && kind == openai::Kind::kChat;
      if (role || !c.text.empty() || !c.logprobs.empty() || !c.finish_reason.empty()) {
        if (!start() || !send(openai::Chunk(r, id, created, model, c, role, token_text, offset))) {
          gone = true;  // the client went away: cancel its request, all the way down
          ctx.TryCancel();
          break;
        }
      }
      first = false;
      offset += c.text.size();
    }
    const grpc::Status st = reader->Finish();
    if (gone) return;
    if (!st.ok()) {
      const openai::Error e = openai::FromGrpc(st);
      if (!started) return ReplyError(conn, e, endpoint);
      // Mid-stream: an error event, then the end of the stream (as vLLM does).
      send(json::parse(openai::ErrorJson(e)));
      WriteAll(conn, "data: [DONE]\n\n");
      return;
    }
  }
  if (!start()) return;
  if (r.include_usage) send(openai::UsageChunk(r, id, created, model, usage));
  WriteAll(conn, "data: [DONE]\n\n");
}

}  // namespace kvrelay::router

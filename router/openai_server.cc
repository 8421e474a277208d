#include "router/openai_server.h"

#include <civetweb.h>

#include <random>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpcpp/client_context.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"

namespace kvrelay::router {
namespace {

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

  mg_init_library(0);
  const std::string threads = std::to_string(options.threads);
  const char* opts[] = {"listening_ports", options.listen.c_str(), "num_threads", threads.c_str(),
                        "enable_keep_alive", "no",
                        // A stream may be idle between tokens for a long prefill.
                        "request_timeout_ms", "3600000", nullptr};
  mg_callbacks callbacks{};
  s->ctx_ = mg_start(&callbacks, nullptr, opts);
  if (s->ctx_ == nullptr) {
    mg_exit_library();
    return absl::UnavailableError(absl::StrCat("cannot serve HTTP on ", options.listen));
  }
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

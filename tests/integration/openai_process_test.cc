// The OpenAI HTTP API (issue 16) as real processes on 127.0.0.1: kvrelay-router with
// --http_listen and a kvrelay-decode worker, talked to over plain HTTP sockets:
//  - completions and chat completions, streaming and not, give exactly the gRPC path's
//    text (whose greedy tokens are `kvrelay generate`'s), with OpenAI's shapes;
//  - every error status: 400 (bad parameter, wrong type, malformed JSON, bad UTF-8),
//    401 (API keys, also on gRPC), 404 (model, path), 405, 413 (10 MB body), 429
//    (admission), 503 (no decode worker);
//  - a client that disconnects mid-stream cancels its request: no sequence or block left.
#include <signal.h>

#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/testing/http.h"
#include "tests/testing/processes.h"
#include "tests/testing/test_models.h"

namespace kvrelay {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using testing::HttpRequest;
using testing::MetricSum;

std::string ModelDir() { return testing::ModelDir(testing::TinyVariants()[0]); }

// A router with the HTTP API (+ `router_flags`) and, unless `workers` is false, a decode
// worker; both serve /metrics.
struct Cluster {
  std::unique_ptr<testing::WorkerProcess> router, decode;
  std::unique_ptr<v1::Generation::Stub> gen;

  explicit Cluster(const std::vector<std::string>& router_flags = {}, bool workers = true) {
    const std::vector<std::string> metrics = {"--metrics_listen", "127.0.0.1:0"};
    std::vector<std::string> args = {
        "--model", ModelDir(), "--http_listen", "127.0.0.1:0", "--exit_linger_seconds", "0"};
    args.insert(args.end(), metrics.begin(), metrics.end());
    args.insert(args.end(), router_flags.begin(), router_flags.end());
    router = std::make_unique<testing::WorkerProcess>(testing::StartWorker("kvrelay-router", args));
    if (!router->process) return;
    gen = v1::Generation::NewStub(
        grpc::CreateChannel(router->address(), grpc::InsecureChannelCredentials()));
    if (!workers) return;
    std::vector<std::string> w = {"--model",  ModelDir(),        "--threads",
                                  "1",        "--kv_blocks",     "256",
                                  "--router", router->address(), "--exit_linger_seconds",
                                  "0"};
    w.insert(w.end(), metrics.begin(), metrics.end());
    decode = std::make_unique<testing::WorkerProcess>(testing::StartWorker("kvrelay-decode", w));
  }
  bool ok(bool workers = true) const {
    return router && router->process && router->http_port > 0 &&
           (!workers || (decode && decode->process));
  }
  int http() const { return router->http_port; }

  // Until the router has a decode worker (its completions stop answering 503).
  bool WaitForWorker() {
    const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
    while (absl::Now() < deadline) {
      grpc::ClientContext ctx;
      v1::ListModelsResponse r;
      if (gen->ListModels(&ctx, v1::ListModelsRequest(), &r).ok() && r.models_size() == 1 &&
          r.models(0).decode_workers() == 1) {
        return true;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    return false;
  }
};

// The gRPC path's text and tokens for `req` (greedy).
struct Grpc {
  std::string text;
  std::vector<int32_t> tokens;
  grpc::Status status;
};
Grpc CallGrpc(v1::Generation::Stub* stub, const v1::GenerateRequest& req,
              const std::string& authorization = "") {
  grpc::ClientContext ctx;
  if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
  auto reader = stub->Generate(&ctx, req);
  Grpc g;
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    g.text += m.text();
    g.tokens.insert(g.tokens.end(), m.token_ids().begin(), m.token_ids().end());
  }
  g.status = reader->Finish();
  return g;
}

json Body(const testing::HttpResponse& r) {
  return json::parse(r.body, nullptr, /*allow_exceptions=*/false);
}

// The `data:` payloads of a Server-Sent Events body, in order.
std::vector<std::string> Events(const std::string& body) {
  std::vector<std::string> out;
  for (absl::string_view e : absl::StrSplit(body, "\n\n", absl::SkipEmpty())) {
    if (absl::ConsumePrefix(&e, "data: ")) out.emplace_back(e);
  }
  return out;
}

TEST(OpenAIProcessTest, CompletionsAndChatEqualTheGrpcPath) {
  Cluster c;
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c.WaitForWorker());

  // Token ids in, greedy: the gRPC tokens are `kvrelay generate`'s, the HTTP text the gRPC text.
  const std::vector<int32_t> ids = testing::RandomPrompt(20, 77);
  v1::GenerateRequest g;
  for (int32_t t : ids) g.mutable_token_ids()->add_ids(t);
  g.mutable_sampling()->set_max_tokens(12);
  g.mutable_sampling()->set_ignore_eos(true);
  const Grpc want = CallGrpc(c.gen.get(), g);
  ASSERT_TRUE(want.status.ok()) << want.status.error_message();
  EXPECT_EQ(want.tokens, testing::CliGenerate(ModelDir(), ids, 12));
  const json prompt_ids = ids;
  const std::string body = json{
      {"prompt", prompt_ids},
      {"max_tokens", 12},
      {"temperature", 0},
      {"ignore_eos", true}}.dump();
  testing::HttpResponse r = HttpRequest(c.http(), "POST", "/v1/completions", body);
  ASSERT_EQ(r.status, 200) << r.body;
  json j = Body(r);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_THAT(j["id"].get<std::string>(), ::testing::StartsWith("cmpl-"));
  EXPECT_EQ(j["choices"][0]["text"], want.text);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["prompt_tokens"], 20);
  EXPECT_EQ(j["usage"]["completion_tokens"], 12);
  EXPECT_EQ(j["usage"]["total_tokens"], 32);
  // Run twice: the second reuses the first's blocks.
  r = HttpRequest(c.http(), "POST", "/v1/completions", body);
  EXPECT_GT(Body(r)["usage"]["prompt_tokens_details"]["cached_tokens"].get<int>(), 0) << r.body;

  // Streaming: the deltas add up to the same text, then usage, then [DONE].
  const std::string stream_body =
      json{{"prompt", prompt_ids}, {"max_tokens", 12},
           {"temperature", 0},     {"ignore_eos", true},
           {"stream", true},       {"stream_options", {{"include_usage", true}}}}
          .dump();
  r = HttpRequest(c.http(), "POST", "/v1/completions", stream_body);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_THAT(r.headers, HasSubstr("Content-Type: text/event-stream"));
  std::vector<std::string> events = Events(r.body);
  ASSERT_GE(events.size(), 3u) << r.body;
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  std::string finish;
  for (size_t i = 0; i + 2 < events.size(); ++i) {
    const json e = json::parse(events[i]);
    EXPECT_EQ(e["object"], "text_completion");
    text += e["choices"][0]["text"].get<std::string>();
    if (!e["choices"][0]["finish_reason"].is_null()) finish = e["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(text, want.text);
  EXPECT_EQ(finish, "length");
  const json usage = json::parse(events[events.size() - 2]);
  EXPECT_EQ(usage["choices"], json::array());
  EXPECT_EQ(usage["usage"]["completion_tokens"], 12);

  // Chat, against the gRPC chat request.
  v1::GenerateRequest chat;
  v1::ChatMessage* m = chat.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content("hello there");
  chat.mutable_sampling()->set_max_tokens(8);
  chat.mutable_sampling()->set_ignore_eos(true);
  const Grpc want_chat = CallGrpc(c.gen.get(), chat);
  ASSERT_TRUE(want_chat.status.ok()) << want_chat.status.error_message();
  const json messages = json::array({{{"role", "user"}, {"content", "hello there"}}});
  r = HttpRequest(c.http(), "POST", "/v1/chat/completions",
                  json{{"messages", messages},
                       {"max_completion_tokens", 8},
                       {"temperature", 0},
                       {"ignore_eos", true}}
                      .dump());
  ASSERT_EQ(r.status, 200) << r.body;
  j = Body(r);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(j["choices"][0]["message"]["content"], want_chat.text);
  r = HttpRequest(c.http(), "POST", "/v1/chat/completions",
                  json{{"messages", messages},
                       {"max_tokens", 8},
                       {"temperature", 0},
                       {"ignore_eos", true},
                       {"stream", true}}
                      .dump());
  ASSERT_EQ(r.status, 200) << r.body;
  events = Events(r.body);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events.back(), "[DONE]");
  text.clear();
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json e = json::parse(events[i]);
    EXPECT_EQ(e["object"], "chat.completion.chunk");
    if (i == 0) {
      EXPECT_EQ(e["choices"][0]["delta"]["role"], "assistant");
    }
    if (e["choices"][0]["delta"].contains("content")) {
      text += e["choices"][0]["delta"]["content"].get<std::string>();
    }
  }
  EXPECT_EQ(text, want_chat.text);

  // Logprobs: per token, with the top entries asked for (completions and chat forms).
  r = HttpRequest(c.http(), "POST", "/v1/completions",
                  json{{"prompt", prompt_ids},
                       {"max_tokens", 5},
                       {"temperature", 0},
                       {"ignore_eos", true},
                       {"logprobs", 2}}
                      .dump());
  ASSERT_EQ(r.status, 200) << r.body;
  j = Body(r)["choices"][0]["logprobs"];
  ASSERT_EQ(j["tokens"].size(), 5u) << r.body;
  EXPECT_EQ(j["token_logprobs"].size(), 5u);
  EXPECT_EQ(j["text_offset"][0], 0);
  EXPECT_LE(j["token_logprobs"][0].get<double>(), 0.0);
  EXPECT_GE(j["top_logprobs"][0].size(), 1u);
  EXPECT_LE(j["top_logprobs"][0].size(), 2u);
  r = HttpRequest(c.http(), "POST", "/v1/chat/completions",
                  json{{"messages", messages},
                       {"max_tokens", 3},
                       {"temperature", 0},
                       {"ignore_eos", true},
                       {"logprobs", true},
                       {"top_logprobs", 2}}
                      .dump());
  ASSERT_EQ(r.status, 200) << r.body;
  j = Body(r)["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(j.size(), 3u) << r.body;
  EXPECT_EQ(j[0]["top_logprobs"].size(), 2u);
  EXPECT_TRUE(j[0]["token"].is_string());

  // Models and health.
  r = HttpRequest(c.http(), "GET", "/v1/models");
  ASSERT_EQ(r.status, 200);
  grpc::ClientContext ctx;
  v1::ListModelsResponse models;
  ASSERT_TRUE(c.gen->ListModels(&ctx, v1::ListModelsRequest(), &models).ok());
  EXPECT_EQ(Body(r)["data"][0]["id"], models.models(0).id());
  EXPECT_EQ(HttpRequest(c.http(), "GET", "/health").status, 200);

  // The HTTP layer's metrics: requests by endpoint and status, nothing in flight.
  const std::string metrics = testing::ScrapeMetrics(c.router->metrics_port);
  EXPECT_EQ(MetricSum(metrics, "kvrelay_http_requests_total",
                      "endpoint=\"/v1/completions\",status=\"200\""),
            4)
      << metrics;
  EXPECT_EQ(MetricSum(metrics, "kvrelay_http_requests_in_flight"), 0);
}

TEST(OpenAIProcessTest, ErrorsHaveOpenAIsShapeAndStatus) {
  Cluster c;
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c.WaitForWorker());
  auto post = [&](const std::string& path, const std::string& body) {
    return HttpRequest(c.http(), "POST", path, body);
  };
  struct Case {
    std::string path, body;
    int status;
    std::string param, message;
  };
  const std::vector<Case> cases = {
      {"/v1/completions", R"({"prompt": "x", "n": 3})", 400, "n", "n=1"},
      {"/v1/completions", R"({"prompt": "x", "max_tokens": "ten"})", 400, "max_tokens", "integer"},
      {"/v1/completions", R"({"prompt": "x", "temperature": -1})", 400, "", "temperature"},
      {"/v1/completions", R"({"prompt": "x")", 400, "", "not valid JSON"},
      {"/v1/completions", "[1, 2]", 400, "", "JSON object"},
      {"/v1/completions", "{\"prompt\": \"a\xff\"}", 400, "", "UTF-8"},
      {"/v1/completions", R"({"prompt": [100000]})", 400, "", "vocab"},
      {"/v1/chat/completions", R"({"messages": "hi"})", 400, "messages", "list"},
      {"/v1/chat/completions", R"({"messages": [{"role": "wizard", "content": "x"}]})", 400, "",
       "role"},
      {"/v1/completions", R"({"prompt": "x", "model": "no-such-model"})", 404, "", "no-such-model"},
  };
  for (const Case& k : cases) {
    const testing::HttpResponse r = post(k.path, k.body);
    EXPECT_EQ(r.status, k.status) << k.body << ": " << r.body;
    const json j = Body(r);
    ASSERT_TRUE(j.contains("error")) << r.body;
    EXPECT_THAT(j["error"]["message"].get<std::string>(), HasSubstr(k.message)) << k.body;
    EXPECT_TRUE(j["error"].contains("type") && j["error"].contains("code"));
    if (!k.param.empty()) {
      EXPECT_EQ(j["error"]["param"], k.param) << k.body;
    }
  }
  EXPECT_EQ(HttpRequest(c.http(), "GET", "/v1/nothing").status, 404);
  EXPECT_EQ(HttpRequest(c.http(), "GET", "/v1/completions").status, 405);
  EXPECT_EQ(HttpRequest(c.http(), "POST", "/v1/models", "{}").status, 405);
  // 10 MB: 413, refused without generating anything.
  const std::string big = json{{"prompt", std::string(10 << 20, 'a')}}.dump();
  const testing::HttpResponse r = post("/v1/completions", big);
  EXPECT_EQ(r.status, 413) << r.body.substr(0, 200);
  EXPECT_THAT(Body(r)["error"]["message"].get<std::string>(), HasSubstr("limit"));
}

TEST(OpenAIProcessTest, NoWorkerIs503AndAFullQueueIs429) {
  {
    Cluster c({}, /*workers=*/false);
    ASSERT_TRUE(c.ok(/*workers=*/false));
    const testing::HttpResponse r =
        HttpRequest(c.http(), "POST", "/v1/completions", R"({"prompt": "x", "max_tokens": 2})");
    EXPECT_EQ(r.status, 503) << r.body;
    EXPECT_EQ(Body(r)["error"]["type"], "service_unavailable");
  }
  // One running + one queued, the decode worker stopped so both stay: the third is 429.
  Cluster c({"--max_running", "1", "--max_queued", "1", "--heartbeat_timeout_ms", "60000"});
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c.WaitForWorker());
  ASSERT_EQ(kill(c.decode->process->pid(), SIGSTOP), 0);
  const std::string body = R"({"prompt": [1, 2, 3], "max_tokens": 4, "stream": true})";
  testing::HttpStream held1(c.http(), "POST", "/v1/completions", body);
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  while (MetricSum(testing::ScrapeMetrics(c.router->metrics_port),
                   "kvrelay_router_requests_running") != 1 &&
         absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  testing::HttpStream held2(c.http(), "POST", "/v1/completions", body);
  while (MetricSum(testing::ScrapeMetrics(c.router->metrics_port), "kvrelay_router_queue_depth") !=
             1 &&
         absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  const testing::HttpResponse r = HttpRequest(c.http(), "POST", "/v1/completions", body);
  EXPECT_EQ(r.status, 429) << r.body;
  EXPECT_THAT(Body(r)["error"]["message"].get<std::string>(), HasSubstr("--max_queued"));
  ASSERT_EQ(kill(c.decode->process->pid(), SIGCONT), 0);
  EXPECT_TRUE(held1.ReadUntil("data: [DONE]")) << held1.received();
  EXPECT_TRUE(held2.ReadUntil("data: [DONE]")) << held2.received();
}

TEST(OpenAIProcessTest, PastTheRequestTimeoutIs504) {
  Cluster c({"--http_request_timeout_seconds", "0.5", "--heartbeat_timeout_ms", "60000"});
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c.WaitForWorker());
  // The decode worker stopped: the request cannot finish within its 0.5 s.
  ASSERT_EQ(kill(c.decode->process->pid(), SIGSTOP), 0);
  const absl::Time start = absl::Now();
  const testing::HttpResponse r =
      HttpRequest(c.http(), "POST", "/v1/completions", R"({"prompt": [1, 2, 3], "max_tokens": 4})");
  EXPECT_EQ(r.status, 504) << r.body;
  EXPECT_EQ(Body(r)["error"]["type"], "timeout");
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(450));
  ASSERT_EQ(kill(c.decode->process->pid(), SIGCONT), 0);
  // Nothing stays behind on the worker once it runs again.
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  std::string d;
  while (absl::Now() < deadline) {
    d = testing::ScrapeMetrics(c.decode->metrics_port);
    if (MetricSum(d, "kvrelay_decode_running_sequences") == 0 &&
        MetricSum(d, "kvrelay_kv_blocks", "state=\"in_use\"") == 0) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(MetricSum(d, "kvrelay_kv_blocks", "state=\"in_use\""), 0) << d;
}

TEST(OpenAIProcessTest, ApiKeysGuardHttpAndGrpc) {
  const std::string keys = ::testing::TempDir() + "/openai_keys.txt";
  std::ofstream(keys) << "# test keys\nsk-test-1\nsk-test-2\n";
  Cluster c({"--api_keys_file", keys});
  ASSERT_TRUE(c.ok());
  const std::string body = R"({"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0})";
  testing::HttpResponse r = HttpRequest(c.http(), "POST", "/v1/completions", body);
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(Body(r)["error"]["code"], "invalid_api_key");
  r = HttpRequest(c.http(), "POST", "/v1/completions", body, {"Authorization: Bearer sk-nope"});
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(HttpRequest(c.http(), "GET", "/v1/models").status, 401);
  EXPECT_EQ(HttpRequest(c.http(), "GET", "/health").status, 200);  // probes need no key
  // gRPC: without the key UNAUTHENTICATED, with it served.
  grpc::ClientContext ctx;
  v1::ListModelsResponse models;
  EXPECT_EQ(c.gen->ListModels(&ctx, v1::ListModelsRequest(), &models).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  v1::GenerateRequest g;
  g.mutable_token_ids()->add_ids(1);
  g.mutable_sampling()->set_max_tokens(2);
  EXPECT_EQ(CallGrpc(c.gen.get(), g).status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(CallGrpc(c.gen.get(), g, "Bearer sk-wrong").status.error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  Grpc ok = CallGrpc(c.gen.get(), g, "Bearer sk-test-2");
  while (!ok.status.ok() && absl::Now() < deadline) {  // until the worker has registered
    absl::SleepFor(absl::Milliseconds(50));
    ok = CallGrpc(c.gen.get(), g, "Bearer sk-test-2");
  }
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
  r = HttpRequest(c.http(), "POST", "/v1/completions", body, {"Authorization: Bearer sk-test-1"});
  EXPECT_EQ(r.status, 200) << r.body;
  // Keys never appear in the router's output or metrics.
  const std::string metrics = testing::ScrapeMetrics(c.router->metrics_port);
  EXPECT_THAT(metrics, ::testing::Not(HasSubstr("sk-test")));
}

TEST(OpenAIProcessTest, DisconnectMidStreamCancelsTheRequest) {
  Cluster c;
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c.WaitForWorker());
  {
    testing::HttpStream s(c.http(), "POST", "/v1/completions",
                          R"({"prompt": [5, 6, 7, 8], "max_tokens": 480, "ignore_eos": true,
                              "temperature": 0, "stream": true})");
    ASSERT_TRUE(s.ReadUntil("\"text_completion\"")) << s.received();
    s.Close();  // hang up after the first token
  }
  // The router cancels its gRPC call; the decode worker ends the sequence and frees its
  // blocks.
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  std::string router, decode;
  while (absl::Now() < deadline) {
    router = testing::ScrapeMetrics(c.router->metrics_port);
    decode = testing::ScrapeMetrics(c.decode->metrics_port);
    if (MetricSum(router, "kvrelay_router_requests_total", "code=\"CANCELLED\"") == 1 &&
        MetricSum(decode, "kvrelay_decode_running_sequences") == 0 &&
        MetricSum(decode, "kvrelay_kv_blocks", "state=\"in_use\"") == 0) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(MetricSum(router, "kvrelay_router_requests_total", "code=\"CANCELLED\""), 1) << router;
  EXPECT_EQ(MetricSum(router, "kvrelay_router_requests_total", "code=\"OK\""), 0);
  EXPECT_EQ(MetricSum(decode, "kvrelay_decode_running_sequences"), 0);
  EXPECT_EQ(MetricSum(decode, "kvrelay_kv_blocks", "state=\"in_use\""), 0) << decode;
  EXPECT_EQ(MetricSum(router, "kvrelay_http_requests_in_flight"), 0);
}

}  // namespace
}  // namespace kvrelay

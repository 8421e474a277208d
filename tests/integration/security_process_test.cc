// Transport security as real processes (issue 17): kvrelay-router, kvrelay-prefill and
// kvrelay-decode with TLS on every port, mutual TLS on the internal ones and a cluster
// token, certificates from a throw-away CA (rpc::WriteLocalPki):
//  - an application reaches the public API over TLS without a certificate and gets the
//    exact tokens of the single-process run, with the KV prefilled remotely (so the
//    decode -> prefill calls and the registry streams carried the certificate and the
//    token);
//  - plaintext clients, clients of another CA, clients without a certificate or token
//    are refused on every internal RPC (the router's Registry, the workers' services);
//  - a worker with the wrong token cannot register, and the router counts the refusal;
//  - the OpenAI HTTP API speaks HTTPS with the router's certificate, or one of its own
//    (--http_tls_cert), or plaintext behind a TLS-ending ingress (--http_plaintext).
#include <sys/wait.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/time/clock.h"
#include "common/rpc/pki.h"
#include "common/rpc/security.h"
#include "common/util/file.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
#include "kvrelay/v1/registry.grpc.pb.h"
#include "kvrelay/v1/worker.grpc.pb.h"
#include "tests/testing/http.h"
#include "tests/testing/processes.h"
#include "tests/testing/temp_dir.h"
#include "tests/testing/test_models.h"

namespace kvrelay {
namespace {

using ::testing::HasSubstr;

std::string ModelDir() { return testing::ModelDir(testing::TinyVariants()[0]); }

std::chrono::system_clock::time_point Deadline() {
  return std::chrono::system_clock::now() + std::chrono::seconds(60);
}

class SecurityProcessTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::ScopedTempDir("kvr_tls_");
    ASSERT_TRUE(rpc::WriteLocalPki(dir_->path()).ok());
    // A second CA and a node certificate of it: a peer from another cluster.
    absl::StatusOr<rpc::KeyAndCert> rogue_ca = rpc::MakeCertificateAuthority("rogue");
    ASSERT_TRUE(rogue_ca.ok());
    absl::StatusOr<rpc::KeyAndCert> rogue =
        rpc::IssueCertificate(*rogue_ca, "rogue", {"127.0.0.1"});
    ASSERT_TRUE(rogue.ok());
    ASSERT_TRUE(WriteFile(dir_->File("rogue.crt"), rogue->cert_pem).ok());
    ASSERT_TRUE(WriteFile(dir_->File("rogue-ca.crt"), rogue_ca->cert_pem).ok());
    ASSERT_TRUE(WriteFile(dir_->File("rogue.key"), rogue->key_pem).ok());
    ASSERT_TRUE(WriteFile(dir_->File("wrong-token"), "not-the-token\n").ok());

    const std::vector<std::string> security = Flags("cluster-token");
    std::vector<std::string> args = {"--model",
                                     ModelDir(),
                                     "--local_prefill_max_tokens",
                                     "16",
                                     "--exit_linger_seconds",
                                     "0",
                                     "--metrics_listen",
                                     "127.0.0.1:0",
                                     "--http_listen",
                                     "127.0.0.1:0"};
    args.insert(args.end(), security.begin(), security.end());
    router_ = new testing::WorkerProcess(testing::StartWorker("kvrelay-router", args));
    ASSERT_TRUE(router_->process);
    std::vector<std::string> worker = {"--model",  ModelDir(),         "--threads",
                                       "1",        "--kv_blocks",      "128",
                                       "--router", router_->address(), "--exit_linger_seconds",
                                       "0"};
    worker.insert(worker.end(), security.begin(), security.end());
    prefill_ = new testing::WorkerProcess(testing::StartWorker("kvrelay-prefill", worker));
    decode_ = new testing::WorkerProcess(testing::StartWorker("kvrelay-decode", worker));
    ASSERT_TRUE(prefill_->process && decode_->process);
  }
  static void TearDownTestSuite() {
    delete decode_;
    delete prefill_;
    delete router_;
    delete dir_;
  }

  // Every process's flags, with the token in `token_file`.
  static std::vector<std::string> Flags(const std::string& token_file) {
    return {"--tls_cert",
            dir_->File("node.crt"),
            "--tls_key",
            dir_->File("node.key"),
            "--tls_ca",
            dir_->File("ca.crt"),
            "--tls_require_client_cert",
            "--cluster_token_file",
            dir_->File(token_file)};
  }

  // A client's credentials: the cluster CA, and optionally a certificate and a token.
  static rpc::Security Client(const std::string& cert, const std::string& key,
                              const std::string& token, const std::string& ca = "ca.crt") {
    absl::StatusOr<rpc::Security> s = rpc::Security::FromPem(
        cert.empty() ? "" : *ReadFile(dir_->File(cert)),
        key.empty() ? "" : *ReadFile(dir_->File(key)), *ReadFile(dir_->File(ca)), false, "",
        token.empty() ? "" : std::string(absl::StripAsciiWhitespace(*ReadFile(dir_->File(token)))));
    EXPECT_TRUE(s.ok()) << s.status();
    return *s;
  }
  static rpc::Security Node() { return Client("node.crt", "node.key", "cluster-token"); }

  static grpc::Status ListWorkers(const std::shared_ptr<grpc::Channel>& channel,
                                  v1::ListWorkersResponse* out) {
    auto stub = v1::Registry::NewStub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(Deadline());
    return stub->ListWorkers(&ctx, v1::ListWorkersRequest(), out);
  }

  // Until the router lists both workers alive and synced.
  static bool WaitForWorkers() {
    auto channel = Node().CreateChannel(router_->address(), {});
    const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
    while (absl::Now() < deadline) {
      v1::ListWorkersResponse r;
      int n = 0;
      if (ListWorkers(channel, &r).ok()) {
        for (const auto& w : r.workers()) n += w.alive() && w.synced() ? 1 : 0;
      }
      if (n == 2) return true;
      absl::SleepFor(absl::Milliseconds(20));
    }
    return false;
  }

  static testing::ScopedTempDir* dir_;
  static testing::WorkerProcess* router_;
  static testing::WorkerProcess* prefill_;
  static testing::WorkerProcess* decode_;
};

testing::ScopedTempDir* SecurityProcessTest::dir_ = nullptr;
testing::WorkerProcess* SecurityProcessTest::router_ = nullptr;
testing::WorkerProcess* SecurityProcessTest::prefill_ = nullptr;
testing::WorkerProcess* SecurityProcessTest::decode_ = nullptr;

TEST_F(SecurityProcessTest, TheApplicationGetsExactTokensOverTlsWithoutACertificate) {
  ASSERT_TRUE(WaitForWorkers());
  const std::vector<int32_t> prompt = testing::RandomPrompt(80, 7);
  const std::vector<int32_t> want = testing::CliGenerate(ModelDir(), prompt, 12);
  // Only the CA: what an application has.
  auto gen = v1::Generation::NewStub(Client("", "", "").CreateChannel(router_->address(), {}));
  v1::GenerateRequest req;
  for (int32_t t : prompt) req.mutable_token_ids()->add_ids(t);
  req.mutable_sampling()->set_max_tokens(12);
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(Deadline());
  auto reader = gen->Generate(&ctx, req);
  std::vector<int32_t> got;
  v1::GenerateResponse m;
  v1::Final final;
  while (reader->Read(&m)) {
    for (int32_t t : m.token_ids()) got.push_back(t);
    if (m.has_final()) final = m.final();
  }
  const grpc::Status st = reader->Finish();
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(got, want);
  // Prefilled on the prefill worker: the decode worker's call and the KV's way there
  // passed the prefill worker's mTLS and token checks.
  EXPECT_EQ(final.route().prefill_mode(), v1::PREFILL_MODE_REMOTE);
  EXPECT_GT(final.transfer().bytes(), 0u);
}

TEST_F(SecurityProcessTest, ThePublicPortRefusesPlaintextAndForeignCas) {
  auto plain = v1::Generation::NewStub(
      grpc::CreateChannel(router_->address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(Deadline());
  v1::ListModelsResponse models;
  EXPECT_EQ(plain->ListModels(&ctx, v1::ListModelsRequest(), &models).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // Trusting another CA, the client refuses the router's certificate.
  auto foreign = v1::Generation::NewStub(
      Client("", "", "", "rogue.crt").CreateChannel(router_->address(), {}));
  grpc::ClientContext ctx2;
  ctx2.set_deadline(Deadline());
  EXPECT_EQ(foreign->ListModels(&ctx2, v1::ListModelsRequest(), &models).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

TEST_F(SecurityProcessTest, TheHttpApiSpeaksHttpsWithTheRoutersCertificate) {
  ASSERT_TRUE(WaitForWorkers());
  ASSERT_GT(router_->http_port, 0);
  const std::string ca = *ReadFile(dir_->File("ca.crt"));
  const testing::HttpResponse r = testing::HttpsRequest(
      router_->http_port, ca, "POST", "/v1/completions", R"({"prompt": "hello", "max_tokens": 4})");
  ASSERT_EQ(r.status, 200) << r.error << r.body;
  EXPECT_THAT(r.body, HasSubstr("\"text_completion\""));
  // Plaintext gets no answer; a client trusting another CA refuses the server.
  EXPECT_EQ(testing::HttpRequest(router_->http_port, "GET", "/v1/models", "", {}, absl::Seconds(10))
                .status,
            0);
  EXPECT_THAT(testing::HttpsRequest(router_->http_port, *ReadFile(dir_->File("rogue-ca.crt")),
                                    "GET", "/v1/models")
                  .error,
              HasSubstr("TLS handshake"));
}

TEST_F(SecurityProcessTest, TheHttpApiCanHaveItsOwnCertificateOrNone) {
  // Routers without workers: /v1/models answers all the same.
  std::vector<std::string> base = {
      "--model", ModelDir(), "--http_listen", "127.0.0.1:0", "--exit_linger_seconds", "0"};
  const std::vector<std::string> security = Flags("cluster-token");
  base.insert(base.end(), security.begin(), security.end());
  // A public certificate (here: the other CA's) on the HTTP API, the cluster's on gRPC.
  std::vector<std::string> own = base;
  own.insert(own.end(), {"--http_tls_cert", dir_->File("rogue.crt"), "--http_tls_key",
                         dir_->File("rogue.key")});
  testing::WorkerProcess a = testing::StartWorker("kvrelay-router", own);
  ASSERT_TRUE(a.process);
  testing::HttpResponse r = testing::HttpsRequest(
      a.http_port, *ReadFile(dir_->File("rogue-ca.crt")), "GET", "/v1/models");
  EXPECT_EQ(r.status, 200) << r.error;
  // TLS ended in front of the router (an ingress): plaintext HTTP, TLS on gRPC still.
  std::vector<std::string> plain = base;
  plain.push_back("--http_plaintext");
  testing::WorkerProcess b = testing::StartWorker("kvrelay-router", plain);
  ASSERT_TRUE(b.process);
  r = testing::HttpRequest(b.http_port, "GET", "/v1/models");
  EXPECT_EQ(r.status, 200) << r.error;
  // Contradictory flags: a clear error at start (exit 2).
  std::vector<std::string> both = own;
  both.push_back("--http_plaintext");
  std::optional<testing::Subprocess> c = testing::Subprocess::Start([&] {
    std::vector<std::string> argv = {testing::SiblingBinary("kvrelay-router")};
    argv.insert(argv.end(), both.begin(), both.end());
    return argv;
  }());
  ASSERT_TRUE(c);
  const std::optional<int> status = c->Wait(testing::kProcessTimeout);
  ASSERT_TRUE(status);
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 2) << *status;
}

TEST_F(SecurityProcessTest, TheRegistryWantsTheClusterCertificateAndToken) {
  v1::ListWorkersResponse r;
  grpc::Status anonymous =
      ListWorkers(Client("", "", "").CreateChannel(router_->address(), {}), &r);
  EXPECT_EQ(anonymous.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(anonymous.error_message(), HasSubstr("no certificate of the cluster CA"));
  grpc::Status no_token =
      ListWorkers(Client("node.crt", "node.key", "").CreateChannel(router_->address(), {}), &r);
  EXPECT_EQ(no_token.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(no_token.error_message(), HasSubstr("no cluster token"));
  // A certificate of another CA fails the handshake.
  EXPECT_EQ(
      ListWorkers(
          Client("rogue.crt", "rogue.key", "cluster-token").CreateChannel(router_->address(), {}),
          &r)
          .error_code(),
      grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(ListWorkers(Node().CreateChannel(router_->address(), {}), &r).ok());
}

TEST_F(SecurityProcessTest, WorkerPortsAcceptOnlyTheCluster) {
  v1::DecodeRequest dreq;
  dreq.set_request_id("intruder");
  dreq.add_prompt_token_ids(1);
  const auto decode_call = [&](const rpc::Security& s) {
    auto stub = v1::DecodeWorker::NewStub(s.CreateChannel(decode_->address(), {}));
    grpc::ClientContext ctx;
    ctx.set_deadline(Deadline());
    auto reader = stub->Generate(&ctx, dreq);
    v1::DecodeResponse m;
    while (reader->Read(&m)) {
    }
    return reader->Finish();
  };
  const auto abort_call = [&](const rpc::Security& s) {
    auto stub = v1::PrefillWorker::NewStub(s.CreateChannel(prefill_->address(), {}));
    grpc::ClientContext ctx;
    ctx.set_deadline(Deadline());
    v1::AbortRequest req;
    req.set_request_id("intruder");
    v1::AbortResponse resp;
    return stub->Abort(&ctx, req, &resp);
  };
  // Plaintext, or TLS without a certificate, or another CA's: the handshake fails.
  for (const rpc::Security& s : {rpc::Security(), Client("", "", "cluster-token"),
                                 Client("rogue.crt", "rogue.key", "cluster-token")}) {
    EXPECT_EQ(decode_call(s).error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(abort_call(s).error_code(), grpc::StatusCode::UNAVAILABLE);
  }
  // The certificate without the token, or with a wrong one: refused by the handler.
  for (const char* token : {"", "wrong-token"}) {
    const rpc::Security s = Client("node.crt", "node.key", token);
    const grpc::Status d = decode_call(s);
    EXPECT_EQ(d.error_code(), grpc::StatusCode::UNAUTHENTICATED) << d.error_message();
    const grpc::Status a = abort_call(s);
    EXPECT_EQ(a.error_code(), grpc::StatusCode::UNAUTHENTICATED) << a.error_message();
  }
  // The cluster itself gets through (the request is then judged on its content).
  EXPECT_EQ(abort_call(Node()).error_code(), grpc::StatusCode::OK);
}

TEST_F(SecurityProcessTest, AWorkerWithTheWrongTokenCannotRegister) {
  ASSERT_TRUE(WaitForWorkers());
  const double before =
      testing::MetricSum(testing::ScrapeMetrics(router_->metrics_port),
                         "kvrelay_internal_calls_refused_total", "reason=\"wrong_token\"");
  std::vector<std::string> args = {
      "--model",  ModelDir(),         "--threads",   "1",          "--kv_blocks",           "32",
      "--router", router_->address(), "--worker_id", "intruder-0", "--exit_linger_seconds", "0"};
  const std::vector<std::string> security = Flags("wrong-token");
  args.insert(args.end(), security.begin(), security.end());
  testing::WorkerProcess intruder = testing::StartWorker("kvrelay-decode", args);
  ASSERT_TRUE(intruder.process);
  // The router refuses its registry stream (counted), again on every redial.
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  double refused = before;
  while (absl::Now() < deadline && refused < before + 2) {
    refused = testing::MetricSum(testing::ScrapeMetrics(router_->metrics_port),
                                 "kvrelay_internal_calls_refused_total", "reason=\"wrong_token\"");
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_GE(refused, before + 2);
  v1::ListWorkersResponse r;
  ASSERT_TRUE(ListWorkers(Node().CreateChannel(router_->address(), {}), &r).ok());
  for (const v1::WorkerStatus& w : r.workers()) {
    EXPECT_NE(w.registration().worker_id(), "intruder-0");
  }
}

}  // namespace
}  // namespace kvrelay

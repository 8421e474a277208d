// OpenAIServer on its own: the HTTP handling that needs no worker (listen address, health,
// models, API keys, body limit, methods and paths, HTTPS), and a request path that is down (the
// Generation channel points at nothing: 503).
#include "router/openai_server.h"

#include <memory>
#include <string>
#include <vector>

#include "common/rpc/pki.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/http.h"
#include "tests/testing/test_models.h"

namespace kvrelay::router {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

class OpenAIServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = ModelContext::Load(testing::ModelDir(testing::TinyVariants()[0]), "tiny", 16, "");
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = *std::move(m);
    // Nothing listens on port 1: every Generate call fails UNAVAILABLE.
    channel_ = grpc::CreateChannel("127.0.0.1:1", grpc::InsecureChannelCredentials());
  }
  std::unique_ptr<OpenAIServer> Start(OpenAIServerOptions o = OpenAIServerOptions()) {
    auto s = OpenAIServer::Start(o, channel_, model_.get(), nullptr);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *std::move(s) : nullptr;
  }
  std::unique_ptr<ModelContext> model_;
  std::shared_ptr<grpc::Channel> channel_;
};

TEST_F(OpenAIServerTest, BadListenAddressesAreRefused) {
  for (const char* bad : {"", "127.0.0.1", "127.0.0.1:x", "127.0.0.1:70000", ":80"}) {
    OpenAIServerOptions o;
    o.listen = bad;
    EXPECT_EQ(OpenAIServer::Start(o, channel_, model_.get(), nullptr).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
  OpenAIServerOptions o;
  o.threads = 0;
  EXPECT_EQ(OpenAIServer::Start(o, channel_, model_.get(), nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(OpenAIServerTest, HealthModelsPathsMethodsAndTheRequestPathDown) {
  auto s = Start();
  ASSERT_NE(s, nullptr);
  ASSERT_GT(s->port(), 0);
  EXPECT_EQ(testing::HttpRequest(s->port(), "GET", "/health").status, 200);
  testing::HttpResponse r = testing::HttpRequest(s->port(), "GET", "/v1/models");
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(json::parse(r.body)["data"][0]["id"], "tiny");
  EXPECT_EQ(testing::HttpRequest(s->port(), "GET", "/nope").status, 404);
  EXPECT_EQ(testing::HttpRequest(s->port(), "DELETE", "/v1/completions").status, 405);
  r = testing::HttpRequest(s->port(), "POST", "/v1/completions", R"({"prompt": "hi"})");
  EXPECT_EQ(r.status, 503) << r.body;
  EXPECT_EQ(json::parse(r.body)["error"]["type"], "service_unavailable");
  // Streaming refused before it starts: still an HTTP error status, not an event stream.
  r = testing::HttpRequest(s->port(), "POST", "/v1/chat/completions",
                           R"({"messages": [{"role": "user", "content": "x"}], "stream": true})");
  EXPECT_EQ(r.status, 503) << r.body;
  EXPECT_THAT(r.headers, HasSubstr("application/json"));
}

TEST_F(OpenAIServerTest, HttpsServesWithTheGivenCertificateChain) {
  auto ca = rpc::MakeCertificateAuthority("test CA");
  ASSERT_TRUE(ca.ok()) << ca.status();
  auto leaf = rpc::IssueCertificate(*ca, "router", {"127.0.0.1"});
  ASSERT_TRUE(leaf.ok()) << leaf.status();
  OpenAIServerOptions o;
  o.tls_cert_pem = leaf->cert_pem + ca->cert_pem;  // a chain: leaf, then its CA
  o.tls_key_pem = leaf->key_pem;
  auto s = Start(o);
  ASSERT_NE(s, nullptr);
  EXPECT_TRUE(s->tls());
  testing::HttpResponse r = testing::HttpsRequest(s->port(), ca->cert_pem, "GET", "/health");
  EXPECT_EQ(r.status, 200) << r.error;
  r = testing::HttpsRequest(s->port(), ca->cert_pem, "POST", "/v1/completions",
                            R"({"prompt": "hi"})");
  EXPECT_EQ(r.status, 503) << r.error;  // served over TLS down to the (absent) backend
  // A client that trusts another CA refuses the server; a plaintext client gets no answer.
  auto other = rpc::MakeCertificateAuthority("other CA");
  ASSERT_TRUE(other.ok());
  r = testing::HttpsRequest(s->port(), other->cert_pem, "GET", "/health");
  EXPECT_EQ(r.status, 0);
  EXPECT_THAT(r.error, HasSubstr("TLS handshake"));
  EXPECT_EQ(testing::HttpRequest(s->port(), "GET", "/health", "", {}, absl::Seconds(10)).status, 0);
  // Still serving after both.
  EXPECT_EQ(testing::HttpsRequest(s->port(), ca->cert_pem, "GET", "/health").status, 200);
}

TEST_F(OpenAIServerTest, BadHttpsMaterialIsRefusedBeforeListening) {
  auto ca = rpc::MakeCertificateAuthority("test CA");
  ASSERT_TRUE(ca.ok());
  auto leaf = rpc::IssueCertificate(*ca, "router", {"127.0.0.1"});
  auto stranger = rpc::IssueCertificate(*ca, "stranger", {"127.0.0.1"});
  ASSERT_TRUE(leaf.ok() && stranger.ok());
  struct Case {
    std::string cert, key, want;
  };
  for (const Case& c : std::vector<Case>{
           {leaf->cert_pem, "", "both a certificate and its private key"},
           {"", leaf->key_pem, "both a certificate and its private key"},
           {"not pem", leaf->key_pem, "not a PEM certificate"},
           {leaf->cert_pem, "not pem", "not a PEM private key"},
           {leaf->cert_pem, stranger->key_pem, "does not match"},
       }) {
    OpenAIServerOptions o;
    o.tls_cert_pem = c.cert;
    o.tls_key_pem = c.key;
    auto s = OpenAIServer::Start(o, channel_, model_.get(), nullptr);
    ASSERT_FALSE(s.ok()) << c.want;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << s.status();
    EXPECT_THAT(std::string(s.status().message()), HasSubstr(c.want));
  }
}

TEST_F(OpenAIServerTest, BodyLimitAndKeys) {
  OpenAIServerOptions o;
  o.max_body_bytes = 1000;
  o.keys = ApiKeys({"sk-1"});
  auto s = Start(o);
  ASSERT_NE(s, nullptr);
  const std::vector<std::string> auth = {"Authorization: Bearer sk-1"};
  EXPECT_EQ(testing::HttpRequest(s->port(), "GET", "/v1/models").status, 401);
  EXPECT_EQ(testing::HttpRequest(s->port(), "GET", "/v1/models", "", auth).status, 200);
  EXPECT_EQ(testing::HttpRequest(s->port(), "GET", "/health").status, 200);
  const testing::HttpResponse r = testing::HttpRequest(
      s->port(), "POST", "/v1/completions", json{{"prompt", std::string(2000, 'a')}}.dump(), auth);
  EXPECT_EQ(r.status, 413) << r.body;
  // A bad key is checked before the body is read.
  EXPECT_EQ(testing::HttpRequest(s->port(), "POST", "/v1/completions", "{}",
                                 {"Authorization: Bearer sk-2"})
                .status,
            401);
}

}  // namespace
}  // namespace kvrelay::router

#include "common/rpc/security.h"

#include <chrono>
#include <string>

#include "common/rpc/pki.h"
#include "common/rpc/server.h"
#include "common/util/file.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/worker.grpc.pb.h"
#include "tests/testing/metric_values.h"
#include "tests/testing/temp_dir.h"

namespace kvrelay::rpc {
namespace {

using ::testing::HasSubstr;

// An internal service whose one method answers OK to callers the Security lets in.
class AbortOnly final : public v1::PrefillWorker::CallbackService {
 public:
  explicit AbortOnly(Security security) : security_(std::move(security)) {}
  grpc::ServerUnaryReactor* Abort(grpc::CallbackServerContext* context,
                                  const v1::AbortRequest* /*request*/,
                                  v1::AbortResponse* response) override {
    auto* reactor = context->DefaultReactor();
    if (std::optional<grpc::Status> denied = security_.CheckInternalCaller(*context)) {
      reactor->Finish(*denied);
      return reactor;
    }
    response->set_found(true);
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  const Security security_;
};

// The certificates every case uses: one cluster CA with a node certificate for
// 127.0.0.1, one for a name only, and a second CA nobody trusts.
struct Pki {
  KeyAndCert ca, node, named_only, rogue_ca, rogue_node;
  Pki() {
    ca = *MakeCertificateAuthority("test CA");
    node = *IssueCertificate(ca, "node", {"localhost", "127.0.0.1"});
    named_only = *IssueCertificate(ca, "named", {"kvrelay-internal"});
    rogue_ca = *MakeCertificateAuthority("rogue CA");
    rogue_node = *IssueCertificate(rogue_ca, "rogue", {"127.0.0.1"});
  }
};

const Pki& Certs() {
  static const Pki* pki = new Pki();  // key generation is slow-ish: once per binary
  return *pki;
}

Security Make(const KeyAndCert* own, const std::string& ca, bool mtls = false,
              const std::string& server_name = "", const std::string& token = "") {
  absl::StatusOr<Security> s = Security::FromPem(own ? own->cert_pem : "", own ? own->key_pem : "",
                                                 ca, mtls, server_name, token);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : Security();
}

class Served {
 public:
  Served(const Security& security, bool public_port) : service_(security) {
    ServerSpec spec;
    spec.listen = "127.0.0.1:0";
    spec.security = security;
    spec.public_port = public_port;
    spec.services = {&service_};
    absl::StatusOr<std::unique_ptr<grpc::Server>> s = StartServer(spec, &port_);
    EXPECT_TRUE(s.ok()) << s.status();
    if (s.ok()) server_ = *std::move(s);
  }
  ~Served() {
    if (server_) server_->Shutdown(std::chrono::system_clock::now());
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

  // One Abort call from a client with `security`.
  grpc::Status Call(const Security& security) const {
    auto stub = v1::PrefillWorker::NewStub(security.CreateChannel(address(), {}));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::AbortRequest req;
    req.set_request_id("r");
    v1::AbortResponse resp;
    return stub->Abort(&ctx, req, &resp);
  }

 private:
  AbortOnly service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

TEST(ConstantTimeEqualsTest, ComparesWholeStrings) {
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_TRUE(ConstantTimeEquals("sk-abc", "sk-abc"));
  EXPECT_FALSE(ConstantTimeEquals("sk-abc", "sk-abd"));
  EXPECT_FALSE(ConstantTimeEquals("sk-abc", "sk-ab"));  // a prefix
  EXPECT_FALSE(ConstantTimeEquals("sk-ab", "sk-abc"));
  EXPECT_FALSE(ConstantTimeEquals(std::string("a\0", 2), "a"));
}

TEST(SecurityTest, DefaultIsPlaintextAndOpen) {
  const Security s;
  EXPECT_FALSE(s.tls());
  EXPECT_FALSE(s.client_tls());
  EXPECT_FALSE(s.internal_authenticated());
  EXPECT_EQ(s.Describe(), "tls=off mtls=off cluster_token=off");
  Served server(s, false);
  EXPECT_TRUE(server.Call(s).ok());
}

TEST(SecurityTest, LoadRefusesInconsistentFlags) {
  testing::ScopedTempDir dir;
  const std::string cert = JoinPath(dir.path(), "node.crt");
  const std::string key = JoinPath(dir.path(), "node.key");
  const std::string ca = JoinPath(dir.path(), "ca.crt");
  ASSERT_TRUE(WriteFile(cert, Certs().node.cert_pem).ok());
  ASSERT_TRUE(WriteFile(key, Certs().node.key_pem).ok());
  ASSERT_TRUE(WriteFile(ca, Certs().ca.cert_pem).ok());
  const auto load = [](SecurityOptions o) { return Security::Load(o).status(); };

  SecurityOptions only_cert;
  only_cert.tls_cert = cert;
  EXPECT_TRUE(absl::IsInvalidArgument(load(only_cert)));
  EXPECT_THAT(load(only_cert).message(), HasSubstr("--tls_cert and --tls_key"));

  SecurityOptions mtls_without_ca;
  mtls_without_ca.tls_cert = cert;
  mtls_without_ca.tls_key = key;
  mtls_without_ca.require_client_cert = true;
  EXPECT_TRUE(absl::IsInvalidArgument(load(mtls_without_ca)));
  EXPECT_THAT(load(mtls_without_ca).message(), HasSubstr("--tls_require_client_cert needs"));

  SecurityOptions missing;
  missing.tls_ca = JoinPath(dir.path(), "nope.crt");
  EXPECT_TRUE(absl::IsNotFound(load(missing)));
  EXPECT_THAT(load(missing).message(), HasSubstr("--tls_ca: cannot read"));

  SecurityOptions swapped;  // a key where the certificate goes
  swapped.tls_cert = key;
  swapped.tls_key = key;
  EXPECT_TRUE(absl::IsInvalidArgument(load(swapped)));
  EXPECT_THAT(load(swapped).message(), HasSubstr("--tls_cert"));

  const std::string empty = JoinPath(dir.path(), "empty-token");
  ASSERT_TRUE(WriteFile(empty, " \n").ok());
  SecurityOptions empty_token;
  empty_token.cluster_token_file = empty;
  EXPECT_TRUE(absl::IsInvalidArgument(load(empty_token)));
  EXPECT_THAT(load(empty_token).message(), HasSubstr("is empty"));

  const std::string spaced = JoinPath(dir.path(), "spaced-token");
  ASSERT_TRUE(WriteFile(spaced, "two words\n").ok());
  SecurityOptions spaced_token;
  spaced_token.cluster_token_file = spaced;
  EXPECT_TRUE(absl::IsInvalidArgument(load(spaced_token)));

  SecurityOptions good;
  good.tls_cert = cert;
  good.tls_key = key;
  good.tls_ca = ca;
  good.require_client_cert = true;
  good.cluster_token_file = JoinPath(dir.path(), "token");
  ASSERT_TRUE(WriteFile(good.cluster_token_file, "s3cret\n").ok());
  absl::StatusOr<Security> s = Security::Load(good);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->Describe(), "tls=on mtls=on cluster_token=on");
}

double Refused(const prometheus::Registry& registry, const std::string& reason) {
  return testing::Metric(registry, "kvrelay_internal_calls_refused_total", {{"reason", reason}});
}

TEST(SecurityTest, ClusterTokenIsRequiredAndChecked) {
  Security server = Make(nullptr, "", false, "", "right-token");
  prometheus::Registry registry;
  server.CountRefusalsIn(registry);
  Served s(server, false);
  const grpc::Status none = s.Call(Security());
  EXPECT_EQ(none.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(none.error_message(), HasSubstr("no cluster token"));
  const grpc::Status wrong = s.Call(Make(nullptr, "", false, "", "wrong-token"));
  EXPECT_EQ(wrong.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(wrong.error_message(), HasSubstr("wrong cluster token"));
  EXPECT_TRUE(s.Call(server).ok());  // CreateChannel attaches the token
  EXPECT_EQ(Refused(registry, "no_token"), 1);
  EXPECT_EQ(Refused(registry, "wrong_token"), 1);
  EXPECT_EQ(Refused(registry, "no_certificate"), 0);
}

TEST(SecurityTest, TlsServerNeedsATlsClientThatTrustsItsCa) {
  const Security server = Make(&Certs().node, Certs().ca.cert_pem);
  Served s(server, false);
  EXPECT_EQ(s.Call(Security()).error_code(), grpc::StatusCode::UNAVAILABLE);  // plaintext
  EXPECT_EQ(s.Call(Make(nullptr, Certs().rogue_ca.cert_pem)).error_code(),
            grpc::StatusCode::UNAVAILABLE);  // another CA
  EXPECT_TRUE(s.Call(Make(nullptr, Certs().ca.cert_pem)).ok());
  // Without mTLS a client needs no certificate; internal calls are then open.
  EXPECT_FALSE(server.internal_authenticated());
}

TEST(SecurityTest, MutualTlsOnAnInternalPortRefusesCallersWithoutAClusterCertificate) {
  const Security server = Make(&Certs().node, Certs().ca.cert_pem, true);
  Served s(server, false);
  EXPECT_EQ(s.Call(Make(nullptr, Certs().ca.cert_pem)).error_code(),
            grpc::StatusCode::UNAVAILABLE);  // no certificate: the handshake fails
  EXPECT_EQ(s.Call(Make(&Certs().rogue_node, Certs().ca.cert_pem)).error_code(),
            grpc::StatusCode::UNAVAILABLE);  // a certificate of another CA
  EXPECT_TRUE(s.Call(Make(&Certs().node, Certs().ca.cert_pem)).ok());
}

TEST(SecurityTest, MutualTlsOnThePublicPortLetsThePublicInButNotIntoInternalCalls) {
  Security server = Make(&Certs().node, Certs().ca.cert_pem, true);
  prometheus::Registry registry;
  server.CountRefusalsIn(registry);
  Served s(server, /*public_port=*/true);
  // The handshake succeeds without a client certificate (public API clients have
  // none), but the internal handler refuses the caller.
  const grpc::Status anonymous = s.Call(Make(nullptr, Certs().ca.cert_pem));
  EXPECT_EQ(anonymous.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(anonymous.error_message(), HasSubstr("no certificate of the cluster CA"));
  // A certificate that is presented is verified.
  EXPECT_EQ(s.Call(Make(&Certs().rogue_node, Certs().ca.cert_pem)).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(s.Call(Make(&Certs().node, Certs().ca.cert_pem)).ok());
  EXPECT_EQ(Refused(registry, "no_certificate"), 1);
}

TEST(SecurityTest, MutualTlsAndTokenAreBothChecked) {
  const Security server = Make(&Certs().node, Certs().ca.cert_pem, true, "", "tok");
  Served s(server, false);
  EXPECT_EQ(s.Call(Make(&Certs().node, Certs().ca.cert_pem)).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);  // the certificate but no token
  EXPECT_TRUE(s.Call(Make(&Certs().node, Certs().ca.cert_pem, true, "", "tok")).ok());
}

TEST(SecurityTest, ServerNameOverrideChecksTheCertificateAgainstOneClusterName) {
  // A certificate naming only kvrelay-internal, served on 127.0.0.1.
  const Security server = Make(&Certs().named_only, Certs().ca.cert_pem);
  Served s(server, false);
  EXPECT_EQ(s.Call(Make(nullptr, Certs().ca.cert_pem)).error_code(),
            grpc::StatusCode::UNAVAILABLE);  // 127.0.0.1 is not in the certificate
  EXPECT_TRUE(s.Call(Make(nullptr, Certs().ca.cert_pem, false, "kvrelay-internal")).ok());
  EXPECT_EQ(s.Call(Make(nullptr, Certs().ca.cert_pem, false, "elsewhere")).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

}  // namespace
}  // namespace kvrelay::rpc

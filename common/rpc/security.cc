#include "common/rpc/security.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/util/file.h"
#include "common/util/status.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/auth_context.h"
#include "grpcpp/support/client_interceptor.h"

namespace kvrelay::rpc {

namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* flag, const char* what) {
  absl::StatusOr<std::string> s = ReadFile(path);
  if (!s.ok()) return absl::NotFoundError(absl::StrCat(flag, ": cannot read ", path));
  if (!absl::StrContains(*s, "-----BEGIN ") || !absl::StrContains(*s, what)) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " ", path, ": not a PEM file holding a ", what));
  }
  return s;
}

// Adds the cluster token to the initial metadata of every call on a channel.
class TokenInterceptor : public grpc::experimental::Interceptor {
 public:
  explicit TokenInterceptor(const std::string* token) : token_(token) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->insert({kClusterTokenHeader, *token_});
    }
    methods->Proceed();
  }

 private:
  const std::string* token_;  // owned by the factory, which the channel keeps
};

class TokenInterceptorFactory : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit TokenInterceptorFactory(std::string token) : token_(std::move(token)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* /*info*/) override {
    return new TokenInterceptor(&token_);
  }

 private:
  const std::string token_;
};

}  // namespace

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  // Compare over the longer length so the time depends on neither string's content.
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= x ^ y;
  }
  return diff == 0;
}

absl::StatusOr<Security> Security::Load(const SecurityOptions& o) {
  if (o.tls_cert.empty() != o.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key go together: set both or neither");
  }
  std::string cert, key, ca, token;
  if (!o.tls_cert.empty()) {
    KVR_ASSIGN_OR_RETURN(cert, ReadPem(o.tls_cert, "--tls_cert", "CERTIFICATE"));
    KVR_ASSIGN_OR_RETURN(key, ReadPem(o.tls_key, "--tls_key", "PRIVATE KEY"));
  }
  if (!o.tls_ca.empty()) {
    KVR_ASSIGN_OR_RETURN(ca, ReadPem(o.tls_ca, "--tls_ca", "CERTIFICATE"));
  }
  if (!o.cluster_token_file.empty()) {
    absl::StatusOr<std::string> t = ReadFile(o.cluster_token_file);
    if (!t.ok()) {
      return absl::NotFoundError(
          absl::StrCat("--cluster_token_file: cannot read ", o.cluster_token_file));
    }
    token = std::string(absl::StripAsciiWhitespace(*t));
    if (token.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--cluster_token_file ", o.cluster_token_file, " is empty"));
    }
  }
  return FromPem(std::move(cert), std::move(key), std::move(ca), o.require_client_cert,
                 o.tls_server_name, std::move(token));
}

absl::StatusOr<Security> Security::FromPem(std::string cert, std::string key, std::string ca,
                                           bool require_client_cert, std::string server_name,
                                           std::string cluster_token) {
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key go together: set both or neither");
  }
  if (require_client_cert && (cert.empty() || ca.empty())) {
    return absl::InvalidArgumentError(
        "--tls_require_client_cert needs --tls_cert, --tls_key (what this process presents) and "
        "--tls_ca (what it verifies peers against)");
  }
  for (char c : cluster_token) {
    // Metadata values must be printable ASCII.
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(
          "--cluster_token_file: the token must be printable ASCII without spaces");
    }
  }
  Security s;
  if (!cert.empty() || !ca.empty()) {
    s.pem_ = std::make_shared<const Pem>(Pem{std::move(cert), std::move(key), std::move(ca)});
  }
  s.require_client_cert_ = require_client_cert;
  s.server_name_ = std::move(server_name);
  s.token_ = std::move(cluster_token);
  return s;
}

std::string Security::Describe() const {
  return absl::StrCat("tls=", tls() ? "on" : "off", " mtls=", mtls() ? "on" : "off",
                      " cluster_token=", has_token() ? "on" : "off");
}

std::shared_ptr<grpc::ServerCredentials> Security::ServerCredentials(bool public_port) const {
  if (!tls()) return grpc::InsecureServerCredentials();
  grpc_ssl_client_certificate_request_type request = GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE;
  if (mtls()) {
    request = public_port ? GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY
                          : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  grpc::SslServerCredentialsOptions options(request);
  options.pem_root_certs = pem_->ca;
  options.pem_key_cert_pairs.push_back({pem_->key, pem_->cert});
  return grpc::SslServerCredentials(options);
}

std::shared_ptr<grpc::ChannelCredentials> Security::ChannelCredentials() const {
  if (!client_tls()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = pem_->ca;  // empty: the system's roots
  options.pem_private_key = pem_->key;
  options.pem_cert_chain = pem_->cert;
  return grpc::SslCredentials(options);
}

void Security::ApplyChannelArguments(grpc::ChannelArguments& args) const {
  if (client_tls() && !server_name_.empty()) args.SetSslTargetNameOverride(server_name_);
}

std::shared_ptr<grpc::Channel> Security::CreateChannel(const std::string& address,
                                                       grpc::ChannelArguments args) const {
  ApplyChannelArguments(args);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> interceptors;
  if (has_token()) interceptors.push_back(std::make_unique<TokenInterceptorFactory>(token_));
  return grpc::experimental::CreateCustomChannelWithInterceptors(address, ChannelCredentials(),
                                                                 args, std::move(interceptors));
}

std::optional<grpc::Status> Security::CheckInternalCaller(
    const grpc::ServerContextBase& context) const {
  if (mtls()) {
    const std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
    if (auth == nullptr || !auth->IsPeerAuthenticated()) {
      if (refusals_) refusals_->no_certificate->Increment();
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "internal RPC: the caller presented no certificate of the cluster CA "
                          "(mTLS is on: --tls_cert/--tls_key signed by --tls_ca)");
    }
  }
  if (has_token()) {
    const auto& md = context.client_metadata();
    const auto it = md.find(kClusterTokenHeader);
    if (it == md.end()) {
      if (refusals_) refusals_->no_token->Increment();
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "internal RPC: no cluster token (x-kvrelay-cluster-token; the callers "
                          "need the same --cluster_token_file)");
    }
    if (!ConstantTimeEquals(absl::string_view(it->second.data(), it->second.size()), token_)) {
      if (refusals_) refusals_->wrong_token->Increment();
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "internal RPC: wrong cluster token (--cluster_token_file differs)");
    }
  }
  return std::nullopt;
}

void Security::CountRefusalsIn(prometheus::Registry& registry) {
  auto& family = prometheus::BuildCounter()
                     .Name("kvrelay_internal_calls_refused_total")
                     .Help(
                         "Internal RPCs refused: the caller had no certificate of the cluster "
                         "CA (mTLS), no cluster token, or a wrong one")
                     .Register(registry);
  refusals_ = std::make_shared<const Refusals>(Refusals{&family.Add({{"reason", "no_certificate"}}),
                                                        &family.Add({{"reason", "no_token"}}),
                                                        &family.Add({{"reason", "wrong_token"}})});
}

}  // namespace kvrelay::rpc

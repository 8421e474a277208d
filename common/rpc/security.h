// Transport security and internal-port authentication (issue 17) for every gRPC server
// and client kvrelay's processes run.
//
// TLS: with a certificate and key, servers speak TLS; with a CA, clients verify their
// peer against it (and present the certificate, when they have one). Mutual TLS
// (`require_client_cert`): internal ports (the workers' services, the router's
// Registry) accept only peers whose certificate the cluster CA signed. The router's
// port also carries the public API, whose clients have no certificate: it asks for one
// and verifies any it gets, and its Registry handlers refuse a peer without one.
//
// Cluster token: a shared secret every internal call carries in metadata
// (`x-kvrelay-cluster-token`) and every internal handler checks (in constant time).
// It is the internal ports' authentication when mTLS is off, and is checked as well
// when both are on. Neither configured: internal ports are open (the processes warn).
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/channel_arguments.h"
#include "grpcpp/support/status.h"
#include "prometheus/counter.h"
#include "prometheus/registry.h"

namespace kvrelay::rpc {

inline constexpr char kClusterTokenHeader[] = "x-kvrelay-cluster-token";

// File paths, as the flags give them (empty: not set).
struct SecurityOptions {
  std::string tls_cert;              // PEM certificate (chain) this process presents
  std::string tls_key;               // its PEM private key
  std::string tls_ca;                // PEM CA bundle peers are verified against
  bool require_client_cert = false;  // mTLS on internal ports
  // Name internal peers' certificates are checked against, instead of the host in the
  // address dialled (pod IPs are rarely in a certificate: use one cluster-wide name).
  std::string tls_server_name;
  std::string cluster_token_file;  // the shared secret, one line
};

// The loaded credentials. Cheap to copy (the PEM strings are shared).
class Security {
 public:
  // No TLS, no token: plaintext, internal ports open.
  Security() = default;
  // Reads the files. INVALID_ARGUMENT naming the flag for an inconsistent set (a
  // certificate without its key, mTLS without a CA or without a certificate, an empty
  // token file, a file that is not PEM), NOT_FOUND for a file that cannot be read.
  static absl::StatusOr<Security> Load(const SecurityOptions& options);
  // For tests and in-process use: PEM contents rather than paths.
  static absl::StatusOr<Security> FromPem(std::string cert, std::string key, std::string ca,
                                          bool require_client_cert, std::string server_name,
                                          std::string cluster_token);

  // Servers speak TLS (a certificate and key are configured).
  bool tls() const { return pem_ != nullptr && !pem_->cert.empty(); }
  // Clients speak TLS (a CA or a certificate is configured; no CA: the system's roots).
  bool client_tls() const { return pem_ != nullptr && (!pem_->ca.empty() || !pem_->cert.empty()); }
  bool mtls() const { return require_client_cert_; }
  bool has_token() const { return !token_.empty(); }
  // True when internal ports check something (mTLS or a token).
  bool internal_authenticated() const { return mtls() || has_token(); }
  // The PEM this process presents (empty without TLS), e.g. for the router's HTTPS.
  const std::string& cert_pem() const { return pem_ != nullptr ? pem_->cert : Empty(); }
  const std::string& key_pem() const { return pem_ != nullptr ? pem_->key : Empty(); }
  // "tls=on mtls=off cluster_token=on" for start-up logs.
  std::string Describe() const;

  // Credentials of a server. `public_port`: the port also serves clients without a
  // certificate (the router), so under mTLS a certificate is requested, not required.
  std::shared_ptr<grpc::ServerCredentials> ServerCredentials(bool public_port) const;
  // Credentials of a client of kvrelay's own servers (TLS when a CA is configured).
  std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials() const;
  // Adds the TLS name override (tls_server_name) to a channel's arguments.
  void ApplyChannelArguments(grpc::ChannelArguments& args) const;
  // A channel to an internal port: credentials, the name override, and an interceptor
  // attaching the cluster token to every call. `args` carries the caller's own settings.
  std::shared_ptr<grpc::Channel> CreateChannel(const std::string& address,
                                               grpc::ChannelArguments args) const;

  // For the first line of an internal RPC handler: nullopt when the caller may call,
  // else UNAUTHENTICATED saying what was missing (counted, see CountRefusalsIn).
  std::optional<grpc::Status> CheckInternalCaller(const grpc::ServerContextBase& context) const;

  // Counts the calls CheckInternalCaller refuses in `registry`, as
  // kvrelay_internal_calls_refused_total{reason="no_certificate"|"no_token"|"wrong_token"}.
  // Copies made afterwards share the counters. (A peer whose TLS handshake fails never
  // reaches a handler and is not counted here.)
  void CountRefusalsIn(prometheus::Registry& registry);

 private:
  struct Pem {
    std::string cert, key, ca;
  };
  static const std::string& Empty() {
    static const std::string* empty = new std::string();
    return *empty;
  }
  std::shared_ptr<const Pem> pem_;
  bool require_client_cert_ = false;
  std::string server_name_;
  std::string token_;
  struct Refusals {
    prometheus::Counter* no_certificate;
    prometheus::Counter* no_token;
    prometheus::Counter* wrong_token;
  };
  std::shared_ptr<const Refusals> refusals_;  // null: not counted
};

// Equal strings, in time independent of where they differ.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

}  // namespace kvrelay::rpc

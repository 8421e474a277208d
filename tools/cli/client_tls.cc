#include "tools/cli/client_tls.h"

#include "common/rpc/security.h"

namespace kvrelay::cli {

void DeclareClientTlsFlags(Args& args) {
  args.Flag("tls-ca", Args::Kind::kString,
            "PEM CA the server's certificate is verified against: connect with TLS")
      .Flag("tls-server-name", Args::Kind::kString,
            "with --tls-ca: the name the server's certificate must carry (default: the host)")
      .Flag("tls-cert", Args::Kind::kString,
            "PEM certificate to present (ports with mutual TLS), with --tls-key")
      .Flag("tls-key", Args::Kind::kString, "PEM private key of --tls-cert");
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> ClientChannel(const Args& args,
                                                             const std::string& server) {
  rpc::SecurityOptions o;
  o.tls_ca = args.GetString("tls-ca", "");
  o.tls_server_name = args.GetString("tls-server-name", "");
  o.tls_cert = args.GetString("tls-cert", "");
  o.tls_key = args.GetString("tls-key", "");
  absl::StatusOr<rpc::Security> s = rpc::Security::Load(o);
  if (!s.ok()) {
    // The flags here are spelled with dashes.
    std::string m(s.status().message());
    for (size_t at = m.find("--tls_"); at != std::string::npos; at = m.find("--tls_", at)) {
      for (size_t i = at + 2; i < m.size() && m[i] != ' ' && m[i] != ':' && m[i] != ','; ++i) {
        if (m[i] == '_') m[i] = '-';
      }
      at += 2;
    }
    return absl::Status(s.status().code(), m);
  }
  return s->CreateChannel(server, grpc::ChannelArguments());
}

}  // namespace kvrelay::cli

// Throw-away certificates for local use and tests (issue 17): a CA and certificates it
// signs, made with OpenSSL (EC P-256 keys, SHA-256 signatures). Production clusters
// bring their own (cert-manager); `kvrelay local --tls` and the TLS tests use these.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvrelay::rpc {

struct KeyAndCert {
  std::string key_pem;   // PKCS#8 private key
  std::string cert_pem;  // X.509 certificate
};

// A self-signed CA certificate named `common_name`, valid for `days`.
absl::StatusOr<KeyAndCert> MakeCertificateAuthority(const std::string& common_name, int days = 30);

// A leaf certificate signed by `ca`, good for both server and client authentication.
// `hosts` become subjectAltNames: IP addresses as IP entries, anything else as DNS names.
absl::StatusOr<KeyAndCert> IssueCertificate(const KeyAndCert& ca, const std::string& common_name,
                                            const std::vector<std::string>& hosts, int days = 30);

// `bytes` random bytes (OpenSSL's CSPRNG) as lowercase hex: a cluster token.
absl::StatusOr<std::string> RandomToken(int bytes = 32);

// Writes ca.crt, ca.key, node.crt, node.key and cluster-token into `dir` (created if
// missing, 0700; keys and token 0600): one node certificate for every process, naming
// localhost, 127.0.0.1, ::1 and the `extra_hosts`.
absl::Status WriteLocalPki(const std::string& dir,
                           const std::vector<std::string>& extra_hosts = {});

}  // namespace kvrelay::rpc

#include "common/rpc/pki.h"

#include <sys/stat.h>

#include <memory>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/util/file.h"
#include "common/util/status.h"
#include "openssl/bio.h"
#include "openssl/bn.h"
#include "openssl/err.h"
#include "openssl/evp.h"
#include "openssl/pem.h"
#include "openssl/rand.h"
#include "openssl/x509.h"
#include "openssl/x509v3.h"

namespace kvrelay::rpc {

namespace {

struct Free {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
  void operator()(X509* p) const { X509_free(p); }
  void operator()(BIO* p) const { BIO_free(p); }
  void operator()(BIGNUM* p) const { BN_free(p); }
};
template <typename T>
using Owned = std::unique_ptr<T, Free>;

absl::Status OpenSslError(const char* what) {
  char buf[256] = {0};
  ERR_error_string_n(ERR_get_error(), buf, sizeof buf);
  return absl::InternalError(absl::StrCat("OpenSSL: ", what, ": ", buf));
}

std::string BioString(BIO* bio) {
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  return std::string(data, static_cast<size_t>(n));
}

absl::StatusOr<std::string> KeyPem(EVP_PKEY* key) {
  Owned<BIO> bio(BIO_new(BIO_s_mem()));
  if (!PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr)) {
    return OpenSslError("writing a key");
  }
  return BioString(bio.get());
}

absl::StatusOr<std::string> CertPem(X509* cert) {
  Owned<BIO> bio(BIO_new(BIO_s_mem()));
  if (!PEM_write_bio_X509(bio.get(), cert)) return OpenSslError("writing a certificate");
  return BioString(bio.get());
}

absl::StatusOr<Owned<EVP_PKEY>> ParseKey(const std::string& pem) {
  Owned<BIO> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  Owned<EVP_PKEY> key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (key == nullptr) return OpenSslError("reading the CA key");
  return key;
}

absl::StatusOr<Owned<X509>> ParseCert(const std::string& pem) {
  Owned<BIO> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  Owned<X509> cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (cert == nullptr) return OpenSslError("reading the CA certificate");
  return cert;
}

absl::Status AddExtension(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
  if (ext == nullptr) return OpenSslError(value.c_str());
  const int ok = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  if (!ok) return OpenSslError("adding an extension");
  return absl::OkStatus();
}

// A certificate for `key` named `common_name`, not yet signed or extended.
absl::StatusOr<Owned<X509>> NewCert(EVP_PKEY* key, const std::string& common_name, int days) {
  Owned<X509> cert(X509_new());
  if (cert == nullptr || !X509_set_version(cert.get(), 2)) return OpenSslError("X509_new");
  unsigned char serial[16];
  if (RAND_bytes(serial, sizeof serial) != 1) return OpenSslError("RAND_bytes");
  serial[0] &= 0x7f;  // positive
  Owned<BIGNUM> bn(BN_bin2bn(serial, sizeof serial, nullptr));
  if (bn == nullptr || BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert.get())) == nullptr) {
    return OpenSslError("serial number");
  }
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);  // tolerate a skewed clock
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), static_cast<long>(days) * 86400);
  if (!X509_set_pubkey(cert.get(), key)) return OpenSslError("X509_set_pubkey");
  X509_NAME* name = X509_get_subject_name(cert.get());
  if (!X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                                  reinterpret_cast<const unsigned char*>("kvrelay"), -1, -1, 0) ||
      !X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                  reinterpret_cast<const unsigned char*>(common_name.c_str()), -1,
                                  -1, 0)) {
    return OpenSslError("subject name");
  }
  return cert;
}

bool IsIpAddress(const std::string& host) {
  ASN1_OCTET_STRING* ip = a2i_IPADDRESS(host.c_str());
  if (ip == nullptr) return false;
  ASN1_OCTET_STRING_free(ip);
  return true;
}

}  // namespace

absl::StatusOr<KeyAndCert> MakeCertificateAuthority(const std::string& common_name, int days) {
  Owned<EVP_PKEY> key(EVP_EC_gen("P-256"));
  if (key == nullptr) return OpenSslError("generating a key");
  KVR_ASSIGN_OR_RETURN(Owned<X509> cert, NewCert(key.get(), common_name, days));
  if (!X509_set_issuer_name(cert.get(), X509_get_subject_name(cert.get()))) {
    return OpenSslError("issuer name");
  }
  KVR_RETURN_IF_ERROR(
      AddExtension(cert.get(), cert.get(), NID_basic_constraints, "critical,CA:TRUE"));
  KVR_RETURN_IF_ERROR(
      AddExtension(cert.get(), cert.get(), NID_key_usage, "critical,keyCertSign,cRLSign"));
  KVR_RETURN_IF_ERROR(AddExtension(cert.get(), cert.get(), NID_subject_key_identifier, "hash"));
  if (!X509_sign(cert.get(), key.get(), EVP_sha256())) return OpenSslError("signing");
  KeyAndCert out;
  KVR_ASSIGN_OR_RETURN(out.key_pem, KeyPem(key.get()));
  KVR_ASSIGN_OR_RETURN(out.cert_pem, CertPem(cert.get()));
  return out;
}

absl::StatusOr<KeyAndCert> IssueCertificate(const KeyAndCert& ca, const std::string& common_name,
                                            const std::vector<std::string>& hosts, int days) {
  KVR_ASSIGN_OR_RETURN(Owned<EVP_PKEY> ca_key, ParseKey(ca.key_pem));
  KVR_ASSIGN_OR_RETURN(Owned<X509> ca_cert, ParseCert(ca.cert_pem));
  Owned<EVP_PKEY> key(EVP_EC_gen("P-256"));
  if (key == nullptr) return OpenSslError("generating a key");
  KVR_ASSIGN_OR_RETURN(Owned<X509> cert, NewCert(key.get(), common_name, days));
  if (!X509_set_issuer_name(cert.get(), X509_get_subject_name(ca_cert.get()))) {
    return OpenSslError("issuer name");
  }
  X509* c = cert.get();
  KVR_RETURN_IF_ERROR(AddExtension(c, ca_cert.get(), NID_basic_constraints, "critical,CA:FALSE"));
  KVR_RETURN_IF_ERROR(
      AddExtension(c, ca_cert.get(), NID_key_usage, "critical,digitalSignature,keyEncipherment"));
  KVR_RETURN_IF_ERROR(AddExtension(c, ca_cert.get(), NID_ext_key_usage, "serverAuth,clientAuth"));
  KVR_RETURN_IF_ERROR(AddExtension(c, ca_cert.get(), NID_subject_key_identifier, "hash"));
  KVR_RETURN_IF_ERROR(AddExtension(c, ca_cert.get(), NID_authority_key_identifier, "keyid"));
  if (!hosts.empty()) {
    std::vector<std::string> names;
    for (const std::string& h : hosts) {
      names.push_back(absl::StrCat(IsIpAddress(h) ? "IP:" : "DNS:", h));
    }
    KVR_RETURN_IF_ERROR(
        AddExtension(c, ca_cert.get(), NID_subject_alt_name, absl::StrJoin(names, ",")));
  }
  if (!X509_sign(c, ca_key.get(), EVP_sha256())) return OpenSslError("signing");
  KeyAndCert out;
  KVR_ASSIGN_OR_RETURN(out.key_pem, KeyPem(key.get()));
  KVR_ASSIGN_OR_RETURN(out.cert_pem, CertPem(c));
  return out;
}

absl::StatusOr<std::string> RandomToken(int bytes) {
  std::string raw(static_cast<size_t>(bytes), '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(raw.data()), bytes) != 1) {
    return OpenSslError("RAND_bytes");
  }
  return absl::BytesToHexString(raw);
}

absl::Status WriteLocalPki(const std::string& dir, const std::vector<std::string>& extra_hosts) {
  KVR_RETURN_IF_ERROR(MakeDirs(dir));
  if (::chmod(dir.c_str(), 0700) != 0) return absl::InternalError(absl::StrCat("chmod 0700 ", dir));
  KVR_ASSIGN_OR_RETURN(KeyAndCert ca, MakeCertificateAuthority("kvrelay local CA"));
  std::vector<std::string> hosts = {"localhost", "127.0.0.1", "::1"};
  hosts.insert(hosts.end(), extra_hosts.begin(), extra_hosts.end());
  KVR_ASSIGN_OR_RETURN(KeyAndCert node, IssueCertificate(ca, "kvrelay node", hosts));
  const auto write = [&](const char* name, const std::string& contents, bool secret) {
    const std::string path = JoinPath(dir, name);
    KVR_RETURN_IF_ERROR(WriteFile(path, contents));
    if (secret && ::chmod(path.c_str(), 0600) != 0) {
      return absl::InternalError(absl::StrCat("chmod 0600 ", path));
    }
    return absl::OkStatus();
  };
  KVR_RETURN_IF_ERROR(write("ca.crt", ca.cert_pem, false));
  KVR_RETURN_IF_ERROR(write("ca.key", ca.key_pem, true));
  KVR_RETURN_IF_ERROR(write("node.crt", node.cert_pem, false));
  KVR_RETURN_IF_ERROR(write("node.key", node.key_pem, true));
  KVR_ASSIGN_OR_RETURN(const std::string token, RandomToken());
  KVR_RETURN_IF_ERROR(write("cluster-token", token + "\n", true));
  return absl::OkStatus();
}

}  // namespace kvrelay::rpc

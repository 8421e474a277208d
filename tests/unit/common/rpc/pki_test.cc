#include "common/rpc/pki.h"

#include <sys/stat.h>

#include <memory>
#include <string>

#include "common/util/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "openssl/bio.h"
#include "openssl/pem.h"
#include "openssl/x509.h"
#include "openssl/x509_vfy.h"
#include "openssl/x509v3.h"
#include "tests/testing/temp_dir.h"

namespace kvrelay::rpc {
namespace {

struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;

X509Ptr Parse(const std::string& pem) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  X509Ptr x(PEM_read_bio_X509(bio, nullptr, nullptr, nullptr));
  BIO_free(bio);
  return x;
}

// Whether `leaf` verifies against `ca` for `host` (an IP or a DNS name).
bool Verifies(const std::string& ca, const std::string& leaf, const std::string& host) {
  X509Ptr c = Parse(ca), l = Parse(leaf);
  if (!c || !l) return false;
  X509_STORE* store = X509_STORE_new();
  X509_STORE_add_cert(store, c.get());
  X509_STORE_CTX* ctx = X509_STORE_CTX_new();
  X509_STORE_CTX_init(ctx, store, l.get(), nullptr);
  X509_VERIFY_PARAM* param = X509_STORE_CTX_get0_param(ctx);
  if (X509_VERIFY_PARAM_set1_ip_asc(param, host.c_str()) != 1) {
    X509_VERIFY_PARAM_set1_host(param, host.c_str(), 0);
  }
  const bool ok = X509_verify_cert(ctx) == 1;
  X509_STORE_CTX_free(ctx);
  X509_STORE_free(store);
  return ok;
}

TEST(PkiTest, CaSignsLeavesThatVerifyForTheirHostsOnly) {
  absl::StatusOr<KeyAndCert> ca = MakeCertificateAuthority("test CA");
  ASSERT_TRUE(ca.ok()) << ca.status();
  EXPECT_THAT(ca->cert_pem, ::testing::StartsWith("-----BEGIN CERTIFICATE-----"));
  EXPECT_THAT(ca->key_pem, ::testing::StartsWith("-----BEGIN PRIVATE KEY-----"));
  X509Ptr parsed = Parse(ca->cert_pem);
  ASSERT_TRUE(parsed);
  EXPECT_EQ(X509_check_ca(parsed.get()), 1);

  absl::StatusOr<KeyAndCert> leaf = IssueCertificate(*ca, "node", {"localhost", "10.1.2.3"});
  ASSERT_TRUE(leaf.ok()) << leaf.status();
  EXPECT_EQ(X509_check_ca(Parse(leaf->cert_pem).get()), 0);
  EXPECT_TRUE(Verifies(ca->cert_pem, leaf->cert_pem, "10.1.2.3"));
  EXPECT_TRUE(Verifies(ca->cert_pem, leaf->cert_pem, "localhost"));
  EXPECT_FALSE(Verifies(ca->cert_pem, leaf->cert_pem, "10.1.2.4"));
  EXPECT_FALSE(Verifies(ca->cert_pem, leaf->cert_pem, "example.com"));

  absl::StatusOr<KeyAndCert> other = MakeCertificateAuthority("other CA");
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(Verifies(other->cert_pem, leaf->cert_pem, "localhost"));
}

TEST(PkiTest, IssueRefusesABrokenCa) {
  KeyAndCert bad{"not a key", "not a certificate"};
  absl::StatusOr<KeyAndCert> leaf = IssueCertificate(bad, "node", {"localhost"});
  EXPECT_FALSE(leaf.ok());
  EXPECT_THAT(leaf.status().message(), ::testing::HasSubstr("OpenSSL"));
}

TEST(PkiTest, RandomTokensAreHexAndDiffer) {
  absl::StatusOr<std::string> a = RandomToken(), b = RandomToken();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->size(), 64u);
  EXPECT_NE(*a, *b);
  EXPECT_EQ(a->find_first_not_of("0123456789abcdef"), std::string::npos);
}

TEST(PkiTest, LocalPkiWritesEveryFileWithPrivateKeysHidden) {
  testing::ScopedTempDir tmp;
  const std::string dir = tmp.File("tls");
  ASSERT_TRUE(WriteLocalPki(dir, {"kvrelay-internal"}).ok());
  struct stat st;
  ASSERT_EQ(::stat(dir.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  for (const char* f : {"ca.key", "node.key", "cluster-token"}) {
    ASSERT_EQ(::stat(JoinPath(dir, f).c_str(), &st), 0) << f;
    EXPECT_EQ(st.st_mode & 0777, 0600u) << f;
  }
  const std::string ca = *ReadFile(JoinPath(dir, "ca.crt"));
  const std::string node = *ReadFile(JoinPath(dir, "node.crt"));
  for (const char* host : {"127.0.0.1", "::1", "localhost", "kvrelay-internal"}) {
    EXPECT_TRUE(Verifies(ca, node, host)) << host;
  }
  EXPECT_EQ(ReadFile(JoinPath(dir, "cluster-token"))->size(), 65u);  // 64 hex + newline
}

}  // namespace
}  // namespace kvrelay::rpc

// router/civetweb_openssl: once the shims are loaded, civetweb's dlopen("libssl.so") and
// dlopen("libcrypto.so") get them (matched by SONAME, whatever is on disk), and dlsym on
// them finds OpenSSL 3's functions plus the one civetweb 1.15 wants that OpenSSL 3 only
// has as a macro. (libcrypto_shim.cc has nothing else to test: it is covered here.)
#include <dlfcn.h>
#include <unistd.h>

#include <string>

#include "gtest/gtest.h"

namespace kvrelay::router {
namespace {

std::string ShimDir() {
  char exe[4096];
  const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  const std::string path(exe, n > 0 ? static_cast<size_t>(n) : 0);
  return path.substr(0, path.rfind('/')) + "/../lib/kvrelay/";
}

TEST(LibsslShimTest, CivetwebsNamesResolveToTheShimsAndOpenSsl3) {
  void* crypto = ::dlopen((ShimDir() + "libkvrelay_civetweb_crypto.so").c_str(), RTLD_NOW);
  ASSERT_NE(crypto, nullptr) << ::dlerror();
  void* ssl = ::dlopen((ShimDir() + "libkvrelay_civetweb_ssl.so").c_str(), RTLD_NOW);
  ASSERT_NE(ssl, nullptr) << ::dlerror();
  // What civetweb does: the unversioned names, found by SONAME among loaded objects.
  EXPECT_EQ(::dlopen("libssl.so", RTLD_LAZY), ssl);
  EXPECT_EQ(::dlopen("libcrypto.so", RTLD_LAZY), crypto);
  // OpenSSL 1.1's name, defined by the shim; the rest from libssl.so.3/libcrypto.so.3.
  void* get_peer = ::dlsym(ssl, "SSL_get_peer_certificate");
  EXPECT_NE(get_peer, nullptr);
  EXPECT_NE(get_peer, ::dlsym(ssl, "SSL_get1_peer_certificate"));  // a function of its own
  EXPECT_NE(::dlsym(ssl, "SSL_CTX_new"), nullptr);
  EXPECT_NE(::dlsym(ssl, "SSL_accept"), nullptr);
  EXPECT_NE(::dlsym(crypto, "ERR_get_error"), nullptr);
  EXPECT_NE(::dlsym(crypto, "CRYPTO_free"), nullptr);
}

TEST(LibsslShimTest, SslGetPeerCertificateIsNullWithoutAPeer) {
  void* ssl = ::dlopen((ShimDir() + "libkvrelay_civetweb_ssl.so").c_str(), RTLD_NOW);
  ASSERT_NE(ssl, nullptr) << ::dlerror();
  using CtxNew = void* (*)(const void*);
  using Method = const void* (*)();
  using New = void* (*)(void*);
  using GetPeer = void* (*)(const void*);
  using Free = void (*)(void*);
  auto ctx_new = reinterpret_cast<CtxNew>(::dlsym(ssl, "SSL_CTX_new"));
  auto method = reinterpret_cast<Method>(::dlsym(ssl, "TLS_server_method"));
  auto ssl_new = reinterpret_cast<New>(::dlsym(ssl, "SSL_new"));
  auto get_peer = reinterpret_cast<GetPeer>(::dlsym(ssl, "SSL_get_peer_certificate"));
  auto ssl_free = reinterpret_cast<Free>(::dlsym(ssl, "SSL_free"));
  auto ctx_free = reinterpret_cast<Free>(::dlsym(ssl, "SSL_CTX_free"));
  ASSERT_TRUE(ctx_new && method && ssl_new && get_peer && ssl_free && ctx_free);
  void* ctx = ctx_new(method());
  ASSERT_NE(ctx, nullptr);
  void* s = ssl_new(ctx);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(get_peer(s), nullptr);  // no handshake: no peer certificate (civetweb's case)
  ssl_free(s);
  ctx_free(ctx);
}

}  // namespace
}  // namespace kvrelay::router

// What Debian's civetweb 1.15 needs to serve HTTPS with OpenSSL 3 (the router's HTTPS,
// router/openai_server.h).
//
// civetweb loads OpenSSL at run time: dlopen("libssl.so") and dlopen("libcrypto.so"),
// then dlsym of each function it uses. Two problems on Debian 12: those unversioned names
// exist only where libssl-dev is installed, and OpenSSL 3 has no function
// SSL_get_peer_certificate any more (it is a macro for SSL_get1_peer_certificate), so
// civetweb calls a null pointer on every TLS connection.
//
// This library's SONAME is "libssl.so" and it needs libssl.so.3. The router dlopens it
// by its path (<bin>/../lib/kvrelay/, router/openai_server.cc) before civetweb starts
// TLS, so civetweb's dlopen("libssl.so") finds it by its SONAME (the dynamic loader
// matches loaded objects' SONAMEs before searching the disk), and dlsym on it finds
// every other function in libssl.so.3, one of its needed libraries. Its twin
// libcrypto_shim.cc does the same for "libcrypto.so". (It lives in a folder of its own,
// outside ldconfig's, so that no "libssl.so" link to it is ever made for other programs.)
#include <openssl/ssl.h>
#include <openssl/x509.h>

// OpenSSL 3 keeps the old name as a macro only.
#undef SSL_get_peer_certificate

extern "C" {

// OpenSSL 1.1's function: the same reference counting (the caller frees the certificate).
__attribute__((visibility("default"))) X509* SSL_get_peer_certificate(const SSL* ssl) {
  return SSL_get1_peer_certificate(ssl);
}
}

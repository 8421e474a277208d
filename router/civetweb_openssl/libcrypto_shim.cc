// SONAME "libcrypto.so", needing libcrypto.so.3: civetweb's dlopen("libcrypto.so") finds
// this library (loaded by the router first) by its SONAME, and dlsym on it finds
// libcrypto.so.3's functions (see libssl_shim.cc). Nothing of its own.
extern "C" {
__attribute__((visibility("default"))) int kvrelay_civetweb_crypto_shim = 1;
}

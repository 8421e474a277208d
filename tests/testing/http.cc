#include "tests/testing/http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"

namespace kvrelay::testing {

namespace {

// A TCP connection to ipv4:port (-1 on failure).
int Connect(int port, const std::string& ipv4 = "127.0.0.1") {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (::inet_pton(AF_INET, ipv4.c_str(), &addr.sin_addr) != 1) {
    ::close(fd);
    return -1;
  }
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

std::string RequestText(const std::string& method, const std::string& path, const std::string& body,
                        const std::vector<std::string>& headers) {
  std::string req =
      absl::StrCat(method, " ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n", "Connection: close\r\n");
  for (const std::string& h : headers) absl::StrAppend(&req, h, "\r\n");
  if (!body.empty() || method == "POST") {
    absl::StrAppend(&req, "Content-Type: application/json\r\nContent-Length: ", body.size(),
                    "\r\n");
  }
  absl::StrAppend(&req, "\r\n", body);
  return req;
}

// The status, headers and body of an HTTP/1.x answer (status 0 if it is not one).
HttpResponse ParseResponse(const std::string& resp) {
  HttpResponse r;
  const size_t head = resp.find("\r\n\r\n");
  if (head == std::string::npos || resp.size() < 12 || resp.rfind("HTTP/1.", 0) != 0) return r;
  int status = 0;
  if (!absl::SimpleAtoi(resp.substr(9, 3), &status)) return r;
  r.status = status;
  r.headers = resp.substr(0, head);
  r.body = resp.substr(head + 4);
  return r;
}

bool WriteAll(int fd, const std::string& s) {
  size_t done = 0;
  while (done < s.size()) {
    const ssize_t n = ::send(fd, s.data() + done, s.size() - done, MSG_NOSIGNAL);
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// Appends what arrives on fd to *out until `done(*out)`, EOF or the deadline; false on
// a timeout or an error.
template <typename Done>
bool ReadUntil(int fd, absl::Time deadline, std::string* out, Done done) {
  char buf[16384];
  while (!done(*out)) {
    const int ms = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
    if (ms <= 0) return false;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, ms) <= 0) return false;
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0) return false;
    if (n == 0) return true;  // EOF
    out->append(buf, static_cast<size_t>(n));
  }
  return true;
}

}  // namespace

HttpResponse HttpRequest(int port, const std::string& method, const std::string& path,
                         const std::string& body, const std::vector<std::string>& headers,
                         absl::Duration timeout) {
  return HttpRequestTo("127.0.0.1", port, method, path, body, headers, timeout);
}

HttpResponse HttpRequestTo(const std::string& ipv4, int port, const std::string& method,
                           const std::string& path, const std::string& body,
                           const std::vector<std::string>& headers, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  HttpResponse r;
  const int fd = Connect(port, ipv4);
  if (fd < 0) return r;
  std::string resp;
  // A server may answer (413) before it has read a large body: send what it takes.
  WriteAll(fd, RequestText(method, path, body, headers));
  const bool ok = ReadUntil(fd, deadline, &resp, [](const std::string&) { return false; });
  ::close(fd);
  if (!ok) r.error = "no complete answer in time";
  return ok ? ParseResponse(resp) : r;
}

HttpResponse HttpsRequest(int port, const std::string& ca_pem, const std::string& method,
                          const std::string& path, const std::string& body,
                          const std::vector<std::string>& headers, absl::Duration timeout) {
  HttpResponse r;
  auto fail = [&](const std::string& what) {
    const unsigned long e = ERR_get_error();  // NOLINT(runtime/int): OpenSSL's type
    char buf[256] = "";
    if (e != 0) ERR_error_string_n(e, buf, sizeof(buf));
    ERR_clear_error();
    r.error = absl::StrCat(what, ": ", buf);
    return r;
  };
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(SSL_CTX_new(TLS_client_method()),
                                                        &SSL_CTX_free);
  if (ctx == nullptr) return fail("SSL_CTX_new");
  if (!ca_pem.empty()) {
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(
        BIO_new_mem_buf(ca_pem.data(), static_cast<int>(ca_pem.size())), &BIO_free);
    X509* ca = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
    if (ca == nullptr) return fail("CA PEM");
    X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx.get()), ca);
    X509_free(ca);
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
    X509_VERIFY_PARAM_set1_ip_asc(SSL_CTX_get0_param(ctx.get()), "127.0.0.1");
  }
  const int fd = Connect(port);
  if (fd < 0) return fail("connect");
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(absl::ToInt64Seconds(timeout));
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  std::unique_ptr<SSL, decltype(&SSL_free)> ssl(SSL_new(ctx.get()), &SSL_free);
  SSL_set_fd(ssl.get(), fd);
  if (SSL_connect(ssl.get()) != 1) {
    ::close(fd);
    return fail("TLS handshake");
  }
  const std::string req = RequestText(method, path, body, headers);
  if (SSL_write(ssl.get(), req.data(), static_cast<int>(req.size())) <= 0) {
    ::close(fd);
    return fail("TLS write");
  }
  std::string resp;
  char buf[16384];
  for (int n; (n = SSL_read(ssl.get(), buf, sizeof(buf))) > 0;) resp.append(buf, n);
  ssl.reset();
  ::close(fd);
  r = ParseResponse(resp);
  if (r.status == 0) r.error = "no complete answer";
  return r;
}

std::optional<std::string> HttpGet(int port, const std::string& path, absl::Duration timeout) {
  HttpResponse r = HttpRequest(port, "GET", path, "", {}, timeout);
  if (r.status != 200) return std::nullopt;
  return r.body;
}

HttpStream::HttpStream(int port, const std::string& method, const std::string& path,
                       const std::string& body, const std::vector<std::string>& headers)
    : fd_(Connect(port)) {
  if (fd_ >= 0 && !WriteAll(fd_, RequestText(method, path, body, headers))) Close();
}

HttpStream::~HttpStream() { Close(); }

bool HttpStream::ReadUntil(const std::string& needle, absl::Duration timeout) {
  if (fd_ < 0) return false;
  return testing::ReadUntil(
             fd_, absl::Now() + timeout, &received_,
             [&](const std::string& s) { return s.find(needle) != std::string::npos; }) &&
         received_.find(needle) != std::string::npos;
}

void HttpStream::Close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

bool PromtoolCheckMetrics(const std::string& text, std::string* output) {
  char path[] = "/tmp/kvrelay-metrics-XXXXXX";
  const int fd = ::mkstemp(path);
  if (fd < 0) return false;
  ::close(fd);
  {
    std::ofstream f(path);
    f << text;
  }
  const std::string cmd = absl::StrCat("promtool check metrics < ", path, " 2>&1");
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string out;
  if (p != nullptr) {
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  }
  const int status = p != nullptr ? ::pclose(p) : -1;
  ::unlink(path);
  if (output != nullptr) *output = out;
  return status == 0;
}

std::string ScrapeMetrics(int port) { return HttpGet(port, "/metrics").value_or(""); }

std::string ScrapeMetricsAt(const std::string& ipv4, int port) {
  HttpResponse r = HttpRequestTo(ipv4, port, "GET", "/metrics", "", {}, absl::Seconds(30));
  return r.status == 200 ? r.body : "";
}

double OutstandingWork(const std::string& text) {
  if (text.empty()) return -1;
  double n = std::max(0.0, MetricSum(text, "kvrelay_kv_blocks", "state=\"in_use\""));
  for (const char* g : {"kvrelay_decode_quarantined_blocks", "kvrelay_decode_running_sequences",
                        "kvrelay_decode_waiting_sequences", "kvrelay_prefill_queue_depth"}) {
    n += std::max(0.0, MetricSum(text, g));
  }
  return n;
}

double MetricSum(const std::string& text, const std::string& name, const std::string& label) {
  double sum = 0;
  bool found = false;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    if (!absl::ConsumePrefix(&line, name)) continue;
    if (line.empty() || (line[0] != ' ' && line[0] != '{')) continue;  // a longer name
    if (!label.empty() && line.find(label) == absl::string_view::npos) continue;
    const size_t space = line.rfind(' ');
    double v = 0;
    if (space == absl::string_view::npos || !absl::SimpleAtod(line.substr(space + 1), &v)) continue;
    sum += v;
    found = true;
  }
  return found ? sum : -1;
}

}  // namespace kvrelay::testing

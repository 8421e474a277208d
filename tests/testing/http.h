// A minimal HTTP/1.0 GET over loopback for tests that scrape /metrics.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"

namespace kvrelay::testing {

struct HttpResponse {
  int status = 0;       // 0: no complete answer
  std::string headers;  // the status line and headers
  std::string body;
  std::string error;  // why there is no answer (e.g. the TLS handshake failed)
};

// One HTTP/1.0 request to 127.0.0.1:<port> (the server closes after answering), `headers` as "Name:
// value"; a POST gets Content-Type: application/json and its Content-Length.
HttpResponse HttpRequest(int port, const std::string& method, const std::string& path,
                         const std::string& body = "", const std::vector<std::string>& headers = {},
                         absl::Duration timeout = absl::Seconds(120));
// ... to <ipv4>:<port>.
HttpResponse HttpRequestTo(const std::string& ipv4, int port, const std::string& method,
                           const std::string& path, const std::string& body = "",
                           const std::vector<std::string>& headers = {},
                           absl::Duration timeout = absl::Seconds(120));

// ... over TLS to 127.0.0.1:<port>, verifying the server's certificate against
// `ca_pem` and the IP address 127.0.0.1 (empty `ca_pem`: no verification).
HttpResponse HttpsRequest(int port, const std::string& ca_pem, const std::string& method,
                          const std::string& path, const std::string& body = "",
                          const std::vector<std::string>& headers = {},
                          absl::Duration timeout = absl::Seconds(120));

// A request whose answer is read as it comes (Server-Sent Events), and that can hang up
// in the middle.
class HttpStream {
 public:
  HttpStream(int port, const std::string& method, const std::string& path, const std::string& body,
             const std::vector<std::string>& headers = {});
  ~HttpStream();
  HttpStream(const HttpStream&) = delete;
  HttpStream& operator=(const HttpStream&) = delete;
  // Reads until `needle` has arrived (true) or the timeout / end of the answer (false).
  bool ReadUntil(const std::string& needle, absl::Duration timeout = absl::Seconds(120));
  const std::string& received() const { return received_; }
  void Close();  // hangs up

 private:
  int fd_;
  std::string received_;
};

// The body of http://127.0.0.1:<port><path> if the status is 200; nullopt otherwise or
// when no complete answer arrives within `timeout`.
std::optional<std::string> HttpGet(int port, const std::string& path,
                                   absl::Duration timeout = absl::Seconds(30));

// The /metrics text of 127.0.0.1:<port> ("" when it does not answer).
std::string ScrapeMetrics(int port);
// ... of <ipv4>:<port> (e.g. a process in another network namespace).
std::string ScrapeMetricsAt(const std::string& ipv4, int port);

// A worker's unsettled books in its /metrics text `text`: KV blocks in use, blocks
// quarantined, sequences running or waiting, prefills queued (0: nothing left behind;
// -1 for an empty text, e.g. a worker that did not answer).
double OutstandingWork(const std::string& text);

// Sum of the samples of `name` (a whole series name, e.g. "x_total" or "x_count") in the
// Prometheus text `text` whose label set contains `label` (e.g. code="OK"; empty: any).
// -1 when there is none.
double MetricSum(const std::string& text, const std::string& name, const std::string& label = "");

// Runs `promtool check metrics` on `text`; its output, and whether it passed.
bool PromtoolCheckMetrics(const std::string& text, std::string* output);

}  // namespace kvrelay::testing

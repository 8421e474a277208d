#include "tests/testing/http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"

namespace kvrelay::testing {

std::optional<std::string> HttpGet(int port, const std::string& path, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return std::nullopt;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::optional<std::string> out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string req = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if (::write(fd, req.data(), req.size()) == static_cast<ssize_t>(req.size())) {
      std::string resp;
      char buf[16384];
      while (true) {
        const int ms = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
        if (ms <= 0) break;
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, ms) <= 0) break;
        const ssize_t n = ::read(fd, buf, sizeof(buf));
        if (n < 0) break;
        if (n == 0) {  // HTTP/1.0: the server closes after the body
          const size_t head = resp.find("\r\n\r\n");
          if (resp.rfind("HTTP/1.1 200", 0) == 0 || resp.rfind("HTTP/1.0 200", 0) == 0) {
            if (head != std::string::npos) out = resp.substr(head + 4);
          }
          break;
        }
        resp.append(buf, static_cast<size_t>(n));
      }
    }
  }
  ::close(fd);
  return out;
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

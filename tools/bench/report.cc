#include "tools/bench/report.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace kvrelay::bench {
namespace {

std::string SloText(const Slo& slo) {
  std::vector<std::string> parts;
  if (slo.ttft_ms >= 0) parts.push_back(absl::StrFormat("ttft<=%gms", slo.ttft_ms));
  if (slo.tpot_ms >= 0) parts.push_back(absl::StrFormat("tpot<=%gms", slo.tpot_ms));
  if (slo.e2e_ms >= 0) parts.push_back(absl::StrFormat("e2e<=%gms", slo.e2e_ms));
  return absl::StrJoin(parts, ", ");
}

void Line(std::ostream& out, const std::string& name, const std::string& value) {
  out << absl::StrFormat("%-40s %s\n", name, value);
}
std::string F(double v) { return absl::StrFormat("%.2f", v); }

void Section(std::ostream& out, const std::string& title) {
  const int width = 50;
  const int pad = std::max<int>(0, width - static_cast<int>(title.size()) - 2);
  out << std::string(pad / 2, '-') << " " << title << " " << std::string(pad - pad / 2, '-')
      << "\n";
}

void DistLines(std::ostream& out, const std::string& name, const Distribution& d) {
  Line(out, "Mean " + name + " (ms):", F(d.mean));
  Line(out, "Median " + name + " (ms):", F(d.median));
  Line(out, "P90 " + name + " (ms):", F(d.p90));
  Line(out, "P99 " + name + " (ms):", F(d.p99));
}

nlohmann::ordered_json DistJson(const Distribution& d) {
  return {{"count", d.count}, {"mean", d.mean}, {"median", d.median}, {"p90", d.p90},
          {"p99", d.p99},     {"min", d.min},   {"max", d.max}};
}

std::string RateText(double r) { return std::isinf(r) ? "inf" : absl::StrFormat("%g", r); }

// gnuplot's location, or "" when not installed.
std::string FindGnuplot() {
  if (const char* g = std::getenv("KVRELAY_GNUPLOT"); g != nullptr && *g != '\0') return g;
  const char* path = std::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path != nullptr ? path : "/usr/bin:/bin", ':')) {
    const std::string candidate = absl::StrCat(dir, "/gnuplot");
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

// A gnuplot string literal (single quotes; a quote is doubled).
std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("''") : std::string(1, c);
  return q + "'";
}

// Writes an empirical CDF (value, fraction <= value) of `values` to `path`.
void WriteCdf(std::vector<double> values, const std::string& path) {
  std::sort(values.begin(), values.end());
  std::ofstream f(path);
  f << "# value_ms fraction\n";
  for (size_t i = 0; i < values.size(); ++i)
    f << values[i] << " " << (i + 1.0) / values.size() << "\n";
  if (values.empty()) f << "0 0\n";  // gnuplot refuses an empty file
}

constexpr const char* kHeader =
    "set terminal pngcairo size 960,600 enhanced font 'Sans,11'\n"
    "set grid\nset key bottom right\n";

}  // namespace

void PrintSummary(const Point& p, const Slo& slo, std::ostream& out) {
  const Summary& s = p.summary;
  out << "============ Serving Benchmark Result ============\n";
  Line(out, "Point:", p.label);
  if (p.run.interrupted) Line(out, "Interrupted:", "yes (partial results)");
  Line(out, "Successful requests:", std::to_string(s.completed));
  Line(out, "Failed requests:", std::to_string(s.failed));
  Line(out, "Maximum concurrency seen:", std::to_string(s.max_concurrency_seen));
  Line(out, "Benchmark duration (s):", F(s.duration_seconds));
  Line(out, "Total input tokens:", std::to_string(s.input_tokens));
  Line(out, "Total generated tokens:", std::to_string(s.output_tokens));
  Line(out, "Cached prompt tokens:", std::to_string(s.cached_tokens));
  Line(out, "Prefix hit rate (%):", F(100 * s.prefix_hit_rate));
  Line(out, "Request throughput (req/s):", F(s.request_throughput));
  Line(out, "Output token throughput (tok/s):", F(s.output_throughput));
  Line(out, "Total token throughput (tok/s):", F(s.total_token_throughput));
  if (slo.any()) Line(out, "Goodput (req/s) [" + SloText(slo) + "]:", F(s.goodput));
  Section(out, "Time to First Token");
  DistLines(out, "TTFT", s.ttft_ms);
  Section(out, "Time per Output Token (excl. 1st token)");
  DistLines(out, "TPOT", s.tpot_ms);
  Section(out, "Inter-token Latency");
  DistLines(out, "ITL", s.itl_ms);
  Section(out, "End-to-end Latency");
  DistLines(out, "E2EL", s.e2e_ms);
  if (!s.errors_by_code.empty()) {
    Section(out, "Errors");
    for (const auto& [code, n] : s.errors_by_code) Line(out, code + ":", std::to_string(n));
  }
  out << "==================================================\n";
}

void PrintSweepTable(const std::vector<Point>& points, const Slo& slo, std::ostream& out) {
  out << absl::StrFormat("%-18s %6s %7s %10s %8s %9s %9s %9s %9s %9s %6s %6s\n", "point", "ok",
                         "req/s", "out tok/s", slo.any() ? "goodput" : "-", "ttft p50", "ttft p99",
                         "tpot p50", "tpot p99", "e2e p50", "hit%", "errors");
  for (const Point& p : points) {
    const Summary& s = p.summary;
    out << absl::StrFormat("%-18s %6d %7.2f %10.2f %8s %9.1f %9.1f %9.2f %9.2f %9.1f %6.1f %6d\n",
                           p.label, s.completed, s.request_throughput, s.output_throughput,
                           slo.any() ? F(s.goodput) : "-", s.ttft_ms.median, s.ttft_ms.p99,
                           s.tpot_ms.median, s.tpot_ms.p99, s.e2e_ms.median,
                           100 * s.prefix_hit_rate, s.failed);
  }
}

nlohmann::ordered_json RecordJson(const RequestRecord& r) {
  nlohmann::ordered_json j;
  j["index"] = r.index;
  j["conversation"] = r.conversation;
  j["turn"] = r.turn;
  j["start_s"] = r.start_seconds;
  j["ok"] = r.ok;
  j["code"] = r.code;
  if (!r.error.empty()) j["error"] = r.error;
  j["ttft_s"] = r.ttft_seconds;
  j["tpot_s"] = r.tpot_seconds;
  j["e2e_s"] = r.e2e_seconds;
  j["itl_s"] = r.itl_seconds;
  j["input_tokens"] = r.input_tokens;
  j["output_tokens"] = r.output_tokens;
  j["expected_output_tokens"] = r.expected_output_tokens;
  j["cached_tokens"] = r.cached_tokens;
  j["finish_reason"] = r.finish_reason;
  j["prefill_mode"] = r.prefill_mode;
  j["decode_worker"] = r.decode_worker;
  j["prefill_worker"] = r.prefill_worker;
  j["migrations"] = r.migrations;
  j["server_ttft_s"] = r.server_ttft_seconds;
  j["server_queue_s"] = r.server_queue_seconds;
  return j;
}

nlohmann::ordered_json SummaryJson(const Summary& s, const Slo& slo) {
  nlohmann::ordered_json j;
  j["duration_s"] = s.duration_seconds;
  j["requests"] = s.requests;
  j["completed"] = s.completed;
  j["failed"] = s.failed;
  j["errors_by_code"] = s.errors_by_code;
  j["max_concurrency_seen"] = s.max_concurrency_seen;
  j["input_tokens"] = s.input_tokens;
  j["output_tokens"] = s.output_tokens;
  j["cached_tokens"] = s.cached_tokens;
  j["prefix_hit_rate"] = s.prefix_hit_rate;
  j["request_throughput"] = s.request_throughput;
  j["output_throughput"] = s.output_throughput;
  j["total_token_throughput"] = s.total_token_throughput;
  nlohmann::ordered_json slo_j = nlohmann::ordered_json::object();
  if (slo.ttft_ms >= 0) slo_j["ttft_ms"] = slo.ttft_ms;
  if (slo.tpot_ms >= 0) slo_j["tpot_ms"] = slo.tpot_ms;
  if (slo.e2e_ms >= 0) slo_j["e2e_ms"] = slo.e2e_ms;
  j["slo"] = slo_j;
  j["good_requests"] = s.good;
  j["goodput"] = s.goodput;
  j["ttft_ms"] = DistJson(s.ttft_ms);
  j["tpot_ms"] = DistJson(s.tpot_ms);
  j["itl_ms"] = DistJson(s.itl_ms);
  j["e2e_ms"] = DistJson(s.e2e_ms);
  return j;
}

nlohmann::ordered_json ReportJson(const nlohmann::ordered_json& config,
                                  const std::vector<Point>& points, const Slo& slo) {
  nlohmann::ordered_json j;
  j["config"] = config;
  nlohmann::ordered_json ps = nlohmann::ordered_json::array();
  for (const Point& p : points) {
    nlohmann::ordered_json pj;
    pj["label"] = p.label;
    pj["request_rate"] = RateText(p.request_rate);
    pj["max_concurrency"] = p.max_concurrency;
    pj["interrupted"] = p.run.interrupted;
    pj["summary"] = SummaryJson(p.summary, slo);
    nlohmann::ordered_json rs = nlohmann::ordered_json::array();
    for (const RequestRecord& r : p.run.records) rs.push_back(RecordJson(r));
    pj["requests"] = std::move(rs);
    ps.push_back(std::move(pj));
  }
  j["points"] = std::move(ps);
  return j;
}

absl::Status WritePlots(const std::vector<Point>& points, const std::string& dir,
                        std::vector<std::string>* paths) {
  const std::string gnuplot = FindGnuplot();
  if (gnuplot.empty()) {
    return absl::FailedPreconditionError(
        "--plot needs gnuplot, which is not installed (apt-get install gnuplot-nox)");
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    return absl::InvalidArgumentError(
        absl::StrCat("--plot: cannot create ", dir, ": ", ec.message()));
  const std::string data = dir + "/data";
  std::filesystem::create_directories(data, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", data, ": ", ec.message()));

  std::string script = kHeader;
  auto plot_lines = [&](const std::string& prefix, const std::string& style) {
    std::vector<std::string> parts;
    for (size_t i = 0; i < points.size(); ++i) {
      parts.push_back(absl::StrCat(Quote(absl::StrCat(data, "/", prefix, "_", i, ".dat")),
                                   " using 1:2 with ", style, " lw 2 title ",
                                   Quote(points[i].label)));
    }
    return absl::StrJoin(parts, ", \\\n     ");
  };
  std::vector<std::string> pngs;
  // CDFs of TTFT and TPOT.
  for (const auto& [name, title] : std::vector<std::pair<std::string, std::string>>{
           {"ttft", "Time to first token"}, {"tpot", "Time per output token"}}) {
    for (size_t i = 0; i < points.size(); ++i) {
      std::vector<double> v;
      for (const RequestRecord& r : points[i].run.records) {
        if (!r.ok) continue;
        if (name == "ttft" && r.output_tokens >= 1) v.push_back(r.ttft_seconds * 1e3);
        if (name == "tpot" && r.output_tokens >= 2) v.push_back(r.tpot_seconds * 1e3);
      }
      WriteCdf(std::move(v), absl::StrCat(data, "/", name, "_", i, ".dat"));
    }
    const std::string png = absl::StrCat(dir, "/", name, "_cdf.png");
    absl::StrAppend(&script, "set output ", Quote(png), "\nset title ", Quote(title + " (CDF)"),
                    "\nset xlabel ", Quote(name == "ttft" ? "TTFT (ms)" : "TPOT (ms)"),
                    "\nset ylabel 'fraction of requests'\nset yrange [0:1]\nplot ",
                    plot_lines(name, "steps"), "\nunset yrange\n");
    pngs.push_back(png);
  }
  // Output tokens per second over time, in bins of about 1/40 of the longest run.
  double longest = 0;
  for (const Point& p : points) longest = std::max(longest, p.run.duration_seconds);
  const double bin = std::max(0.05, longest / 40);
  for (size_t i = 0; i < points.size(); ++i) {
    std::map<int64_t, int64_t> counts;
    double first = INFINITY;
    for (const RequestRecord& r : points[i].run.records) first = std::min(first, r.start_seconds);
    for (const RequestRecord& r : points[i].run.records) {
      for (double t : r.token_times) ++counts[static_cast<int64_t>((t - first) / bin)];
    }
    std::ofstream f(absl::StrCat(data, "/tput_", i, ".dat"));
    f << "# t_s output_tok_per_s\n";
    const int64_t last = counts.empty() ? 0 : counts.rbegin()->first;
    for (int64_t b = 0; b <= last; ++b) {
      f << (b + 0.5) * bin << " " << (counts.count(b) ? counts[b] : 0) / bin << "\n";
    }
  }
  {
    const std::string png = dir + "/throughput_over_time.png";
    absl::StrAppend(
        &script, "set output ", Quote(png),
        "\nset title 'Output tokens per second over time'\nset xlabel 'time since "
        "the first request (s)'\nset ylabel 'output tokens/s'\nset key top right\nplot ",
        plot_lines("tput", "linespoints pt 7 ps 0.6"), "\nset key bottom right\n");
    pngs.push_back(png);
  }
  // Latency vs throughput across the points of a sweep.
  if (points.size() >= 2) {
    std::ofstream f(data + "/sweep.dat");
    f << "# out_tok_per_s ttft_p50 ttft_p99 tpot_p50 tpot_p99 label\n";
    for (const Point& p : points) {
      const Summary& s = p.summary;
      f << s.output_throughput << " " << s.ttft_ms.median << " " << s.ttft_ms.p99 << " "
        << s.tpot_ms.median << " " << s.tpot_ms.p99 << " \"" << p.label << "\"\n";
    }
    const std::string png = dir + "/latency_vs_throughput.png";
    const std::string sweep = Quote(data + "/sweep.dat");
    absl::StrAppend(
        &script, "set terminal pngcairo size 1200,600 enhanced font 'Sans,11'\nset output ",
        Quote(png),
        "\nset multiplot layout 1,2 title 'Latency vs output throughput (one point per run)'\n"
        "set key below horizontal\nset xlabel 'output tokens/s'\n"
        "set title 'TTFT'\nset ylabel 'ms'\nplot ",
        sweep, " using 1:2 with linespoints pt 7 lw 2 title 'p50', ", sweep,
        " using 1:3 with linespoints pt 5 lw 2 title 'p99', ", sweep,
        " using 1:3:6 with labels offset 0,1 font ',9' notitle\n"
        "set title 'TPOT'\nplot ",
        sweep, " using 1:4 with linespoints pt 7 lw 2 title 'p50', ", sweep,
        " using 1:5 with linespoints pt 5 lw 2 title 'p99', ", sweep,
        " using 1:5:6 with labels offset 0,1 font ',9' notitle\nunset multiplot\n");
    pngs.push_back(png);
  }
  const std::string script_path = dir + "/plots.gp";
  {
    std::ofstream f(script_path);
    f << script;
    if (!f) return absl::InternalError("cannot write " + script_path);
  }
  // Run gnuplot without a shell: fork + exec, its output captured in a file.
  const std::string log_path = data + "/gnuplot.log";
  const pid_t pid = ::fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    FILE* log = std::fopen(log_path.c_str(), "w");
    if (log != nullptr) {
      ::dup2(fileno(log), 1);
      ::dup2(fileno(log), 2);
    }
    ::execl(gnuplot.c_str(), "gnuplot", script_path.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  std::ifstream log(log_path);
  std::string output((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return absl::InternalError(absl::StrCat("gnuplot failed on ", script_path, ": ", output));
  }
  for (const std::string& png : pngs) {
    if (!std::filesystem::exists(png)) {
      return absl::InternalError(absl::StrCat("gnuplot wrote no ", png, ": ", output));
    }
  }
  if (paths != nullptr) *paths = pngs;
  return absl::OkStatus();
}

}  // namespace kvrelay::bench

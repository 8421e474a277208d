// Every process of a running cluster (router, prefill and decode worker as real
// processes on 127.0.0.1) serves /metrics: after real traffic each scrape passes
// `promtool check metrics`, and the values moved as they should (DESIGN §7). Every metric
// that the Grafana dashboards (deploy/grafana/*.json) and the Prometheus rules
// (deploy/prometheus/*.yaml) name exists in those scrapes.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
#include "kvrelay/v1/registry.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/testing/http.h"
#include "tests/testing/processes.h"
#include "tests/testing/test_models.h"

namespace kvrelay {
namespace {

using testing::RandomPrompt;

std::string ModelDir() { return testing::ModelDir(testing::TinyVariants()[0]); }

std::string Scrape(int port) { return testing::ScrapeMetrics(port); }

bool Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& req, v1::Final* final,
              grpc::Status* status = nullptr) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    if (m.has_final()) *final = m.final();
  }
  const grpc::Status st = reader->Finish();
  if (status != nullptr) *status = st;
  return st.ok();
}

v1::GenerateRequest Greedy(const std::vector<int32_t>& prompt, int max_tokens) {
  v1::GenerateRequest r;
  for (int32_t t : prompt) r.mutable_token_ids()->add_ids(t);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  return r;
}

// ---- Metric names in dashboards and rules -------------------------------------------

#ifndef KVRELAY_SOURCE_DIR
#error "KVRELAY_SOURCE_DIR (the source tree, for deploy/) must be defined"
#endif

const std::vector<std::string>& Dashboards() {
  static const std::vector<std::string> names = {"kvrelay-overview.json", "kvrelay-cache.json",
                                                 "kvrelay-transfer.json", "kvrelay-workers.json"};
  return names;
}

bool IsIdentStart(char c) { return absl::ascii_isalpha(c) || c == '_' || c == ':'; }
bool IsIdentChar(char c) { return absl::ascii_isalnum(c) || c == '_' || c == ':'; }

// Index just past the string literal that starts at s[i] (", ' or `).
size_t SkipString(absl::string_view s, size_t i) {
  const char quote = s[i];
  for (++i; i < s.size(); ++i) {
    if (s[i] == '\\' && quote != '`') {
      ++i;
    } else if (s[i] == quote) {
      return i + 1;
    }
  }
  return s.size();
}

// Index just past the bracket that closes the one at s[open] ( (, [ or { ), strings skipped.
size_t SkipBrackets(absl::string_view s, size_t open) {
  int depth = 0;
  for (size_t i = open; i < s.size();) {
    const char c = s[i];
    if (c == '"' || c == '\'' || c == '`') {
      i = SkipString(s, i);
      continue;
    }
    if (c == '(' || c == '[' || c == '{') ++depth;
    if ((c == ')' || c == ']' || c == '}') && --depth == 0) return i + 1;
    ++i;
  }
  return s.size();
}

bool IsKvrelayMetric(absl::string_view word) {
  return word.size() > 8 && absl::StartsWith(word, "kvrelay_") &&
         word.find(':') == absl::string_view::npos;
}

// The kvrelay_* metric names of a PromQL expression, or of a Grafana variable query such
// as label_values(<selector>, <label>): identifiers where a metric name can stand, not
// label names (in {...}, by/without/on/ignoring/group_left/group_right (...), the label
// argument of label_values), string contents (except {__name__="..."}), durations,
// Grafana variables ($x, ${x}) or recording rule names (level:metric:operations).
void CollectMetricNames(absl::string_view e, std::set<std::string>* out) {
  int braces = 0;     // > 0: inside a label matcher list
  std::string label;  // there: the last label name
  size_t i = 0;
  while (i < e.size()) {
    const char c = e[i];
    if (c == '"' || c == '\'' || c == '`') {
      const size_t end = SkipString(e, i);
      if (braces > 0 && label == "__name__" && end >= i + 2) {
        const absl::string_view value = e.substr(i + 1, end - i - 2);
        if (IsKvrelayMetric(value)) out->emplace(value);
      }
      i = end;
    } else if (c == '#') {  // a comment
      const size_t eol = e.find('\n', i);
      i = eol == absl::string_view::npos ? e.size() : eol + 1;
    } else if (c == '{') {
      ++braces;
      label.clear();
      ++i;
    } else if (c == '}') {
      braces = std::max(0, braces - 1);
      ++i;
    } else if (c == '[') {  // a range or subquery: durations only
      i = SkipBrackets(e, i);
    } else if (c == '$') {  // a Grafana variable
      ++i;
      if (i < e.size() && e[i] == '{') {
        const size_t close = e.find('}', i);
        i = close == absl::string_view::npos ? e.size() : close + 1;
      } else {
        while (i < e.size() && IsIdentChar(e[i])) ++i;
      }
    } else if (absl::ascii_isdigit(c) || c == '.') {  // a number or a duration
      while (i < e.size() && (absl::ascii_isalnum(e[i]) || e[i] == '.' || e[i] == '_')) ++i;
    } else if (IsIdentStart(c)) {
      size_t j = i;
      while (j < e.size() && IsIdentChar(e[j])) ++j;
      const absl::string_view word = e.substr(i, j - i);
      size_t k = j;
      while (k < e.size() && absl::ascii_isspace(e[k])) ++k;
      const bool call = k < e.size() && e[k] == '(';
      const std::string lower = absl::AsciiStrToLower(word);
      if (braces > 0) {
        label = std::string(word);
        i = j;
      } else if (call && (lower == "by" || lower == "without" || lower == "on" ||
                          lower == "ignoring" || lower == "group_left" || lower == "group_right")) {
        i = SkipBrackets(e, k);  // label names
      } else if (call && word == "label_values") {
        const size_t end = SkipBrackets(e, k);
        const absl::string_view args = e.substr(k + 1, end >= k + 2 ? end - k - 2 : 0);
        size_t comma = absl::string_view::npos;  // the last top-level comma
        for (size_t a = 0; a < args.size();) {
          if (args[a] == '"' || args[a] == '\'' || args[a] == '`') {
            a = SkipString(args, a);
          } else if (args[a] == '(' || args[a] == '[' || args[a] == '{') {
            a = SkipBrackets(args, a);
          } else {
            if (args[a] == ',') comma = a;
            ++a;
          }
        }
        if (comma != absl::string_view::npos) CollectMetricNames(args.substr(0, comma), out);
        i = end;
      } else {
        if (IsKvrelayMetric(word)) out->emplace(word);
        i = j;
      }
    } else {
      ++i;
    }
  }
}

size_t Indent(absl::string_view line) {
  size_t n = 0;
  while (n < line.size() && line[n] == ' ') ++n;
  return n;
}

// The values of `key:` entries in a YAML file (rule files, promtool test files): plain,
// single- or double-quoted, or block (| >) scalars, each continued on the following lines
// indented deeper than its key. Not a YAML parser; enough for deploy/prometheus.
std::vector<std::string> YamlValues(const std::string& text, const std::string& key) {
  const std::vector<std::string> lines = absl::StrSplit(text, '\n');
  std::vector<std::string> values;
  for (size_t n = 0; n < lines.size(); ++n) {
    absl::string_view rest(lines[n]);
    size_t indent = Indent(rest);
    rest.remove_prefix(indent);
    while (absl::ConsumePrefix(&rest, "- ")) {  // a sequence item: its first key
      indent += 2 + Indent(rest);
      rest.remove_prefix(Indent(rest));
    }
    if (!absl::ConsumePrefix(&rest, key + ":")) continue;
    if (!rest.empty() && rest[0] != ' ') continue;  // a longer key
    std::string value(absl::StripAsciiWhitespace(rest));
    const bool block = !value.empty() && (value[0] == '|' || value[0] == '>');
    if (block) value.clear();
    for (; n + 1 < lines.size(); ++n) {
      const absl::string_view next(lines[n + 1]);
      const bool blank = absl::StripAsciiWhitespace(next).empty();
      if (!blank && Indent(next) <= indent) break;
      absl::StrAppend(&value,
                      value.empty() ? ""
                      : block       ? "\n"
                                    : " ",
                      absl::StripAsciiWhitespace(next));
    }
    if (!block && !value.empty() && (value[0] == '"' || value[0] == '\'')) {
      const char quote = value[0];
      std::string unquoted;
      for (size_t i = 1; i < value.size(); ++i) {
        if (quote == '\'' && value[i] == '\'') {
          if (i + 1 < value.size() && value[i + 1] == '\'') {
            unquoted += '\'';
            ++i;
            continue;
          }
          break;
        }
        if (quote == '"' && value[i] == '\\' && i + 1 < value.size()) {
          unquoted += value[++i];
          continue;
        }
        if (quote == '"' && value[i] == '"') break;
        unquoted += value[i];
      }
      value = unquoted;
    }
    values.push_back(value);
  }
  return values;
}

std::string ReadFile(const std::filesystem::path& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Files of `dir` whose name ends with `suffix`, sorted.
std::vector<std::filesystem::path> FilesIn(const std::string& dir, const std::string& suffix) {
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (entry.is_regular_file() && absl::EndsWith(entry.path().filename().string(), suffix)) {
      files.push_back(entry.path());
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

// Every "expr" string anywhere in a dashboard (panels, their targets, nested rows).
void CollectExprs(const nlohmann::json& j, std::vector<std::string>* out) {
  if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (it.key() == "expr" && it->is_string()) {
        out->push_back(it->get<std::string>());
      } else {
        CollectExprs(*it, out);
      }
    }
  } else if (j.is_array()) {
    for (const auto& v : j) CollectExprs(v, out);
  }
}

// The queries of a dashboard: its panels' exprs and its query variables' queries.
std::vector<std::string> DashboardQueries(const nlohmann::json& d) {
  std::vector<std::string> queries;
  CollectExprs(d, &queries);
  if (d.contains("templating") && d["templating"].contains("list")) {
    for (const auto& v : d["templating"]["list"]) {
      if (v.value("type", "") != "query") continue;
      if (v.contains("query")) {
        const auto& q = v["query"];
        if (q.is_string()) queries.push_back(q.get<std::string>());
        if (q.is_object() && q.contains("query") && q["query"].is_string()) {
          queries.push_back(q["query"].get<std::string>());
        }
      }
      if (v.contains("definition") && v["definition"].is_string()) {
        queries.push_back(v["definition"].get<std::string>());
      }
    }
  }
  return queries;
}

// Metric name -> the deploy/ files (relative paths) naming it. Fails the test on files
// that cannot be read or parsed, or when there are no dashboards or rules at all.
std::map<std::string, std::set<std::string>> MetricsNamedInDeploy() {
  const std::string root = KVRELAY_SOURCE_DIR;
  std::map<std::string, std::set<std::string>> used;
  auto add = [&](const std::string& file, const std::vector<std::string>& queries) {
    std::set<std::string> names;
    for (const std::string& q : queries) CollectMetricNames(q, &names);
    EXPECT_FALSE(names.empty()) << file << " names no kvrelay_ metric";
    for (const std::string& name : names) used[name].insert(file);
  };
  const auto dashboards = FilesIn(root + "/deploy/grafana", ".json");
  EXPECT_FALSE(dashboards.empty()) << "no dashboards in " << root << "/deploy/grafana";
  for (const auto& path : dashboards) {
    const std::string file = "deploy/grafana/" + path.filename().string();
    const nlohmann::json d = nlohmann::json::parse(ReadFile(path), nullptr, false);
    if (d.is_discarded() || !d.is_object()) {
      ADD_FAILURE() << file << " is not a JSON object";
      continue;
    }
    add(file, DashboardQueries(d));
  }
  const auto rules = FilesIn(root + "/deploy/prometheus", ".yaml");
  EXPECT_FALSE(rules.empty()) << "no rule files in " << root << "/deploy/prometheus";
  for (const auto& path : rules) {
    const std::string file = "deploy/prometheus/" + path.filename().string();
    const std::string text = ReadFile(path);
    std::vector<std::string> queries = YamlValues(text, "expr");
    EXPECT_FALSE(queries.empty()) << file << " has no expr";
    for (std::string& series : YamlValues(text, "series")) queries.push_back(std::move(series));
    add(file, queries);
  }
  return used;
}

// The sample names of a Prometheus text exposition (x_total, x_bucket, x_sum, ...).
std::set<std::string> SampleNames(const std::string& text) {
  std::set<std::string> names;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    line = absl::StripLeadingAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    names.emplace(line.substr(0, line.find_first_of("{ ")));
  }
  return names;
}

TEST(MetricsProcessTest, EveryProcessServesValidMetricsThatMove) {
  const std::vector<std::string> metrics = {"--metrics_listen", "127.0.0.1:0"};
  std::vector<std::string> args = {"--model",
                                   ModelDir(),
                                   "--local_prefill_max_tokens",
                                   "40",
                                   "--exit_linger_seconds",
                                   "0",
                                   "--http_listen",
                                   "127.0.0.1:0"};  // the HTTP API's metrics too
  args.insert(args.end(), metrics.begin(), metrics.end());
  testing::WorkerProcess router = testing::StartWorker("kvrelay-router", args);
  ASSERT_TRUE(router.process);
  ASSERT_GT(router.metrics_port, 0);
  ASSERT_GT(router.http_port, 0);
  std::vector<std::string> worker = {"--model",  ModelDir(),        "--threads",
                                     "1",        "--kv_blocks",     "256",
                                     "--router", router.address(),  "--exit_linger_seconds",
                                     "0",        "--kv_host_bytes", "16777216"};  // tier series
  worker.insert(worker.end(), metrics.begin(), metrics.end());
  testing::WorkerProcess prefill = testing::StartWorker("kvrelay-prefill", worker);
  testing::WorkerProcess decode = testing::StartWorker("kvrelay-decode", worker);
  ASSERT_TRUE(prefill.process && decode.process);
  ASSERT_GT(prefill.metrics_port, 0);
  ASSERT_GT(decode.metrics_port, 0);

  auto channel = grpc::CreateChannel(router.address(), grpc::InsecureChannelCredentials());
  auto gen = v1::Generation::NewStub(channel);
  auto registry = v1::Registry::NewStub(channel);
  // Both workers registered and their caches in the index.
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  auto synced = [&](int64_t min_blocks) {
    while (absl::Now() < deadline) {
      grpc::ClientContext ctx;
      v1::ListWorkersResponse r;
      int n = 0;
      int64_t blocks = 0;
      if (registry->ListWorkers(&ctx, v1::ListWorkersRequest(), &r).ok()) {
        for (const auto& w : r.workers()) {
          n += w.alive() && w.synced() ? 1 : 0;
          if (w.registration().role() == v1::WORKER_ROLE_DECODE) blocks += w.indexed_blocks();
        }
      }
      if (n == 2 && blocks >= min_blocks) return true;
      absl::SleepFor(absl::Milliseconds(20));
    }
    return false;
  };
  ASSERT_TRUE(synced(0));

  // A long prompt (remote prefill: KV over UCX), then the same prefix again (a hit on the
  // decode worker, known to the index), then a bad request.
  const auto prompt = RandomPrompt(100, 42);
  v1::Final first, second;
  ASSERT_TRUE(Generate(*gen, Greedy(prompt, 6), &first));
  EXPECT_EQ(first.route().prefill_mode(), v1::PREFILL_MODE_REMOTE);
  ASSERT_TRUE(synced(6));
  auto longer = prompt;
  longer.push_back(7);
  ASSERT_TRUE(Generate(*gen, Greedy(longer, 6), &second));
  EXPECT_GE(second.usage().cached_tokens(), 96);
  v1::Final unused;
  grpc::Status bad;
  EXPECT_FALSE(Generate(*gen, Greedy({}, 4), &unused, &bad));
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(testing::HttpRequest(router.http_port, "GET", "/v1/models").status, 200);

  // Counters of finished requests are updated before the stream ends; gauges fed by load
  // reports may lag, so only counters and histograms are checked.
  const std::map<std::string, int> ports = {{"router", router.metrics_port},
                                            {"prefill", prefill.metrics_port},
                                            {"decode", decode.metrics_port}};
  std::map<std::string, std::string> text;
  for (const auto& [name, port] : ports) {
    text[name] = Scrape(port);
    std::string promtool;
    EXPECT_TRUE(testing::PromtoolCheckMetrics(text[name], &promtool)) << name << ": " << promtool;
    EXPECT_THAT(text[name], ::testing::HasSubstr("kvrelay_")) << name;
  }
  const std::string& r = text["router"];
  EXPECT_EQ(testing::MetricSum(r, "kvrelay_router_requests_total", "code=\"OK\""), 2);
  EXPECT_EQ(testing::MetricSum(r, "kvrelay_router_requests_total", "code=\"INVALID_ARGUMENT\""), 1);
  EXPECT_EQ(testing::MetricSum(r, "kvrelay_router_ttft_seconds_count"), 2);
  EXPECT_EQ(testing::MetricSum(r, "kvrelay_router_prompt_tokens_total"), 201);
  EXPECT_EQ(testing::MetricSum(r, "kvrelay_router_generated_tokens_total"), 12);
  EXPECT_GE(testing::MetricSum(r, "kvrelay_router_prefix_delivered_tokens_total"),
            96);  // hit rate > 0
  EXPECT_GE(testing::MetricSum(r, "kvrelay_router_prefix_predicted_tokens_total"), 96);
  EXPECT_GE(testing::MetricSum(r, "kvrelay_router_prefix_available_tokens_total"), 96);
  EXPECT_EQ(testing::MetricSum(r, "kvrelay_router_prefill_total", "mode=\"remote\""), 1);
  EXPECT_GE(testing::MetricSum(r, "kvrelay_router_workers", "state=\"alive\""), 2);
  EXPECT_EQ(testing::MetricSum(r, "kvrelay_http_requests_total",
                               "endpoint=\"/v1/models\",status=\"200\""),
            1);
  EXPECT_EQ(testing::MetricSum(r, "kvrelay_router_shed_total"), 0);

  const std::string& d = text["decode"];
  EXPECT_EQ(testing::MetricSum(d, "kvrelay_decode_requests_total", "code=\"OK\""), 2);
  EXPECT_EQ(testing::MetricSum(d, "kvrelay_decode_generated_tokens_total"), 12);
  EXPECT_GE(testing::MetricSum(d, "kvrelay_decode_cached_tokens_total"), 96);
  EXPECT_GT(testing::MetricSum(d, "kvrelay_decode_steps_total"), 0);
  EXPECT_GT(testing::MetricSum(d, "kvrelay_kv_transfer_received_bytes_total"), 0);
  EXPECT_EQ(testing::MetricSum(d, "kvrelay_decode_remote_prefills_total", "result=\"ok\""), 1);

  const std::string& p = text["prefill"];
  EXPECT_EQ(testing::MetricSum(p, "kvrelay_prefill_requests_total", "code=\"OK\""), 1);
  EXPECT_GT(testing::MetricSum(p, "kvrelay_kv_transfer_bytes_total"),
            0);  // labelled by the transport used
  EXPECT_GT(testing::MetricSum(p, "kvrelay_kv_transfer_seconds_count"), 0);
  EXPECT_GT(testing::MetricSum(p, "kvrelay_prefill_computed_tokens_total"), 0);

  // Every metric a dashboard or a rule names is a sample of these scrapes, under the name
  // PromQL uses (x_bucket, x_sum, x_count for histograms).
  std::set<std::string> scraped;
  for (const auto& [name, t] : text) {
    const std::set<std::string> names = SampleNames(t);
    scraped.insert(names.begin(), names.end());
  }
  const std::map<std::string, std::set<std::string>> used = MetricsNamedInDeploy();
  EXPECT_GE(used.size(), 30u) << "too few metric names found in deploy/: is the extraction broken?";
  std::vector<std::string> names;
  for (const auto& [metric, files] : used) {
    names.push_back(metric);
    EXPECT_TRUE(scraped.count(metric) > 0)
        << metric << " (named in " << absl::StrJoin(files, ", ")
        << ") is not in the /metrics scrape of the router, prefill or decode worker";
  }
  std::cout << "metrics named in deploy/ (" << names.size() << "): " << absl::StrJoin(names, " ")
            << "\n";
}

// The four dashboards exist and are real: a uid, the data source as a variable (no
// hard-coded data source), panels with a title and a description, and queries on every
// panel but text ones. The metric-name extraction skips what is not a metric name.
TEST(MetricsProcessTest, DashboardsHavePanelsAndExtractionFindsOnlyMetricNames) {
  const std::string dir = std::string(KVRELAY_SOURCE_DIR) + "/deploy/grafana/";
  for (const std::string& name : Dashboards()) {
    SCOPED_TRACE(name);
    const std::string text = ReadFile(dir + name);
    ASSERT_FALSE(text.empty()) << "missing " << dir << name;
    const nlohmann::json d = nlohmann::json::parse(text, nullptr, false);
    ASSERT_TRUE(d.is_object());
    EXPECT_FALSE(d.value("uid", "").empty());
    EXPECT_FALSE(d.value("title", "").empty());
    bool datasource_variable = false;
    for (const auto& v : d["templating"]["list"]) {
      datasource_variable |= v.value("name", "") == "datasource" &&
                             v.value("type", "") == "datasource" &&
                             v.value("query", "") == "prometheus";
    }
    EXPECT_TRUE(datasource_variable) << "no ${datasource} variable of type prometheus";
    ASSERT_TRUE(d.contains("panels") && d["panels"].is_array());
    int with_queries = 0;
    for (const auto& panel : d["panels"]) {
      const std::string title = panel.value("title", "");
      EXPECT_FALSE(title.empty());
      EXPECT_FALSE(panel.value("description", "").empty()) << title;
      if (panel.value("type", "") == "text") continue;
      ASSERT_TRUE(panel.contains("datasource")) << title;
      EXPECT_EQ(panel["datasource"].value("uid", ""), "${datasource}") << title;
      ASSERT_TRUE(panel.contains("targets") && !panel["targets"].empty()) << title;
      for (const auto& t : panel["targets"]) {
        EXPECT_FALSE(t.value("expr", "").empty()) << title;
        if (t.contains("datasource")) {
          EXPECT_EQ(t["datasource"].value("uid", ""), "${datasource}") << title;
        }
      }
      ++with_queries;
    }
    EXPECT_GT(with_queries, 0) << "no panels with queries";
  }

  std::set<std::string> names;
  CollectMetricNames(
      "sum by (kvrelay_label, le) (rate(kvrelay_a_bucket{kvrelay_l=\"kvrelay_value\", "
      "job=~\".*kvrelay.*\"}[$__rate_interval])) / on (kvrelay_on) group_left (kvrelay_gl) "
      "kvrelay:recorded:rate5m + {__name__=\"kvrelay_b_total\"} # kvrelay_comment\n"
      "- ignoring(kvrelay_ig) x_kvrelay_c + kvrelay_d offset 5m + ${kvrelay_var} + "
      "label_values(kvrelay_e{a=\"b\"}, kvrelay_label2) + label_values(kvrelay_label3)",
      &names);
  EXPECT_EQ(names, (std::set<std::string>{"kvrelay_a_bucket", "kvrelay_b_total", "kvrelay_d",
                                          "kvrelay_e"}));
  const std::vector<std::string> exprs = YamlValues(
      "groups:\n  - name: g\n    rules:\n      - record: kvrelay:x:rate5m\n"
      "        expr: sum(kvrelay_one)\n      - alert: A\n        expr: |\n"
      "          kvrelay_two\n\n            > 0\n        for: 1m\n"
      "      - expr: 'kvrelay_three{a=''b''}'\n      - alert: B\n        expr: kvrelay_four\n"
      "          + kvrelay_five\n        labels:\n          expr_like: kvrelay_no\n",
      "expr");
  EXPECT_EQ(exprs,
            (std::vector<std::string>{"sum(kvrelay_one)", "kvrelay_two\n\n> 0",
                                      "kvrelay_three{a='b'}", "kvrelay_four + kvrelay_five"}));
}

}  // namespace
}  // namespace kvrelay

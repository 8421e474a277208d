// `kvrelay bench serve` against a real `kvrelay local` (router + 1 prefill + 1 decode
// worker processes, the tiny test model): each dataset as a tiny bounded run writing
// JSON and PNGs, whose fields must agree with each other and with what the service
// returned; a sweep; Ctrl-C keeping a partial report; bad input as one clear line.
#include <signal.h>
#include <sys/wait.h>

#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/util/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/processes.h"
#include "tests/testing/temp_dir.h"
#include "tests/testing/test_models.h"

namespace kvrelay {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using testing::kProcessTimeout;
using testing::SiblingBinary;
using testing::Subprocess;

// Runs argv with stderr folded into stdout; the exit status and every line.
struct CommandResult {
  int exit_code = -1;
  std::string output;
};

CommandResult RunCommand(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"/bin/sh", "-c", "exec \"$@\" 2>&1", "sh"};
  argv.insert(argv.end(), args.begin(), args.end());
  CommandResult r;
  auto p = Subprocess::Start(argv);
  EXPECT_TRUE(p);
  if (!p) return r;
  while (std::optional<std::string> line = p->ReadLine(kProcessTimeout)) r.output += *line + "\n";
  std::optional<int> status = p->Wait(kProcessTimeout);
  EXPECT_TRUE(status) << "did not exit: " << r.output;
  if (status && WIFEXITED(*status)) r.exit_code = WEXITSTATUS(*status);
  return r;
}

class BenchProcessTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_dir_ = new std::string(testing::ModelDir(testing::TinyVariants()[0]));
    std::vector<std::string> argv = {SiblingBinary("kvrelay"),
                                     "local",
                                     "--model",
                                     *model_dir_,
                                     "--port",
                                     "0",
                                     "--threads",
                                     "1",
                                     "--worker-flag=--kv_blocks=512"};
    local_ = new std::optional<Subprocess>(Subprocess::Start(argv));
    ASSERT_TRUE(*local_);
    std::optional<std::string> first = (*local_)->ReadLine(kProcessTimeout);
    ASSERT_TRUE(first) << "kvrelay local printed nothing";
    std::optional<std::string> ready = (*local_)->ReadLine(kProcessTimeout);
    int port = 0;
    ASSERT_TRUE(ready && ready->rfind("READY ", 0) == 0 &&
                absl::SimpleAtoi(ready->substr(6), &port))
        << (ready ? *ready : "no READY line");
    server_ = new std::string(absl::StrCat("127.0.0.1:", port));
  }
  static void TearDownTestSuite() {
    if (local_ != nullptr && *local_) {
      (*local_)->Kill(SIGTERM);
      (*local_)->Wait(kProcessTimeout);
    }
    delete local_;
    local_ = nullptr;
  }

  void SetUp() override {
    if (server_ == nullptr) GTEST_SKIP() << "kvrelay local did not start";
  }

  std::vector<std::string> Bench(const std::vector<std::string>& extra) {
    std::vector<std::string> argv = {
        SiblingBinary("kvrelay"), "bench", "serve", "--server", *server_,
        "--request-timeout",      "120"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return argv;
  }

  // The report's consistency: every field agrees with the per-request records.
  static void CheckReport(const json& point, bool ignore_eos) {
    const json& s = point["summary"];
    const json& reqs = point["requests"];
    int64_t completed = 0, in = 0, out = 0, cached = 0, itls = 0;
    for (const json& r : reqs) {
      ASSERT_EQ(r["code"], "OK") << r.dump();
      ASSERT_TRUE(r["ok"].get<bool>());
      ++completed;
      const int64_t n = r["output_tokens"];
      in += r["input_tokens"].get<int64_t>();
      out += n;
      cached += r["cached_tokens"].get<int64_t>();
      itls += static_cast<int64_t>(r["itl_s"].size());
      if (ignore_eos) {
        EXPECT_EQ(n, r["expected_output_tokens"].get<int64_t>()) << r.dump();
      }
      EXPECT_LE(n, r["expected_output_tokens"].get<int64_t>());
      EXPECT_EQ(r["itl_s"].size(), static_cast<size_t>(n - 1));
      EXPECT_GT(r["ttft_s"].get<double>(), 0);
      EXPECT_LE(r["ttft_s"].get<double>(), r["e2e_s"].get<double>());
      EXPECT_LE(r["cached_tokens"].get<int64_t>(), r["input_tokens"].get<int64_t>());
      EXPECT_THAT(r["prefill_mode"].get<std::string>(), ::testing::AnyOf("local", "remote"));
      EXPECT_FALSE(r["decode_worker"].get<std::string>().empty());
    }
    EXPECT_EQ(s["completed"], completed);
    EXPECT_EQ(s["failed"], 0);
    EXPECT_EQ(s["input_tokens"], in);
    EXPECT_EQ(s["output_tokens"], out);
    EXPECT_EQ(s["cached_tokens"], cached);
    EXPECT_EQ(s["itl_ms"]["count"], itls);
    EXPECT_NEAR(s["prefix_hit_rate"].get<double>(), static_cast<double>(cached) / in, 1e-9);
    const double d = s["duration_s"];
    ASSERT_GT(d, 0);
    EXPECT_NEAR(s["output_throughput"].get<double>(), out / d, 1e-6 * out / d);
    EXPECT_LE(s["goodput"].get<double>(), s["request_throughput"].get<double>() + 1e-12);
    for (const char* m : {"ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"}) {
      const json& dist = s[m];
      EXPECT_LE(dist["min"].get<double>(), dist["median"].get<double>()) << m;
      EXPECT_LE(dist["median"].get<double>(), dist["p90"].get<double>()) << m;
      EXPECT_LE(dist["p90"].get<double>(), dist["p99"].get<double>()) << m;
      EXPECT_LE(dist["p99"].get<double>(), dist["max"].get<double>()) << m;
    }
    EXPECT_LE(s["ttft_ms"]["median"].get<double>(), s["e2e_ms"]["max"].get<double>());
  }

  static std::string* model_dir_;
  static std::string* server_;
  static std::optional<Subprocess>* local_;
  testing::ScopedTempDir tmp_;
};

std::string* BenchProcessTest::model_dir_ = nullptr;
std::string* BenchProcessTest::server_ = nullptr;
std::optional<Subprocess>* BenchProcessTest::local_ = nullptr;

json ReadJson(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path);
  EXPECT_TRUE(text.ok()) << path;
  return json::parse(text.value_or("{}"));
}

TEST_F(BenchProcessTest, EveryDatasetWritesAConsistentReportAndFigures) {
  const std::string jsonl = tmp_.path() + "/trace.jsonl";
  std::ofstream(jsonl) << "{\"prompt\": \"The capital of France is\", \"max_tokens\": 5}\n"
                          "{\"prompt_token_ids\": [5, 6, 7, 8, 9, 10], \"max_tokens\": 3}\n";
  struct Case {
    std::string name;
    std::vector<std::string> flags;
  };
  for (const Case& c :
       std::vector<Case>{{"random",
                          {"--dataset", "random", "--num-prompts", "4", "--input-len", "24",
                           "--random-range-ratio", "0.5"}},
                         {"prefix",
                          {"--dataset", "prefix", "--num-prompts", "6", "--prefix-groups", "2",
                           "--prefix-len", "48", "--input-len", "8"}},
                         {"multi-turn",
                          {"--dataset", "multi-turn", "--num-prompts", "2", "--turns", "3",
                           "--input-len", "10", "--think-seconds", "0.01"}},
                         {"jsonl", {"--dataset", "jsonl", "--dataset-path", jsonl}}}) {
    SCOPED_TRACE(c.name);
    const std::string out_json = tmp_.path() + "/" + c.name + ".json";
    const std::string plots = tmp_.path() + "/" + c.name + "-plots";
    std::vector<std::string> args = c.flags;
    args.insert(args.end(), {"--output-len", "6", "--max-concurrency", "2", "--slo",
                             "ttft=60000,tpot=60000", "--json", out_json, "--plot", plots});
    if (c.name != "jsonl") args.push_back("--ignore-eos");
    const CommandResult r = RunCommand(Bench(args));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_THAT(r.output, HasSubstr("Serving Benchmark Result"));
    EXPECT_THAT(r.output, HasSubstr("Goodput (req/s)"));
    const json j = ReadJson(out_json);
    ASSERT_EQ(j["points"].size(), 1u);
    EXPECT_EQ(j["config"]["dataset"], c.name);
    const json& p = j["points"][0];
    const size_t expected = c.name == "random"       ? 4
                            : c.name == "prefix"     ? 6
                            : c.name == "multi-turn" ? 6
                                                     : 2;
    ASSERT_EQ(p["requests"].size(), expected);
    CheckReport(p, c.name != "jsonl");
    EXPECT_LE(p["summary"]["max_concurrency_seen"].get<int>(), 2);
    // Generous SLOs: every request is good.
    EXPECT_EQ(p["summary"]["good_requests"], p["summary"]["completed"]);
    if (c.name == "prefix") {
      // 6 requests over 2 shared 48-token prompts: the later ones reuse 3 blocks each.
      EXPECT_GT(p["summary"]["cached_tokens"].get<int64_t>(), 0);
    }
    if (c.name == "multi-turn") {
      // Turn t carries the history: turn 2 = turn 1's prompt + its 6 output tokens + 10.
      for (const json& r : p["requests"]) {
        EXPECT_EQ(r["input_tokens"].get<int64_t>(), 10 + r["turn"].get<int64_t>() * 16) << r.dump();
      }
    }
    for (const char* f : {"ttft_cdf.png", "tpot_cdf.png", "throughput_over_time.png"}) {
      EXPECT_TRUE(FileExists(plots + "/" + f)) << f;
    }
  }
}

TEST_F(BenchProcessTest, SweepWritesOneRowAndOnePointPerValue) {
  const std::string out_json = tmp_.path() + "/sweep.json";
  const CommandResult r = RunCommand(
      Bench({"--num-prompts", "3", "--input-len", "16", "--output-len", "4", "--ignore-eos",
             "--sweep-concurrency", "1,2", "--json", out_json, "--plot", tmp_.path() + "/plots"}));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("concurrency=1"));
  EXPECT_THAT(r.output, HasSubstr("concurrency=2"));
  const json j = ReadJson(out_json);
  ASSERT_EQ(j["points"].size(), 2u);
  for (const json& p : j["points"]) CheckReport(p, true);
  EXPECT_EQ(j["points"][0]["summary"]["max_concurrency_seen"], 1);
  // Each point has its own cache salt: the second does not reuse the first's KV.
  EXPECT_EQ(j["points"][1]["summary"]["cached_tokens"], 0);
  EXPECT_TRUE(FileExists(tmp_.path() + "/plots/latency_vs_throughput.png"));
}

TEST_F(BenchProcessTest, InterruptKeepsAPartialReport) {
  const std::string out_json = tmp_.path() + "/partial.json";
  std::vector<std::string> argv = {"/bin/sh", "-c", "exec \"$@\" 2>&1", "sh"};
  for (const std::string& a :
       Bench({"--duration", "600", "--max-concurrency", "2", "--input-len", "16", "--output-len",
              "64", "--ignore-eos", "--json", out_json})) {
    argv.push_back(a);
  }
  auto p = Subprocess::Start(argv);
  ASSERT_TRUE(p);
  // The first progress line comes once the first requests are sent (2 in flight).
  std::optional<std::string> first = p->ReadLine(kProcessTimeout);
  ASSERT_TRUE(first);
  std::string output = *first + "\n";
  EXPECT_THAT(*first, HasSubstr("2 in flight"));
  p->Kill(SIGINT);
  while (std::optional<std::string> line = p->ReadLine(kProcessTimeout)) output += *line + "\n";
  std::optional<int> status = p->Wait(kProcessTimeout);
  ASSERT_TRUE(status) << output;
  ASSERT_TRUE(WIFEXITED(*status)) << output;
  EXPECT_EQ(WEXITSTATUS(*status), 130) << output;
  EXPECT_THAT(output, HasSubstr("interrupted"));
  const json j = ReadJson(out_json);
  ASSERT_EQ(j["points"].size(), 1u);
  EXPECT_TRUE(j["points"][0]["interrupted"].get<bool>());
  // Requests cut short are recorded as CANCELLED; the summary counts what finished.
  const json& s = j["points"][0]["summary"];
  EXPECT_GE(s["requests"].get<int64_t>(), 2);
  EXPECT_EQ(s["completed"].get<int64_t>() + s["failed"].get<int64_t>(),
            s["requests"].get<int64_t>());
  for (const json& r : j["points"][0]["requests"]) {
    if (!r["ok"].get<bool>()) {
      EXPECT_EQ(r["code"], "CANCELLED") << r.dump();
    }
  }
}

TEST_F(BenchProcessTest, BadInputIsOneClearLine) {
  struct Case {
    std::vector<std::string> args;
    int code;
    std::string message;
  };
  const std::string missing = tmp_.path() + "/missing.jsonl";
  for (const Case& c : std::vector<Case>{
           {{"--dataset", "sharegpt"}, 2, "unknown dataset 'sharegpt'"},
           {{"--dataset", "jsonl", "--dataset-path", missing}, 2, "cannot read the dataset file"},
           {{"--slo", "ttft:500"}, 2, "--slo: 'ttft:500' is not KEY=MILLISECONDS"},
           {{"--request-rate", "fast"}, 2, "--request-rate must be a number > 0 or inf"},
           {{"--sweep-concurrency", "1,x"}, 2, "--sweep-concurrency: 'x'"}}) {
    const CommandResult r = RunCommand(Bench(c.args));
    EXPECT_EQ(r.exit_code, c.code) << r.output;
    EXPECT_THAT(r.output, HasSubstr(c.message));
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  }
  // Nobody listens on port 1.
  const CommandResult r = RunCommand({SiblingBinary("kvrelay"), "bench", "serve", "--server",
                                      "127.0.0.1:1", "--connect-timeout", "2"});
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_THAT(r.output, HasSubstr("cannot reach a kvrelay router at 127.0.0.1:1"));
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
}

}  // namespace
}  // namespace kvrelay

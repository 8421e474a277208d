// kvrelay bench serve --server HOST:PORT [dataset, arrival, sweep, report flags]: the load
// generator (tools/bench/), at `vllm bench serve` parity. See README "Load generator".
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <fstream>
#include <limits>
#include <ostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "grpcpp/grpcpp.h"
#include "nlohmann/json.hpp"
#include "tools/bench/dataset.h"
#include "tools/bench/report.h"
#include "tools/bench/runner.h"
#include "tools/bench/stats.h"
#include "tools/cli/args.h"
#include "tools/cli/cli.h"
#include "tools/cli/client_tls.h"

namespace kvrelay::cli {
namespace {

std::atomic<bool> g_interrupted{false};

void OnInterrupt(int) {
  g_interrupted.store(true);
  ::signal(SIGINT, SIG_DFL);  // a second Ctrl-C kills at once
}

void DeclareFlags(Args& args) {
  using K = Args::Kind;
  const long long kMaxInt = std::numeric_limits<int32_t>::max();
  args.Flag("server", K::kString, "HOST:PORT of a kvrelay router (required)")
      .Flag("model-name", K::kString, "the model to use (default: the one served)")
      .Flag("dataset", K::kString, "random | prefix | multi-turn | jsonl (default random)")
      .Flag(
          "dataset-path", K::kString,
          "jsonl: one {\"prompt\": TEXT | \"prompt_token_ids\": [...], \"max_tokens\": N} per line")
      .IntFlag("num-prompts", 0, kMaxInt,
               "requests (conversations for multi-turn; jsonl: first N lines, 0 = all); default "
               "100")
      .IntFlag("input-len", 1, kMaxInt, "mean prompt tokens of random/prefix suffixes/turns (256)")
      .IntFlag("output-len", 1, kMaxInt,
               "mean tokens to generate (64; jsonl: when a line has none)")
      .Flag("random-range-ratio", K::kFloat,
            "lengths uniform in [len x (1-r), len x (1+r)], r in [0, 1) (default 0)")
      .IntFlag("prefix-groups", 1, kMaxInt, "prefix: shared system prompts (default 4)")
      .IntFlag("prefix-len", 1, kMaxInt, "prefix: tokens per shared system prompt (default 512)")
      .IntFlag("turns", 1, 1000, "multi-turn: turns per conversation (default 3)")
      .Flag("think-seconds", K::kFloat, "multi-turn: mean think time between turns (default 0)")
      .IntFlag("seed", 0, std::numeric_limits<long long>::max(),
               "dataset and arrival seed (default 0)")
      .Flag("request-rate", K::kString, "requests/s, Poisson; inf = all at once (default inf)")
      .Flag("burstiness", K::kFloat, "gamma shape of the gaps: 1 Poisson, <1 burstier (default 1)")
      .IntFlag("max-concurrency", 0, kMaxInt, "requests in flight at most (0 = unbounded)")
      .Flag("duration", K::kFloat, "run this many seconds, cycling the dataset (default: once)")
      .Flag("sweep-rate", K::kString, "comma-separated request rates: one run per rate")
      .Flag("sweep-concurrency", K::kString, "comma-separated max concurrencies: one run per value")
      .Flag("slo", K::kString, "goodput SLOs, e.g. ttft=500,tpot=50 (ms; also e2e)")
      .Flag("temperature", K::kFloat, "sampling temperature (default 0: greedy)")
      .Flag("ignore-eos", K::kBool, "generate exactly the output length (do not stop at EOS)")
      .Flag("cache-salt", K::kString, "prefix-cache isolation salt of every request")
      .Flag("share-cache", K::kBool,
            "sweeps: let a point reuse the KV earlier points built (default: a salt per point)")
      .Flag("request-timeout", K::kFloat, "deadline of each request in seconds (default none)")
      .Flag("connect-timeout", K::kFloat, "seconds to wait for the server (default 10)")
      .Flag("json", K::kString, "write every request record and the summary to this file")
      .Flag("plot", K::kString, "write PNG figures (gnuplot) into this folder")
      .Flag("no-progress", K::kBool, "no progress bar on stderr")
      .Flag("help", K::kBool, "this text");
}

int Fail(std::ostream& err, const std::string& what, int code = 1) {
  err << "kvrelay bench serve: " << what << "\n";
  return code;
}

bool ParseRate(absl::string_view text, double* rate) {
  if (text == "inf") {
    *rate = std::numeric_limits<double>::infinity();
    return true;
  }
  return absl::SimpleAtod(text, rate) && std::isfinite(*rate) && *rate > 0;
}

// A progress bar redrawn in place on a terminal; a line per 10% otherwise.
class ProgressBar {
 public:
  ProgressBar(std::ostream& err, bool enabled, std::string label)
      : err_(err), enabled_(enabled), tty_(::isatty(2) == 1), label_(std::move(label)) {}
  void Update(const bench::Progress& p) {
    if (!enabled_) return;
    const double frac = p.total > 0 ? static_cast<double>(p.done) / p.total
                        : p.duration_seconds > 0
                            ? std::min(1.0, p.elapsed_seconds / p.duration_seconds)
                            : 0;
    const double tps = p.elapsed_seconds > 0 ? p.output_tokens / p.elapsed_seconds : 0;
    const int width = 30;
    const int fill = static_cast<int>(frac * width);
    const std::string line = absl::StrFormat(
        "%s [%s%s] %d/%s req, %d in flight, %.1f out tok/s, %.1fs", label_, std::string(fill, '='),
        std::string(width - fill, ' '), p.done, p.total > 0 ? std::to_string(p.total) : "?",
        p.in_flight, tps, p.elapsed_seconds);
    if (tty_) {
      err_ << "\r" << line << "\x1b[K" << std::flush;
      drawn_ = true;
    } else if (static_cast<int>(frac * 10) > last_decile_) {
      last_decile_ = static_cast<int>(frac * 10);
      err_ << line << "\n" << std::flush;
    }
  }
  void Done() {
    if (drawn_) err_ << "\n" << std::flush;
    drawn_ = false;
  }

 private:
  std::ostream& err_;
  const bool enabled_, tty_;
  const std::string label_;
  bool drawn_ = false;
  int last_decile_ = -1;
};

int RunServe(int argc, char** argv, std::ostream& out, std::ostream& err) {
  Args args;
  DeclareFlags(args);
  DeclareClientTlsFlags(args);
  if (absl::Status s = args.Parse(argc, argv, 3); !s.ok())
    return Fail(err, std::string(s.message()), 2);
  if (args.GetBool("help")) {
    out << "usage: kvrelay bench serve --server HOST:PORT [flags]\n" << args.Help();
    return 0;
  }
  const std::string server = args.GetString("server", "");
  if (server.empty()) return Fail(err, "--server HOST:PORT is required", 2);

  bench::DatasetOptions d;
  absl::StatusOr<bench::DatasetKind> kind =
      bench::ParseDatasetKind(args.GetString("dataset", "random"));
  if (!kind.ok()) return Fail(err, "--dataset: " + std::string(kind.status().message()), 2);
  d.kind = *kind;
  d.jsonl_path = args.GetString("dataset-path", "");
  if (d.kind == bench::DatasetKind::kJsonl && d.jsonl_path.empty()) {
    return Fail(err, "--dataset jsonl needs --dataset-path FILE", 2);
  }
  if (d.kind != bench::DatasetKind::kJsonl && !d.jsonl_path.empty()) {
    return Fail(err, "--dataset-path is for --dataset jsonl", 2);
  }
  d.num_prompts =
      static_cast<int>(args.GetInt("num-prompts", d.kind == bench::DatasetKind::kJsonl ? 0 : 100));
  d.input_len = static_cast<int>(args.GetInt("input-len", 256));
  d.output_len = static_cast<int>(args.GetInt("output-len", 64));
  d.range_ratio = args.GetFloat("random-range-ratio", 0);
  d.prefix_groups = static_cast<int>(args.GetInt("prefix-groups", 4));
  d.prefix_len = static_cast<int>(args.GetInt("prefix-len", 512));
  d.turns = static_cast<int>(args.GetInt("turns", 3));
  d.think_seconds = args.GetFloat("think-seconds", 0);
  d.seed = static_cast<uint64_t>(args.GetInt("seed", 0));

  bench::Slo slo;
  if (args.Has("slo")) {
    absl::StatusOr<bench::Slo> parsed = bench::ParseSlo(args.GetString("slo", ""));
    if (!parsed.ok()) return Fail(err, std::string(parsed.status().message()), 2);
    slo = *parsed;
  }
  bench::RunOptions run;
  run.model = args.GetString("model-name", "");
  if (!ParseRate(args.GetString("request-rate", "inf"), &run.request_rate)) {
    return Fail(err,
                "--request-rate must be a number > 0 or inf, got '" +
                    args.GetString("request-rate", "") + "'",
                2);
  }
  run.burstiness = args.GetFloat("burstiness", 1.0);
  if (!(run.burstiness > 0) || !std::isfinite(run.burstiness)) {
    return Fail(err, "--burstiness must be a number > 0", 2);
  }
  run.max_concurrency = static_cast<int>(args.GetInt("max-concurrency", 0));
  run.duration_seconds = args.GetFloat("duration", 0);
  if (args.Has("duration") && !(run.duration_seconds > 0 && std::isfinite(run.duration_seconds))) {
    return Fail(err, "--duration must be a number of seconds > 0", 2);
  }
  run.request_timeout_seconds = args.GetFloat("request-timeout", 0);
  if (args.Has("request-timeout") && !(run.request_timeout_seconds > 0)) {
    return Fail(err, "--request-timeout must be > 0", 2);
  }
  const double connect_timeout = args.GetFloat("connect-timeout", 10);
  if (!(connect_timeout > 0)) return Fail(err, "--connect-timeout must be > 0", 2);
  const double temperature = args.GetFloat("temperature", 0);
  if (!(temperature >= 0) || !std::isfinite(temperature))
    return Fail(err, "--temperature must be >= 0", 2);
  run.sampling.set_temperature(static_cast<float>(temperature));
  run.sampling.set_seed(d.seed);
  run.sampling.set_ignore_eos(args.GetBool("ignore-eos"));
  run.cache_salt = args.GetString("cache-salt", "");
  run.seed = d.seed;
  run.stop = &g_interrupted;

  // Sweep points: (label, rate, concurrency).
  std::vector<bench::Point> points;
  if (args.Has("sweep-rate") && args.Has("sweep-concurrency")) {
    return Fail(err, "give --sweep-rate or --sweep-concurrency, not both", 2);
  }
  if (args.Has("sweep-rate")) {
    for (absl::string_view v : absl::StrSplit(args.GetString("sweep-rate", ""), ',')) {
      bench::Point p;
      if (!ParseRate(v, &p.request_rate)) {
        return Fail(err, "--sweep-rate: '" + std::string(v) + "' is not a rate > 0 or inf", 2);
      }
      p.max_concurrency = run.max_concurrency;
      p.label = absl::StrCat("rate=", v);
      points.push_back(std::move(p));
    }
  } else if (args.Has("sweep-concurrency")) {
    for (absl::string_view v : absl::StrSplit(args.GetString("sweep-concurrency", ""), ',')) {
      bench::Point p;
      if (!absl::SimpleAtoi(v, &p.max_concurrency) || p.max_concurrency < 1) {
        return Fail(err, "--sweep-concurrency: '" + std::string(v) + "' is not a concurrency >= 1",
                    2);
      }
      p.request_rate = run.request_rate;
      p.label = absl::StrCat("concurrency=", v);
      points.push_back(std::move(p));
    }
  } else {
    bench::Point p;
    p.request_rate = run.request_rate;
    p.max_concurrency = run.max_concurrency;
    p.label = absl::StrCat(
        "rate=", args.GetString("request-rate", "inf"),
        run.max_concurrency > 0 ? absl::StrCat(",concurrency=", run.max_concurrency) : "");
    points.push_back(std::move(p));
  }
  const std::string json_path = args.GetString("json", "");
  const std::string plot_dir = args.GetString("plot", "");
  // Fail on an unwritable report before spending the run.
  if (!json_path.empty()) {
    std::ofstream probe(json_path, std::ios::app);
    if (!probe) return Fail(err, "--json: cannot write " + json_path, 2);
  }

  absl::StatusOr<std::shared_ptr<grpc::Channel>> made = ClientChannel(args, server);
  if (!made.ok()) return Fail(err, std::string(made.status().message()), 2);
  std::shared_ptr<grpc::Channel> channel = *std::move(made);
  absl::StatusOr<v1::ModelInfo> info =
      bench::FetchModelInfo(channel, server, run.model, connect_timeout);
  if (!info.ok()) return Fail(err, std::string(info.status().message()));
  run.model = info->id();
  d.vocab_size = info->vocab_size();
  if (d.kind != bench::DatasetKind::kJsonl && d.vocab_size <= 0) {
    return Fail(err, server + " does not report its vocabulary size (an older router?)");
  }
  absl::StatusOr<std::vector<bench::Conversation>> dataset = bench::MakeDataset(d);
  if (!dataset.ok()) return Fail(err, std::string(dataset.status().message()), 2);
  if (absl::Status s = bench::TokenizeTexts(channel, run.model, &*dataset); !s.ok()) {
    return Fail(err, std::string(s.message()));
  }

  nlohmann::ordered_json config;
  config["server"] = server;
  config["model"] = run.model;
  config["dataset"] = bench::DatasetKindName(d.kind);
  if (d.kind == bench::DatasetKind::kJsonl) config["dataset_path"] = d.jsonl_path;
  config["num_prompts"] = dataset->size();
  config["requests_per_pass"] = bench::CountRequests(*dataset);
  if (d.kind != bench::DatasetKind::kJsonl) {
    config["input_len"] = d.input_len;
    config["output_len"] = d.output_len;
    config["random_range_ratio"] = d.range_ratio;
  }
  if (d.kind == bench::DatasetKind::kPrefix) {
    config["prefix_groups"] = d.prefix_groups;
    config["prefix_len"] = d.prefix_len;
  }
  if (d.kind == bench::DatasetKind::kMultiTurn) {
    config["turns"] = d.turns;
    config["think_seconds"] = d.think_seconds;
  }
  config["seed"] = d.seed;
  config["burstiness"] = run.burstiness;
  config["duration_s"] = run.duration_seconds;
  config["temperature"] = temperature;
  config["ignore_eos"] = run.sampling.ignore_eos();
  config["block_size"] = info->block_size();
  config["prefill_workers"] = info->prefill_workers();
  config["decode_workers"] = info->decode_workers();

  g_interrupted.store(false);
  struct sigaction sa {
  }, old{};
  sa.sa_handler = OnInterrupt;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, &old);
  const bool progress = !args.GetBool("no-progress");
  size_t ran = 0;
  for (bench::Point& p : points) {
    if (g_interrupted.load()) break;
    bench::RunOptions o = run;
    o.request_rate = p.request_rate;
    o.max_concurrency = p.max_concurrency;
    o.request_id_prefix = absl::StrCat("bench-", ran);
    // Points of a sweep are independent: each gets its own cache salt, so a point does not
    // reuse the KV the previous one built from the same dataset.
    if (points.size() > 1 && !args.GetBool("share-cache")) {
      o.cache_salt = absl::StrCat(run.cache_salt, "/point-", ran);
    }
    ProgressBar bar(err, progress, p.label);
    o.progress = [&bar](const bench::Progress& pr) { bar.Update(pr); };
    absl::StatusOr<bench::RunResult> r = bench::RunBenchmark(channel, *dataset, o);
    bar.Done();
    if (!r.ok()) {
      ::sigaction(SIGINT, &old, nullptr);
      return Fail(err, std::string(r.status().message()), 2);
    }
    p.run = std::move(*r);
    p.summary = bench::Summarize(p.run.records, p.run.duration_seconds, slo);
    bench::PrintSummary(p, slo, out);
    ++ran;
  }
  ::sigaction(SIGINT, &old, nullptr);
  points.resize(ran);
  if (points.size() > 1) bench::PrintSweepTable(points, slo, out);
  int rc = 0;
  if (!json_path.empty()) {
    std::ofstream f(json_path, std::ios::trunc);
    f << bench::ReportJson(config, points, slo).dump(1) << "\n";
    if (!f) {
      err << "kvrelay bench serve: cannot write " << json_path << "\n";
      rc = 1;
    } else {
      err << "kvrelay bench serve: wrote " << json_path << "\n";
    }
  }
  if (!plot_dir.empty() && !points.empty()) {
    std::vector<std::string> pngs;
    if (absl::Status s = bench::WritePlots(points, plot_dir, &pngs); !s.ok()) {
      err << "kvrelay bench serve: " << s.message() << "\n";
      rc = 1;
    } else {
      for (const std::string& png : pngs) err << "kvrelay bench serve: wrote " << png << "\n";
    }
  }
  if (g_interrupted.load()) {
    err << "kvrelay bench serve: interrupted; the report holds what had finished\n";
    return rc != 0 ? rc : 130;
  }
  return rc;
}

}  // namespace

int RunBench(int argc, char** argv, std::ostream& out, std::ostream& err) {
  if (argc < 3 || std::string(argv[2]) == "--help" || std::string(argv[2]) == "help") {
    (argc < 3 ? err : out) << "usage: kvrelay bench serve --server HOST:PORT [flags]\n"
                              "  serve   drive a running kvrelay service with a workload and "
                              "report latency and throughput\n"
                              "Run 'kvrelay bench serve --help' for the flags.\n";
    return argc < 3 ? 2 : 0;
  }
  if (std::string(argv[2]) == "serve") return RunServe(argc, argv, out, err);
  err << "kvrelay bench: unknown subcommand '" << argv[2] << "' (known: serve)\n";
  return 2;
}

}  // namespace kvrelay::cli

// kvrelay local [--model DIR] [--prefill N] [--decode M] [--port P] [--threads T] ...
//
// The whole service on one machine: starts kvrelay-router, waits for its READY line,
// starts N kvrelay-prefill and M kvrelay-decode workers that register with it, waits
// until the router lists all of them alive, then prints the endpoint and "READY <port>"
// on stdout. Ctrl-C / SIGTERM / SIGHUP stop the workers first (they drain), then the
// router, and exit 0; a child that exits on its own stops everything and exits 1. The
// binaries are taken from the folder of the running kvrelay executable.
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/rpc/pki.h"
#include "common/rpc/security.h"
#include "common/util/file.h"
#include "grpcpp/grpcpp.h"
#include "kvrelay/v1/registry.grpc.pb.h"
#include "tools/cli/args.h"
#include "tools/cli/cli.h"
#include "tools/cli/supervisor.h"

namespace kvrelay::cli {
namespace {

constexpr char kRouter[] = "router";

void DeclareFlags(Args& args) {
  using K = Args::Kind;
  args.Flag("model", K::kString, "Hugging Face model folder (default: the demo model)")
      .Flag("model-id", K::kString,
            "model id served and used in KV block hashes (default: the "
            "model folder's name)")
      .IntFlag("prefill", 0, 64, "prefill workers (default 1; 0: decode workers prefill locally)")
      .IntFlag("decode", 1, 64, "decode workers (default 1)")
      .IntFlag("port", 0, 65535, "router port on 127.0.0.1 (default 50051; 0: any free port)")
      .IntFlag("http-port", 1, 65535, "also serve the OpenAI HTTP API on 127.0.0.1:PORT")
      .IntFlag("threads", 0, 1024,
               "CPU threads per worker (default: the usable cores divided by the number of "
               "workers, at least 1; 0: every worker uses all cores)")
      .Flag("router-flag", K::kString, "extra flag for kvrelay-router, e.g. --router-flag=--x=1",
            true)
      .Flag("worker-flag", K::kString,
            "extra flag for every worker, e.g. --worker-flag=--kv_blocks=512", true)
      .Flag("prefill-flag", K::kString, "extra flag for the prefill workers", true)
      .Flag("decode-flag", K::kString, "extra flag for the decode workers", true)
      .Flag("ready-timeout-seconds", K::kFloat,
            "how long start-up may take: each READY line, then the registrations (default 120)")
      .Flag("grace-seconds", K::kFloat,
            "on stop, how long each stage (workers, then router) may drain before SIGKILL "
            "(default 30)")
      .Flag("bin-dir", K::kString,
            "folder of kvrelay-router, kvrelay-prefill, kvrelay-decode (default: kvrelay's own)")
      .Flag("tls", K::kBool,
            "TLS on the router's port and mutual TLS + a cluster token between the processes, "
            "with a throw-away CA (clients: --tls-ca DIR/ca.crt)")
      .Flag("tls-dir", K::kString,
            "--tls: where the CA, certificates and token go (default: a new /tmp/kvrelay-tls-* "
            "folder, removed on exit)")
      .Flag("dry-run", K::kBool, "print the commands it would run and exit")
      .Flag("help", K::kBool, "this text");
}

struct ChildCommand {
  std::string name;  // "router", "prefill-0", "decode-0": also the worker id
  std::vector<std::string> argv;
};

struct Plan {
  std::string model_dir;
  std::string model_id;  // as given (empty: the router's default)
  int prefill = 1, decode = 1, port = 50051, threads = 1;
  absl::Duration ready_timeout = absl::Seconds(120), grace = absl::Seconds(30);
  std::string bin_dir;
  std::vector<std::string> router_flags, prefill_flags, decode_flags;
  int http_port = 0;    // 0: no HTTP API
  std::string tls_dir;  // --tls: ca.crt, node.crt/.key, cluster-token (rpc::WriteLocalPki)
};

// The flags that give every child the --tls certificates and token.
std::vector<std::string> TlsFlags(const std::string& dir) {
  return {"--tls_cert=" + JoinPath(dir, "node.crt"), "--tls_key=" + JoinPath(dir, "node.key"),
          "--tls_ca=" + JoinPath(dir, "ca.crt"), "--tls_require_client_cert",
          "--cluster_token_file=" + JoinPath(dir, "cluster-token")};
}

int UsableCores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN));
}

std::string SelfDir() {
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  const std::string path = n > 0 ? std::string(self, static_cast<size_t>(n)) : std::string("./x");
  return path.substr(0, path.rfind('/'));
}

std::string Plural(int n, const std::string& what) {
  return absl::StrCat(n, " ", what, n == 1 ? "" : "s");
}

// Validates the flags that do not need the file system.
absl::StatusOr<Plan> ReadPlan(const Args& args) {
  Plan p;
  p.prefill = static_cast<int>(args.GetInt("prefill", 1));
  p.decode = static_cast<int>(args.GetInt("decode", 1));
  p.port = static_cast<int>(args.GetInt("port", 50051));
  p.http_port = static_cast<int>(args.GetInt("http-port", 0));
  p.threads =
      static_cast<int>(args.GetInt("threads", std::max(1, UsableCores() / (p.prefill + p.decode))));
  p.model_id = args.GetString("model-id", "");
  if (args.Has("model-id") && p.model_id.empty())
    return absl::InvalidArgumentError("--model-id must not be empty");
  for (const char* name : {"ready-timeout-seconds", "grace-seconds"}) {
    const double v = args.GetFloat(name, 1);
    if (!(v > 0) || v > 86400) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " must be in (0, 86400]"));
    }
  }
  p.ready_timeout = absl::Seconds(args.GetFloat("ready-timeout-seconds", 120));
  p.grace = absl::Seconds(args.GetFloat("grace-seconds", 30));
  for (const char* name : {"router-flag", "worker-flag", "prefill-flag", "decode-flag"}) {
    for (const std::string& f : args.GetAll(name)) {
      if (f.size() < 3 || f.rfind("--", 0) != 0) {
        return absl::InvalidArgumentError(absl::StrCat("--", name,
                                                       " takes one flag of the child, like --",
                                                       name, "=--name=value; got '", f, "'"));
      }
    }
  }
  p.router_flags = args.GetAll("router-flag");
  p.prefill_flags = args.GetAll("worker-flag");
  p.decode_flags = p.prefill_flags;
  for (const std::string& f : args.GetAll("prefill-flag")) p.prefill_flags.push_back(f);
  for (const std::string& f : args.GetAll("decode-flag")) p.decode_flags.push_back(f);
  p.bin_dir = args.GetString("bin-dir", SelfDir());
  return p;
}

ChildCommand RouterCommand(const Plan& p) {
  ChildCommand c{kRouter,
                 {JoinPath(p.bin_dir, "kvrelay-router"), "--model", p.model_dir, "--listen",
                  absl::StrCat("127.0.0.1:", p.port)}};
  if (!p.model_id.empty()) c.argv.insert(c.argv.end(), {"--model_id", p.model_id});
  if (p.http_port > 0) c.argv.push_back(absl::StrCat("--http_listen=127.0.0.1:", p.http_port));
  if (!p.tls_dir.empty()) {
    for (std::string& f : TlsFlags(p.tls_dir)) c.argv.push_back(std::move(f));
  }
  c.argv.insert(c.argv.end(), p.router_flags.begin(), p.router_flags.end());
  return c;
}

// The workers, prefill first; `router` is the address they register with.
std::vector<ChildCommand> WorkerCommands(const Plan& p, const std::string& router) {
  std::vector<ChildCommand> out;
  for (const bool prefill : {true, false}) {
    const int n = prefill ? p.prefill : p.decode;
    const std::string role = prefill ? "prefill" : "decode";
    for (int i = 0; i < n; ++i) {
      ChildCommand c;
      c.name = absl::StrCat(role, "-", i);
      c.argv = {JoinPath(p.bin_dir, "kvrelay-" + role),
                "--model",
                p.model_dir,
                "--listen",
                "127.0.0.1:0",
                "--router",
                router,
                "--worker_id",
                c.name,
                "--threads",
                std::to_string(p.threads)};
      if (!p.model_id.empty()) c.argv.insert(c.argv.end(), {"--model_id", p.model_id});
      if (!p.tls_dir.empty()) {
        for (std::string& f : TlsFlags(p.tls_dir)) c.argv.push_back(std::move(f));
      }
      const auto& extra = prefill ? p.prefill_flags : p.decode_flags;
      c.argv.insert(c.argv.end(), extra.begin(), extra.end());
      out.push_back(std::move(c));
    }
  }
  return out;
}

// One run of the service: owns the supervisor and the state of start-up.
class LocalRun {
 public:
  LocalRun(const Plan& plan, std::unique_ptr<Supervisor> sup, std::ostream& out, std::ostream& err)
      : plan_(plan), sup_(std::move(sup)), out_(out), err_(err) {}

  int Run() {
    // 1. The router, until it prints READY <port>.
    const ChildCommand router = RouterCommand(plan_);
    if (!StartChild(router)) return Abort();
    std::map<std::string, int> ports;
    if (Outcome o = AwaitReady({kRouter}, &ports); o != Outcome::kOk) return Finish(o);
    const int port = ports[kRouter];
    // 2. The workers, in parallel, until each prints READY.
    const std::vector<ChildCommand> workers =
        WorkerCommands(plan_, absl::StrCat("127.0.0.1:", port));
    std::set<std::string> names;
    for (const ChildCommand& w : workers) {
      if (!StartChild(w)) return Abort();
      names.insert(w.name);
    }
    if (Outcome o = AwaitReady(names, &ports); o != Outcome::kOk) return Finish(o);
    // 3. Until the router lists every worker alive.
    std::string model_id = plan_.model_id.empty() ? BaseName(plan_.model_dir) : plan_.model_id;
    if (Outcome o = AwaitRegistered(port, names, &model_id); o != Outcome::kOk) return Finish(o);
    out_ << "kvrelay local: serving " << model_id << " on 127.0.0.1:" << port << " ("
         << plan_.prefill << " prefill, " << Plural(plan_.decode, "decode worker") << ")\n";
    if (plan_.http_port > 0) {
      // With --tls the router serves it over HTTPS, with the node certificate.
      out_ << "kvrelay local: OpenAI API on " << (plan_.tls_dir.empty() ? "http" : "https")
           << "://127.0.0.1:" << plan_.http_port << "/v1\n";
    }
    if (!plan_.tls_dir.empty()) {
      out_ << "kvrelay local: TLS on (mutual TLS and a cluster token between the processes); "
              "clients: --tls-ca "
           << JoinPath(plan_.tls_dir, "ca.crt") << "\n";
    }
    out_ << "READY " << port << "\n" << std::flush;
    // 4. Serve until a stop signal or a child's death.
    for (;;) {
      Supervisor::Event e = sup_->Next(absl::InfiniteFuture());
      if (Outcome o = Handle(e); o != Outcome::kOk) return Finish(o);
    }
  }

 private:
  enum class Outcome { kOk, kStopRequested, kFailed };

  bool StartChild(const ChildCommand& c) {
    absl::StatusOr<pid_t> pid = sup_->Start(c.name, c.argv);
    if (!pid.ok()) {
      err_ << "kvrelay local: " << c.name << ": " << pid.status().message() << "\n";
      return false;
    }
    err_ << "kvrelay local: child " << c.name << " pid " << *pid << ": "
         << absl::StrJoin(c.argv, " ") << "\n"
         << std::flush;
    return true;
  }

  // Events other than READY lines, in every phase.
  Outcome Handle(const Supervisor::Event& e) {
    switch (e.kind) {
      case Supervisor::Event::Kind::kLine:
        err_ << "[" << e.child << "] " << e.line << "\n" << std::flush;
        return Outcome::kOk;
      case Supervisor::Event::Kind::kExit:
        err_ << "kvrelay local: " << e.child << " (pid " << e.pid << ") "
             << DescribeWaitStatus(e.status) << " unexpectedly; stopping the others\n"
             << std::flush;
        return Outcome::kFailed;
      case Supervisor::Event::Kind::kSignal:
        err_ << "kvrelay local: signal " << e.signal << ", stopping\n" << std::flush;
        return Outcome::kStopRequested;
      case Supervisor::Event::Kind::kTimeout:
        return Outcome::kOk;
    }
    return Outcome::kOk;
  }

  Outcome AwaitReady(std::set<std::string> names, std::map<std::string, int>* ports) {
    const absl::Time deadline = absl::Now() + plan_.ready_timeout;
    while (!names.empty()) {
      Supervisor::Event e = sup_->Next(deadline);
      if (e.kind == Supervisor::Event::Kind::kLine && names.count(e.child) > 0 &&
          e.line.rfind("READY ", 0) == 0) {
        int port = 0;
        if (!absl::SimpleAtoi(e.line.substr(6), &port) || port <= 0 || port > 65535) {
          err_ << "kvrelay local: " << e.child << " printed a bad READY line: " << e.line << "\n";
          return Outcome::kFailed;
        }
        (*ports)[e.child] = port;
        names.erase(e.child);
        continue;
      }
      if (e.kind == Supervisor::Event::Kind::kTimeout) {
        err_ << "kvrelay local: not ready after " << absl::FormatDuration(plan_.ready_timeout)
             << ": " << absl::StrJoin(names, ", ") << "\n";
        return Outcome::kFailed;
      }
      if (Outcome o = Handle(e); o != Outcome::kOk) return o;
    }
    return Outcome::kOk;
  }

  Outcome AwaitRegistered(int port, const std::set<std::string>& names, std::string* model_id) {
    // The Registry is internal: with --tls it wants the node certificate and the token.
    rpc::Security security;
    if (!plan_.tls_dir.empty()) {
      rpc::SecurityOptions o;
      o.tls_cert = JoinPath(plan_.tls_dir, "node.crt");
      o.tls_key = JoinPath(plan_.tls_dir, "node.key");
      o.tls_ca = JoinPath(plan_.tls_dir, "ca.crt");
      o.cluster_token_file = JoinPath(plan_.tls_dir, "cluster-token");
      absl::StatusOr<rpc::Security> s = rpc::Security::Load(o);
      if (!s.ok()) {
        err_ << "kvrelay local: " << s.status().message() << "\n";
        return Outcome::kFailed;
      }
      security = *std::move(s);
    }
    auto stub = v1::Registry::NewStub(
        security.CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::ChannelArguments()));
    const absl::Time deadline = absl::Now() + plan_.ready_timeout;
    std::string last_error;
    std::set<std::string> missing = names;
    for (;;) {
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(std::min(deadline, absl::Now() + absl::Seconds(2))));
      v1::ListWorkersResponse resp;
      const grpc::Status s = stub->ListWorkers(&ctx, v1::ListWorkersRequest(), &resp);
      if (s.ok()) {
        missing = names;
        for (const v1::WorkerStatus& w : resp.workers()) {
          if (!w.alive() || missing.erase(w.registration().worker_id()) == 0) continue;
          if (!w.registration().model_id().empty()) *model_id = w.registration().model_id();
        }
        if (missing.empty()) return Outcome::kOk;
        last_error.clear();
      } else {
        last_error = absl::StrCat("ListWorkers: ", s.error_message());
      }
      if (absl::Now() >= deadline) {
        err_ << "kvrelay local: the router did not list every worker alive after "
             << absl::FormatDuration(plan_.ready_timeout) << "; missing "
             << absl::StrJoin(missing, ", ") << (last_error.empty() ? "" : " (") << last_error
             << (last_error.empty() ? "" : ")") << "\n";
        return Outcome::kFailed;
      }
      // Registration has no watch API: ask again shortly, serving events meanwhile.
      const absl::Time next = std::min(deadline, absl::Now() + absl::Milliseconds(100));
      for (;;) {
        Supervisor::Event e = sup_->Next(next);
        if (e.kind == Supervisor::Event::Kind::kTimeout) break;
        if (Outcome o = Handle(e); o != Outcome::kOk) return o;
      }
    }
  }

  // Workers first (they drain and unregister), then the router.
  void StopEverything() {
    std::vector<std::string> workers = sup_->RunningChildren();
    workers.erase(std::remove(workers.begin(), workers.end(), kRouter), workers.end());
    sup_->Stop(workers, plan_.grace);
    sup_->Stop({kRouter}, plan_.grace);
  }

  int Abort() { return Finish(Outcome::kFailed); }

  int Finish(Outcome o) {
    StopEverything();
    if (o == Outcome::kStopRequested) {
      err_ << "kvrelay local: stopped\n" << std::flush;
      return 0;
    }
    return 1;
  }

  const Plan& plan_;
  std::unique_ptr<Supervisor> sup_;
  std::ostream& out_;
  std::ostream& err_;
};

// A folder removed, with what is in it, when this goes.
class TempTlsDir {
 public:
  explicit TempTlsDir(std::string path) : path_(std::move(path)) {}
  TempTlsDir(const TempTlsDir&) = delete;
  TempTlsDir& operator=(const TempTlsDir&) = delete;
  ~TempTlsDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }

 private:
  std::string path_;
};

absl::StatusOr<std::string> MakeTempDir(const std::string& prefix) {
  const char* tmp = std::getenv("TMPDIR");
  std::string templ = JoinPath(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", prefix + "XXXXXX");
  if (::mkdtemp(templ.data()) == nullptr) {
    return absl::InternalError("cannot create a folder like " + templ);
  }
  return templ;
}

int Fail(std::ostream& err, const std::string& what, int code = 1) {
  err << "kvrelay local: " << what << "\n";
  return code;
}

}  // namespace

int RunLocal(int argc, char** argv, std::ostream& out, std::ostream& err) {
  Args args;
  DeclareFlags(args);
  if (absl::Status s = args.Parse(argc, argv, 2); !s.ok())
    return Fail(err, std::string(s.message()), 2);
  if (args.GetBool("help")) {
    out << "usage: kvrelay local [--model DIR] [--prefill N] [--decode M] [--port P] "
           "[--threads T] [flags]\n"
           "Runs kvrelay-router plus N prefill and M decode workers on this machine and prints\n"
           "\"READY <port>\" once every worker is registered; Ctrl-C stops them all.\n"
        << args.Help();
    return 0;
  }
  absl::StatusOr<Plan> plan = ReadPlan(args);
  if (!plan.ok()) return Fail(err, std::string(plan.status().message()), 2);
  std::string dir = args.GetString("model", "");
  if (dir.empty()) {
    absl::StatusOr<std::string> demo = EnsureDemoModel(err);
    if (!demo.ok()) return Fail(err, std::string(demo.status().message()));
    dir = *demo;
  } else if (!IsDirectory(dir)) {
    return Fail(err, "--model " + dir + ": no such folder");
  }
  plan->model_dir = dir;
  if (args.Has("tls-dir") && !args.GetBool("tls")) return Fail(err, "--tls-dir needs --tls", 2);
  // --tls without --tls-dir: a fresh folder, removed on exit.
  std::optional<TempTlsDir> temp_tls;
  if (args.GetBool("tls")) {
    plan->tls_dir = args.GetString("tls-dir", "");
    if (args.GetBool("dry-run")) {
      if (plan->tls_dir.empty()) plan->tls_dir = "<tls-dir>";
    } else {
      if (plan->tls_dir.empty()) {
        absl::StatusOr<std::string> d = MakeTempDir("kvrelay-tls-");
        if (!d.ok()) return Fail(err, std::string(d.status().message()));
        temp_tls.emplace(*d);
        plan->tls_dir = *d;
      }
      if (absl::Status s = rpc::WriteLocalPki(plan->tls_dir); !s.ok()) {
        return Fail(err, "--tls: " + std::string(s.message()));
      }
    }
  }
  if (args.GetBool("dry-run")) {
    const std::string router =
        plan->port == 0 ? "127.0.0.1:<router port>" : absl::StrCat("127.0.0.1:", plan->port);
    out << kRouter << ": " << absl::StrJoin(RouterCommand(*plan).argv, " ") << "\n";
    for (const ChildCommand& c : WorkerCommands(*plan, router))
      out << c.name << ": " << absl::StrJoin(c.argv, " ") << "\n";
    return 0;
  }
  std::vector<std::string> binaries = {"kvrelay-router", "kvrelay-decode"};
  if (plan->prefill > 0) binaries.push_back("kvrelay-prefill");
  for (const std::string& b : binaries) {
    const std::string path = JoinPath(plan->bin_dir, b);
    if (::access(path.c_str(), X_OK) != 0) {
      return Fail(err, path + " is missing (build it: cmake --build build --target " + b + ")");
    }
  }
  absl::StatusOr<std::unique_ptr<Supervisor>> sup = Supervisor::Create(err);
  if (!sup.ok()) return Fail(err, std::string(sup.status().message()));
  LocalRun run(*plan, std::move(*sup), out, err);
  return run.Run();
}

}  // namespace kvrelay::cli

// `kvrelay local` as a real process tree (kvrelay-router + kvrelay-prefill +
// kvrelay-decode as its children) served through `kvrelay generate --server`, checked
// against the single-process `kvrelay generate`; and its children's lifetimes: a
// SIGTERM stops and reaps them all, a SIGKILL of `kvrelay local` makes them exit on
// their own (PR_SET_PDEATHSIG), a child that dies stops everything.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
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
using testing::RandomPrompt;
using testing::SiblingBinary;
using testing::Subprocess;

// Workers drain for up to 30 s, then the router: generous on a loaded machine.
constexpr absl::Duration kStopBound = absl::Seconds(120);

std::string ModelDir() { return testing::ModelDir(testing::TinyVariants()[0]); }

// Live processes whose parent is `parent` (field 4 of /proc/<pid>/stat).
std::vector<pid_t> ChildrenOf(pid_t parent) {
  std::vector<pid_t> out;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
    pid_t pid = 0;
    if (!absl::SimpleAtoi(entry.path().filename().string(), &pid)) continue;
    absl::StatusOr<std::string> stat = ReadFile(entry.path().string() + "/stat");
    if (!stat.ok()) continue;
    const size_t paren = stat->rfind(')');  // the command name may hold spaces
    if (paren == std::string::npos) continue;
    std::vector<std::string> f = absl::StrSplit(stat->substr(paren + 2), ' ');
    pid_t ppid = 0;
    if (f.size() > 1 && absl::SimpleAtoi(f[1], &ppid) && ppid == parent) out.push_back(pid);
  }
  return out;
}

std::string Comm(pid_t pid) {
  std::string c = ReadFile("/proc/" + std::to_string(pid) + "/comm").value_or("");
  if (!c.empty() && c.back() == '\n') c.pop_back();
  return c;
}

// Waits until `pid` no longer exists: reaped by its parent, or (this test is a child
// subreaper) reparented to us and reaped here. Its wait status when we reaped it.
struct Gone {
  bool gone = false;
  std::optional<int> status;
};
Gone WaitGone(pid_t pid, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  Gone g;
  for (;;) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      g.gone = true;
      g.status = status;
      return g;
    }
    if (::kill(pid, 0) != 0 && errno == ESRCH) {
      g.gone = true;
      return g;
    }
    if (absl::Now() > deadline) return g;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polling an exit, not a sync
  }
}

// `kvrelay local` with its stderr in a file, once it printed READY.
struct Local {
  std::optional<Subprocess> process;
  int port = 0;
  std::string stderr_path;
  std::map<std::string, pid_t> children;  // by command name (comm)
  std::vector<std::string> banner;        // its "kvrelay local: ..." lines before READY
  std::string Stderr() const { return ReadFile(stderr_path).value_or(""); }
};

class LocalProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Orphans are reparented to this process, so a child left behind is seen (and reaped).
    ASSERT_EQ(::prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
  }

  // `kvrelay local ...` until its READY line, with the pids of its children.
  Local StartLocal(const std::vector<std::string>& extra = {}) {
    Local l;
    l.stderr_path = tmp_.path() + "/local" + std::to_string(started_++) + ".stderr";
    // The shell only sends stderr to a file and execs: the pid is kvrelay local's.
    std::vector<std::string> argv = {"/bin/sh", "-c", "f=$1; shift; exec \"$@\" 2>\"$f\"", "sh",
                                     l.stderr_path, SiblingBinary("kvrelay"), "local", "--model",
                                     ModelDir(), "--port", "0", "--threads", "1",
                                     "--worker-flag=--kv_blocks=256",
                                     // Every prompt through the prefill worker (KV over UCX).
                                     "--router-flag=--local_prefill_max_tokens=0"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto p = Subprocess::Start(argv);
    EXPECT_TRUE(p) << "cannot start kvrelay local";
    if (!p) return l;
    std::optional<std::string> first = p->ReadLine(kProcessTimeout);
    EXPECT_TRUE(first && first->rfind("kvrelay local: serving ", 0) == 0)
        << (first ? *first : "no output") << "\n"
        << l.Stderr();
    std::optional<std::string> ready = p->ReadLine(kProcessTimeout);
    while (ready && ready->rfind("kvrelay local: ", 0) == 0) {
      l.banner.push_back(*ready);
      ready = p->ReadLine(kProcessTimeout);
    }
    const bool ok =
        ready && ready->rfind("READY ", 0) == 0 && absl::SimpleAtoi(ready->substr(6), &l.port);
    EXPECT_TRUE(ok) << (ready ? *ready : "no READY line") << "\n" << l.Stderr();
    for (pid_t c : ChildrenOf(p->pid())) l.children[Comm(c)] = c;
    l.process.emplace(std::move(*p));
    if (!ok) l.process.reset();  // kills it
    return l;
  }

  // `kvrelay generate --server` (or the single-process one with `server` empty): one
  // JSON object per turn.
  std::vector<json> Generate(const std::string& server, const std::vector<std::string>& args) {
    std::vector<std::string> argv = {SiblingBinary("kvrelay"), "generate"};
    if (server.empty()) {
      argv.insert(argv.end(), {"--model", ModelDir()});
    } else {
      argv.insert(argv.end(), {"--server", server, "--deadline-seconds", "120"});
    }
    argv.insert(argv.end(), args.begin(), args.end());
    argv.push_back("--json");
    std::vector<json> out;
    auto p = Subprocess::Start(argv);
    EXPECT_TRUE(p);
    if (!p) return out;
    while (std::optional<std::string> line = p->ReadLine(kProcessTimeout)) {
      out.push_back(json::parse(*line));
    }
    const std::optional<int> status = p->Wait(kProcessTimeout);
    EXPECT_TRUE(status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0)
        << "kvrelay generate failed: " << absl::StrJoin(argv, " ");
    return out;
  }

  testing::ScopedTempDir tmp_{"kvr_local_"};
  int started_ = 0;
};

const std::set<std::string> kChildNames = {"kvrelay-router", "kvrelay-prefill", "kvrelay-decode"};

std::set<std::string> Names(const Local& l) {
  std::set<std::string> names;
  for (const auto& [name, pid] : l.children) names.insert(name);
  return names;
}

TEST_F(LocalProcessTest, ServesLikeTheSingleProcessModeAndStopsCleanly) {
  Local l = StartLocal();
  ASSERT_TRUE(l.process);
  EXPECT_EQ(Names(l), kChildNames) << l.Stderr();
  const std::string server = "127.0.0.1:" + std::to_string(l.port);
  // Short and several blocks long, as token ids.
  for (int n : {5, 40}) {
    const std::vector<int32_t> prompt = RandomPrompt(n, 700 + n);
    const std::vector<json> got = Generate(
        server, {"--prompt-ids", absl::StrJoin(prompt, ","), "--max-tokens", "8", "--ignore-eos"});
    ASSERT_EQ(got.size(), 1u) << l.Stderr();
    EXPECT_EQ(got[0]["prompt_token_ids"].get<std::vector<int32_t>>(), prompt);
    EXPECT_EQ(got[0]["token_ids"].get<std::vector<int32_t>>(),
              testing::CliGenerate(ModelDir(), prompt, 8))
        << n << " tokens";
    EXPECT_EQ(got[0]["finish_reason"], "length");
    EXPECT_EQ(got[0]["decode_worker"], "decode-0");
    EXPECT_EQ(got[0]["prefill_worker"], "prefill-0");
    EXPECT_EQ(got[0]["prefill_mode"], "remote");
    EXPECT_GT(got[0]["transfer_bytes"].get<uint64_t>(), 0u);
  }
  // Text turns: tokenized by the server, the history carried over: the same turns.
  const std::vector<std::string> turns = {
      "--prompt", "Hello there", "--prompt", " and again", "--max-tokens", "6", "--ignore-eos"};
  const std::vector<json> remote = Generate(server, turns), local = Generate("", turns);
  ASSERT_EQ(remote.size(), 2u);
  ASSERT_EQ(local.size(), 2u);
  for (size_t t = 0; t < 2; ++t) {
    for (const char* key : {"turn", "prompt_token_ids", "token_ids", "text", "finish_reason"}) {
      EXPECT_EQ(remote[t][key], local[t][key]) << "turn " << t + 1 << " " << key;
    }
  }

  const std::vector<pid_t> children = [&] {
    std::vector<pid_t> v;
    for (const auto& [name, pid] : l.children) v.push_back(pid);
    return v;
  }();
  l.process->Kill(SIGTERM);
  const std::optional<int> status = l.process->Wait(kStopBound);
  ASSERT_TRUE(status) << "kvrelay local did not stop\n" << l.Stderr();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << *status << "\n" << l.Stderr();
  for (pid_t c : children) {
    // Reaped by kvrelay local: not even a zombie, not reparented to this process.
    errno = 0;
    EXPECT_NE(::kill(c, 0), 0) << "child " << c << " still exists";
    EXPECT_EQ(errno, ESRCH);
  }
  EXPECT_THAT(l.Stderr(), HasSubstr("kvrelay local: stopped"));
}

TEST_F(LocalProcessTest, TlsServesTlsClientsOnlyAndRemovesItsCertificates) {
  Local l = StartLocal({"--tls"});
  ASSERT_TRUE(l.process);
  ASSERT_EQ(Names(l), kChildNames) << l.Stderr();
  // "kvrelay local: TLS on (...); clients: --tls-ca DIR/ca.crt"
  std::string ca;
  for (const std::string& line : l.banner) {
    const size_t at = line.find("--tls-ca ");
    if (at != std::string::npos) ca = line.substr(at + 9);
  }
  ASSERT_FALSE(ca.empty()) << absl::StrJoin(l.banner, "\n");
  ASSERT_TRUE(FileExists(ca));
  const std::string server = "127.0.0.1:" + std::to_string(l.port);
  const std::vector<int32_t> prompt = RandomPrompt(40, 740);
  const std::vector<json> got =
      Generate(server, {"--prompt-ids", absl::StrJoin(prompt, ","), "--max-tokens", "8",
                        "--ignore-eos", "--tls-ca", ca});
  ASSERT_EQ(got.size(), 1u) << l.Stderr();
  EXPECT_EQ(got[0]["token_ids"].get<std::vector<int32_t>>(),
            testing::CliGenerate(ModelDir(), prompt, 8));
  // Remote prefill: the workers' mutual TLS and token checks let each other in.
  EXPECT_EQ(got[0]["prefill_mode"], "remote");
  // A plaintext client is refused.
  auto plain =
      Subprocess::Start({SiblingBinary("kvrelay"), "generate", "--server", server, "--prompt", "hi",
                         "--max-tokens", "2", "--deadline-seconds", "30"});
  ASSERT_TRUE(plain);
  const std::optional<int> plain_status = plain->Wait(kProcessTimeout);
  EXPECT_TRUE(plain_status && WIFEXITED(*plain_status) && WEXITSTATUS(*plain_status) == 1);
  l.process->Kill(SIGTERM);
  const std::optional<int> status = l.process->Wait(kStopBound);
  ASSERT_TRUE(status) << l.Stderr();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << l.Stderr();
  EXPECT_FALSE(FileExists(ca));  // the throw-away CA went with it
  EXPECT_FALSE(IsDirectory(ca.substr(0, ca.rfind('/'))));
}

TEST_F(LocalProcessTest, ChildrenExitWhenKvrelayLocalIsKilled) {
  Local l = StartLocal();
  ASSERT_TRUE(l.process);
  ASSERT_EQ(Names(l), kChildNames) << l.Stderr();
  l.process->Kill(SIGKILL);
  const std::optional<int> status = l.process->Wait(kProcessTimeout);
  ASSERT_TRUE(status && WIFSIGNALED(*status));
  // Each child got SIGTERM (PR_SET_PDEATHSIG) and exits on its own, gracefully.
  for (const auto& [name, pid] : l.children) {
    const Gone g = WaitGone(pid, kStopBound);
    EXPECT_TRUE(g.gone) << name << " (pid " << pid << ") outlived kvrelay local";
    if (g.status) {
      EXPECT_TRUE(WIFEXITED(*g.status) && WEXITSTATUS(*g.status) == 0)
          << name << " wait status " << *g.status;
    }
  }
}

TEST_F(LocalProcessTest, AChildThatDiesStopsEverything) {
  Local l = StartLocal();
  ASSERT_TRUE(l.process);
  ASSERT_EQ(Names(l), kChildNames) << l.Stderr();
  const pid_t decode = l.children.at("kvrelay-decode");
  ASSERT_EQ(::kill(decode, SIGKILL), 0);
  const std::optional<int> status = l.process->Wait(kStopBound);
  ASSERT_TRUE(status) << l.Stderr();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << *status << "\n" << l.Stderr();
  EXPECT_THAT(l.Stderr(),
              HasSubstr("decode-0 (pid " + std::to_string(decode) + ") killed by signal 9"));
  for (const auto& [name, pid] : l.children) {
    errno = 0;
    EXPECT_NE(::kill(pid, 0), 0) << name << " still exists";
    EXPECT_EQ(errno, ESRCH);
  }
}

}  // namespace
}  // namespace kvrelay

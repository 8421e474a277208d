// The real `kvrelay` binary as a child process: exit codes, stdout/stderr, and the
// make-model -> generate round trip through main().
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "common/util/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/temp_dir.h"

extern char** environ;

namespace kvrelay {
namespace {

using ::testing::HasSubstr;

struct Result {
  int exit_code = -1;
  std::string out, err;
};

// The kvrelay binary sits next to this test binary (both in build/bin).
std::string Binary() {
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  std::string dir = n > 0 ? std::string(self, n) : std::string("./x");
  return dir.substr(0, dir.rfind('/')) + "/kvrelay";
}

// Runs `kvrelay args...` with stdout/stderr captured in files; waits for it to exit.
Result RunKvrelay(const std::vector<std::string>& args, const std::string& tmp) {
  std::vector<std::string> argv_s = {Binary()};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string out_path = tmp + "/stdout", err_path = tmp + "/stderr";
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid;
  Result r;
  const int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) {
    ADD_FAILURE() << "cannot start " << argv[0];
    return r;
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
  }
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = ReadFile(out_path).value_or("");
  r.err = ReadFile(err_path).value_or("");
  return r;
}

TEST(CliProcessTest, MakeModelThenGenerateJson) {
  testing::ScopedTempDir tmp("kvr_cli_proc_");
  const std::string model = tmp.path() + "/m";
  Result made = RunKvrelay({"make-model", "--family", "gpt2", "--seed", "5", "--out", model,
                            "--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "320"},
                           tmp.path());
  ASSERT_EQ(made.exit_code, 0) << made.err;
  Result gen = RunKvrelay({"generate", "--model", model, "--prompt", "Hi there", "--prompt",
                           " again", "--max-tokens", "3", "--ignore-eos", "--json"},
                          tmp.path());
  ASSERT_EQ(gen.exit_code, 0) << gen.err;
  std::istringstream lines(gen.out);
  int turns = 0;
  for (std::string line; std::getline(lines, line); ++turns) {
    nlohmann::json j = nlohmann::json::parse(line);
    EXPECT_EQ(j["token_ids"].size(), 3u);
  }
  EXPECT_EQ(turns, 2);
}

TEST(CliProcessTest, ErrorsExitNonZeroWithOneLineOnStderr) {
  testing::ScopedTempDir tmp("kvr_cli_proc_");
  for (const auto& [args, code, want] :
       std::vector<std::tuple<std::vector<std::string>, int, std::string>>{
           {{"generate", "--model", "/no/such/model", "--prompt", "x"}, 1, "/no/such/model"},
           {{"generate", "--nope"}, 2, "unknown flag --nope"},
           {{"make-model"}, 2, "--out DIR is required"},
           {{"frobnicate"}, 2, "unknown command"},
       }) {
    Result r = RunKvrelay(args, tmp.path());
    EXPECT_EQ(r.exit_code, code) << want;
    EXPECT_THAT(r.err, HasSubstr(want));
    EXPECT_TRUE(r.out.empty()) << r.out;
  }
  Result r = RunKvrelay({"generate", "--model", "/no/such/model", "--prompt", "x"}, tmp.path());
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

}  // namespace
}  // namespace kvrelay

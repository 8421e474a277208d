// `kvrelay local` without processes: flag validation, and the commands it would run
// (--dry-run). The processes themselves: tests/integration/local_process_test.cc.
#include <sched.h>

#include <algorithm>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/temp_dir.h"
#include "tools/cli/cli.h"

namespace kvrelay::cli {
namespace {

using ::testing::HasSubstr;

int RunCmd(std::vector<std::string> argv, std::string* out, std::string* err) {
  argv.insert(argv.begin(), {"kvrelay", "local"});
  std::vector<char*> p;
  for (auto& s : argv) p.push_back(s.data());
  std::ostringstream o, e;
  int rc = RunCli(static_cast<int>(p.size()), p.data(), o, e);
  *out = o.str();
  *err = e.str();
  return rc;
}

std::vector<std::string> Lines(const std::string& s) {
  std::vector<std::string> v;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) v.push_back(line);
  return v;
}

const std::string& ModelDir() {
  static const std::string* dir = new std::string(testing::MakeTempDir("kvr_local_model_"));
  return *dir;
}

TEST(LocalCmdTest, BadFlagsAreUsageErrors) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--prefill", "-1"}, "--prefill must be in [0, 64], got -1"},
      {{"--decode", "0"}, "--decode must be in [1, 64], got 0"},
      {{"--prefill", "x"}, "--prefill takes an integer, got 'x'"},
      {{"--port", "65536"}, "--port must be in [0, 65535]"},
      {{"--threads", "-2"}, "--threads must be in [0, 1024]"},
      {{"--frobnicate"}, "unknown flag --frobnicate"},
      {{"--model"}, "--model needs a value"},
      {{"positional"}, "unexpected argument 'positional'"},
      {{"--grace-seconds", "0"}, "--grace-seconds must be in (0, 86400]"},
      {{"--ready-timeout-seconds", "-1"}, "--ready-timeout-seconds must be in (0, 86400]"},
      {{"--router-flag", "verbose"}, "--router-flag takes one flag of the child"},
      {{"--worker-flag=--"}, "--worker-flag takes one flag of the child"},
      {{"--model-id="}, "--model-id must not be empty"},
      {{"--port", "1", "--port", "2"}, "--port given more than once"},
  };
  for (const Case& c : cases) {
    std::string out, err;
    EXPECT_EQ(RunCmd(c.args, &out, &err), 2) << c.args[0];
    EXPECT_THAT(err, HasSubstr("kvrelay local: " + c.message)) << c.args[0];
    EXPECT_EQ(out, "");
  }
}

TEST(LocalCmdTest, MissingModelFolderOrBinaries) {
  std::string out, err;
  EXPECT_EQ(RunCmd({"--model", "/nonexistent/model"}, &out, &err), 1);
  EXPECT_THAT(err, HasSubstr("--model /nonexistent/model: no such folder"));
  EXPECT_EQ(RunCmd({"--model", ModelDir(), "--bin-dir", "/nonexistent/bin"}, &out, &err), 1);
  EXPECT_THAT(err, HasSubstr("/nonexistent/bin/kvrelay-router is missing"));
  EXPECT_EQ(out, "");
}

TEST(LocalCmdTest, HelpListsTheFlags) {
  std::string out, err;
  ASSERT_EQ(RunCmd({"--help"}, &out, &err), 0);
  for (const char* f : {"--model", "--prefill", "--decode", "--port", "--threads", "--worker-flag",
                        "--grace-seconds"}) {
    EXPECT_THAT(out, HasSubstr(f));
  }
  std::vector<std::string> argv = {"kvrelay", "help"};
  std::vector<char*> p = {argv[0].data(), argv[1].data()};
  std::ostringstream o, e;
  ASSERT_EQ(RunCli(2, p.data(), o, e), 0);
  EXPECT_THAT(o.str(), HasSubstr("local "));
}

TEST(LocalCmdTest, DryRunShowsTheCommands) {
  std::string out, err;
  ASSERT_EQ(RunCmd({"--model", ModelDir(), "--prefill", "2", "--port", "0", "--threads", "3",
                    "--model-id", "m1", "--bin-dir", "/opt/kv", "--worker-flag=--kv_blocks=64",
                    "--decode-flag", "--max_running=4", "--prefill-flag=--prefill_chunk=32",
                    "--router-flag=--busy=1", "--dry-run"},
                   &out, &err),
            0)
      << err;
  const std::string m = ModelDir();
  EXPECT_THAT(
      Lines(out),
      ::testing::ElementsAre(
          "router: /opt/kv/kvrelay-router --model " + m +
              " --listen 127.0.0.1:0 --model_id m1 --busy=1",
          "prefill-0: /opt/kv/kvrelay-prefill --model " + m +
              " --listen 127.0.0.1:0 --router 127.0.0.1:<router port> --worker_id prefill-0 "
              "--threads 3 --model_id m1 --kv_blocks=64 --prefill_chunk=32",
          "prefill-1: /opt/kv/kvrelay-prefill --model " + m +
              " --listen 127.0.0.1:0 --router 127.0.0.1:<router port> --worker_id prefill-1 "
              "--threads 3 --model_id m1 --kv_blocks=64 --prefill_chunk=32",
          "decode-0: /opt/kv/kvrelay-decode --model " + m +
              " --listen 127.0.0.1:0 --router 127.0.0.1:<router port> --worker_id decode-0 "
              "--threads 3 --model_id m1 --kv_blocks=64 --max_running=4"));
}

TEST(LocalCmdTest, HttpPortServesTheOpenAIApiOnTheRouter) {
  std::string out, err;
  ASSERT_EQ(RunCmd({"--model", ModelDir(), "--prefill", "0", "--port", "0", "--http-port", "8000",
                    "--bin-dir", "/b", "--dry-run"},
                   &out, &err),
            0)
      << err;
  EXPECT_THAT(Lines(out)[0], ::testing::HasSubstr(" --http_listen=127.0.0.1:8000"));
  EXPECT_NE(RunCmd({"--model", ModelDir(), "--http-port", "0", "--dry-run"}, &out, &err), 0);
}

TEST(LocalCmdTest, TlsGivesEveryProcessTheCertificatesAndToken) {
  std::string out, err;
  ASSERT_EQ(RunCmd({"--model", ModelDir(), "--prefill", "1", "--port", "0", "--bin-dir", "/b",
                    "--tls", "--tls-dir", "/etc/t", "--dry-run"},
                   &out, &err),
            0)
      << err;
  const std::vector<std::string> lines = Lines(out);
  ASSERT_EQ(lines.size(), 3u) << out;
  for (const std::string& line : lines) {
    EXPECT_THAT(line, HasSubstr(" --tls_cert=/etc/t/node.crt --tls_key=/etc/t/node.key "
                                "--tls_ca=/etc/t/ca.crt --tls_require_client_cert "
                                "--cluster_token_file=/etc/t/cluster-token"));
  }
  // Without --tls-dir the folder is made at run time.
  ASSERT_EQ(RunCmd({"--model", ModelDir(), "--bin-dir", "/b", "--tls", "--dry-run"}, &out, &err),
            0);
  EXPECT_THAT(out, HasSubstr("--tls_cert=<tls-dir>/node.crt"));
  EXPECT_EQ(RunCmd({"--model", ModelDir(), "--tls-dir", "/t", "--dry-run"}, &out, &err), 2);
  EXPECT_THAT(err, HasSubstr("--tls-dir needs --tls"));
}

TEST(LocalCmdTest, DefaultsSplitTheCoresAmongTheWorkers) {
  cpu_set_t set;
  CPU_ZERO(&set);
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  const int cores = CPU_COUNT(&set);
  std::string out, err;
  ASSERT_EQ(RunCmd({"--model", ModelDir(), "--bin-dir", "/b", "--dry-run"}, &out, &err), 0) << err;
  const std::string threads = std::to_string(std::max(1, cores / 2));
  EXPECT_THAT(
      Lines(out),
      ::testing::ElementsAre(
          "router: /b/kvrelay-router --model " + ModelDir() + " --listen 127.0.0.1:50051",
          "prefill-0: /b/kvrelay-prefill --model " + ModelDir() +
              " --listen 127.0.0.1:0 --router 127.0.0.1:50051 --worker_id prefill-0 --threads " +
              threads,
          "decode-0: /b/kvrelay-decode --model " + ModelDir() +
              " --listen 127.0.0.1:0 --router 127.0.0.1:50051 --worker_id decode-0 --threads " +
              threads));
  // No prefill workers: the decode workers prefill locally.
  ASSERT_EQ(RunCmd({"--model", ModelDir(), "--bin-dir", "/b", "--prefill", "0", "--decode", "3",
                    "--threads", "1", "--dry-run"},
                   &out, &err),
            0);
  const std::vector<std::string> lines = Lines(out);
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_EQ(lines[1].rfind("decode-0: ", 0), 0u);
  EXPECT_EQ(lines[3].rfind("decode-2: ", 0), 0u);
}

}  // namespace
}  // namespace kvrelay::cli

#include "tools/cli/cli.h"

#include <cstdlib>
#include <sstream>

#include "common/util/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace kvrelay::cli {
namespace {

using ::testing::HasSubstr;

int RunCmd(std::vector<std::string> argv, std::string* out, std::string* err) {
  argv.insert(argv.begin(), "kvrelay");
  std::vector<char*> p;
  for (auto& s : argv) p.push_back(s.data());
  std::ostringstream o, e;
  int rc = RunCli(static_cast<int>(p.size()), p.data(), o, e);
  *out = o.str();
  *err = e.str();
  return rc;
}

TEST(CliTest, UsageAndUnknownCommand) {
  std::string out, err;
  EXPECT_EQ(RunCmd({}, &out, &err), 2);
  EXPECT_THAT(err, HasSubstr("usage"));
  EXPECT_EQ(RunCmd({"help"}, &out, &err), 0);
  EXPECT_THAT(out, HasSubstr("make-model"));
  EXPECT_EQ(RunCmd({"frobnicate"}, &out, &err), 2);
  EXPECT_THAT(err, HasSubstr("unknown command 'frobnicate'"));
}

TEST(CliTest, DemoModelIsWrittenOnceAndReused) {
  const std::string home = testing::MakeTempDir("kvr_home_");
  ::setenv("KVRELAY_HOME", home.c_str(), 1);
  std::ostringstream err;
  auto dir = EnsureDemoModel(err);
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_EQ(*dir, home + "/demo-model");
  EXPECT_THAT(err.str(), HasSubstr("random weights"));
  const std::string first = *ReadFile(*dir + "/model.safetensors");
  std::ostringstream err2;
  ASSERT_TRUE(EnsureDemoModel(err2).ok());
  EXPECT_EQ(err2.str(), "");  // reused, not rewritten
  EXPECT_EQ(*ReadFile(*dir + "/model.safetensors"), first);
  ::unsetenv("KVRELAY_HOME");
}

}  // namespace
}  // namespace kvrelay::cli

#include <sstream>

#include "common/model/config.h"
#include "common/util/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"
#include "tools/cli/cli.h"

namespace kvrelay::cli {
namespace {

using ::testing::HasSubstr;

int RunCmd(std::vector<std::string> argv, std::string* out, std::string* err) {
  argv.insert(argv.begin(), {"kvrelay", "make-model"});
  std::vector<char*> p;
  for (auto& s : argv) p.push_back(s.data());
  std::ostringstream o, e;
  int rc = RunMakeModel(static_cast<int>(p.size()), p.data(), o, e);
  *out = o.str();
  *err = e.str();
  return rc;
}

TEST(MakeModelCmdTest, WritesBothFamiliesDeterministically) {
  const std::string base = testing::MakeTempDir("kvr_mmc_");
  std::string out, err;
  for (const char* fam : {"llama", "gpt2"}) {
    for (const char* sub : {"/a", "/b"}) {
      ASSERT_EQ(RunCmd({"--family", fam, "--seed", "3", "--out", base + "/" + fam + sub, "--layers",
                        "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--vocab", "320",
                        "--dtype", "bf16"},
                       &out, &err),
                0)
          << err;
    }
    auto cfg = model::LoadModelConfig(base + "/" + fam + "/a");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    EXPECT_EQ(cfg->hidden_size, 32);
    EXPECT_EQ(cfg->num_layers, 1);
    EXPECT_EQ(cfg->torch_dtype, "bfloat16");
    EXPECT_EQ(*ReadFile(base + "/" + fam + "/a/model.safetensors"),
              *ReadFile(base + "/" + fam + "/b/model.safetensors"));
  }
}

TEST(MakeModelCmdTest, ErrorsAreOneClearLine) {
  std::string out, err;
  EXPECT_EQ(RunCmd({"--family", "llama"}, &out, &err), 2);
  EXPECT_EQ(err, "kvrelay make-model: --out DIR is required\n");
  EXPECT_EQ(RunCmd({"--family", "bert", "--out", "/tmp/x"}, &out, &err), 2);
  EXPECT_THAT(err, HasSubstr("--family must be llama or gpt2"));
  EXPECT_EQ(RunCmd({"--hidden", "sixty", "--out", "/tmp/x"}, &out, &err), 2);
  EXPECT_THAT(err, HasSubstr("--hidden takes an integer"));
  EXPECT_EQ(RunCmd({"--dtype", "int8", "--out", "/tmp/x"}, &out, &err), 2);
  EXPECT_THAT(err, HasSubstr("--dtype"));
  EXPECT_EQ(RunCmd({"--heads", "5", "--out", testing::MakeTempDir("kvr_mmc_") + "/m"}, &out, &err),
            1);
  EXPECT_THAT(err, HasSubstr("--heads"));
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1);
}

}  // namespace
}  // namespace kvrelay::cli

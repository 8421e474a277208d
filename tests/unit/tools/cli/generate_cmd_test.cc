#include <sstream>

#include "common/util/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/test_models.h"
#include "tools/cli/cli.h"

namespace kvrelay::cli {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

int RunCmd(std::vector<std::string> argv, std::string* out, std::string* err) {
  argv.insert(argv.begin(), {"kvrelay", "generate"});
  std::vector<char*> p;
  for (auto& s : argv) p.push_back(s.data());
  std::ostringstream o, e;
  int rc = RunGenerate(static_cast<int>(p.size()), p.data(), o, e);
  *out = o.str();
  *err = e.str();
  return rc;
}

std::vector<json> Lines(const std::string& out) {
  std::vector<json> v;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) v.push_back(json::parse(line));
  return v;
}

std::string Dir(int variant) { return testing::ModelDir(testing::TinyVariants()[variant]); }

TEST(GenerateCmdTest, JsonTurnsCarryTheConversation) {
  for (int variant : {0, 4}) {  // llama and gpt2
    std::string out, err;
    ASSERT_EQ(RunCmd({"--model", Dir(variant), "--prompt", "Hello there", "--prompt",
                      " And again, ümlaut 🙂", "--max-tokens", "6", "--ignore-eos", "--logprobs",
                      "2", "--json", "--block-size", "4", "--cache-salt", "tenant-1"},
                     &out, &err),
              0)
        << err;
    std::vector<json> turns = Lines(out);
    ASSERT_EQ(turns.size(), 2u);
    for (const json& t : turns) {
      for (const char* k : {"prompt_token_ids", "token_ids", "text", "logprobs", "cached_tokens",
                            "prefill_ms", "decode_ms_per_token"}) {
        EXPECT_TRUE(t.contains(k)) << k;
      }
      EXPECT_EQ(t["token_ids"].size(), 6u);
      ASSERT_EQ(t["logprobs"].size(), 6u);
      EXPECT_EQ(t["logprobs"][0]["top"].size(), 2u);
    }
    // Turn 2's prompt = turn 1's prompt + output + the new text.
    std::vector<int> p1 = turns[0]["prompt_token_ids"], o1 = turns[0]["token_ids"],
                     p2 = turns[1]["prompt_token_ids"];
    std::vector<int> prefix = p1;
    prefix.insert(prefix.end(), o1.begin(), o1.end());
    ASSERT_GT(p2.size(), prefix.size());
    EXPECT_TRUE(std::equal(prefix.begin(), prefix.end(), p2.begin()));
    // Turn 2 reuses every full 4-token block of turn 1's prompt and output whose KV
    // was computed (all but the last output token).
    EXPECT_EQ(turns[0]["cached_tokens"], 0);
    EXPECT_EQ(turns[1]["cached_tokens"], (prefix.size() - 1) / 4 * 4);
    EXPECT_GT(turns[1]["cached_tokens"].get<int>(), 0);
  }
}

TEST(GenerateCmdTest, PromptIdsGiveTheSameTurnsAsText) {
  std::string out, err;
  ASSERT_EQ(RunCmd({"--model", Dir(0), "--prompt", "Hello there", "--max-tokens", "5", "--json"},
                   &out, &err),
            0)
      << err;
  const json text = Lines(out).at(0);
  std::string ids;
  for (int id : text["prompt_token_ids"]) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  ASSERT_EQ(
      RunCmd({"--model", Dir(0), "--prompt-ids", ids, "--max-tokens", "5", "--json"}, &out, &err),
      0)
      << err;
  const json by_ids = Lines(out).at(0);
  EXPECT_EQ(by_ids["prompt_token_ids"], text["prompt_token_ids"]);
  EXPECT_EQ(by_ids["token_ids"], text["token_ids"]);
}

TEST(GenerateCmdTest, GreedyIsTheSameWithEveryKernelAndChunkSetting) {
  std::string ref, out, err;
  ASSERT_EQ(
      RunCmd({"--model", Dir(0), "--prompt", "The quick brown fox", "--max-tokens", "8", "--json"},
             &ref, &err),
      0)
      << err;
  const json r = Lines(ref)[0];
  for (std::vector<std::string> extra :
       std::vector<std::vector<std::string>>{{"--prefill-chunk", "1"},
                                             {"--block-size", "1"},
                                             {"--threads", "1"},
                                             {"--kv-blocks", "40"}}) {
    std::vector<std::string> args = {"--model",      Dir(0), "--prompt", "The quick brown fox",
                                     "--max-tokens", "8",    "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    ASSERT_EQ(RunCmd(args, &out, &err), 0) << err;
    EXPECT_EQ(Lines(out)[0]["token_ids"], r["token_ids"]) << extra[0];
  }
}

TEST(GenerateCmdTest, PlainTextStreamsThePromptAndOutput) {
  std::string out, err;
  ASSERT_EQ(RunCmd({"--model", Dir(0), "--prompt", "Once upon", "--max-tokens", "4", "--kv-dtype",
                    "int8"},
                   &out, &err),
            0)
      << err;
  EXPECT_EQ(out.rfind("Once upon", 0), 0u);
  EXPECT_EQ(out.back(), '\n');
}

TEST(GenerateCmdTest, ErrorsAreOneClearLine) {
  std::string out, err;
  struct Case {
    std::vector<std::string> args;
    int code;
    std::string want;
  };
  const std::string m = Dir(0);
  for (const Case& c : std::vector<Case>{
           {{"--model", m}, 2, "either as --prompt TEXT or as --prompt-ids IDS"},
           {{"--model", m, "--prompt", "x", "--prompt-ids", "1"}, 2, "either as --prompt TEXT"},
           {{"--model", m, "--prompt-ids", "1,two"}, 2, "'two' is not a token id"},
           {{"--model", m, "--prompt-ids", "1,999999"}, 1, "outside [0, "},
           {{"--model", "/nonexistent/model", "--prompt", "x"},
            1,
            "/nonexistent/model: no such folder"},
           {{"--model", m, "--prompt", "x", "--temperature", "-1"}, 2, "temperature"},
           {{"--model", m, "--prompt", "x", "--kv-dtype", "f8"}, 2, "--kv-dtype"},
           {{"--model", m, "--prompt", "x", "--bogus"}, 2, "unknown flag --bogus"},
           {{"--model", m, "--prompt", "x", "--max-tokens", "lots"},
            2,
            "--max-tokens takes an integer"},
           {{"--model", m, "--prompt", "x", "--kv-blocks", "0"}, 2, "--kv-blocks must be in [1, "},
           {{"--model", m, "--prompt", "x", "--stop-token-id", "99999999999"},
            2,
            "--stop-token-id"},
           {{"--model", m, "--prompt", "x", "--max-tokens", "99999999999"}, 2, "--max-tokens"},
           {{"--model", m, "--prompt", "x", "--logprobs", "21"}, 2, "--logprobs"},
       }) {
    EXPECT_EQ(RunCmd(c.args, &out, &err), c.code) << c.want;
    EXPECT_THAT(err, HasSubstr(c.want));
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  }
}

TEST(GenerateCmdTest, CorruptModelFilesNameTheFile) {
  const std::string src = Dir(0);
  const std::string dir = testing::MakeTempDir("kvr_corrupt_");
  for (const char* f :
       {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"}) {
    ASSERT_TRUE(WriteFile(dir + "/" + f, *ReadFile(src + "/" + f)).ok());
  }
  std::string weights = *ReadFile(src + "/model.safetensors");
  ASSERT_TRUE(WriteFile(dir + "/model.safetensors", weights.substr(0, weights.size() / 2)).ok());
  std::string out, err;
  EXPECT_EQ(RunCmd({"--model", dir, "--prompt", "x"}, &out, &err), 1);
  EXPECT_THAT(err, HasSubstr(dir + "/model.safetensors"));
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1);
  ASSERT_TRUE(WriteFile(dir + "/config.json", "{ not json").ok());
  EXPECT_EQ(RunCmd({"--model", dir, "--prompt", "x"}, &out, &err), 1);
  EXPECT_THAT(err, HasSubstr(dir + "/config.json"));
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1);
}

}  // namespace
}  // namespace kvrelay::cli

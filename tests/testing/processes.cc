#include "tests/testing/processes.h"

#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kvrelay::testing {

std::vector<int32_t> RandomPrompt(int n, uint32_t seed, int vocab) {
  std::mt19937 rng(seed);
  std::vector<int32_t> p(n);
  for (auto& t : p) t = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
  return p;
}

std::vector<int32_t> CliGenerate(const std::string& model_dir, const std::vector<int32_t>& prompt,
                                 int max_tokens, const std::vector<std::string>& extra) {
  std::vector<std::string> argv = {SiblingBinary("kvrelay"),
                                   "generate",
                                   "--model",
                                   model_dir,
                                   "--prompt-ids",
                                   absl::StrJoin(prompt, ","),
                                   "--max-tokens",
                                   std::to_string(max_tokens),
                                   "--ignore-eos",
                                   "--json"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  auto p = Subprocess::Start(argv);
  EXPECT_TRUE(p) << "cannot start kvrelay generate";
  if (!p) return {};
  auto line = p->ReadLine(kProcessTimeout);
  EXPECT_TRUE(line) << "kvrelay generate printed nothing";
  if (!line) return {};
  const nlohmann::json j = nlohmann::json::parse(*line);
  EXPECT_EQ(j["prompt_token_ids"].get<std::vector<int32_t>>(), prompt);
  p->Wait(kProcessTimeout);
  return j["token_ids"].get<std::vector<int32_t>>();
}

WorkerProcess StartWorker(const std::string& binary, const std::vector<std::string>& args,
                          const std::vector<std::string>& wrapper, const std::string& host) {
  std::vector<std::string> argv = wrapper;
  argv.push_back(SiblingBinary(binary));
  argv.insert(argv.end(), args.begin(), args.end());
  WorkerProcess w;
  w.host = host;
  auto p = Subprocess::Start(argv);
  EXPECT_TRUE(p) << "cannot start " << binary;
  if (!p) return w;
  auto ready = p->ReadLine(kProcessTimeout);
  if (ready && ready->rfind("METRICS ", 0) == 0) {  // comes first when metrics are served
    EXPECT_TRUE(absl::SimpleAtoi(ready->substr(8), &w.metrics_port)) << *ready;
    ready = p->ReadLine(kProcessTimeout);
  }
  if (ready && ready->rfind("HTTP ", 0) == 0) {  // the router's OpenAI API, before READY
    EXPECT_TRUE(absl::SimpleAtoi(ready->substr(5), &w.http_port)) << *ready;
    ready = p->ReadLine(kProcessTimeout);
  }
  const bool ok =
      ready && ready->rfind("READY ", 0) == 0 && absl::SimpleAtoi(ready->substr(6), &w.port);
  EXPECT_TRUE(ok) << binary << " did not start: " << (ready ? *ready : "no output");
  if (ok) w.process.emplace(std::move(*p));
  return w;
}

}  // namespace kvrelay::testing

#include <sstream>

#include "absl/synchronization/mutex.h"
#include "common/util/file.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
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
                                             {"--device", "cpu"},
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
           {{"--model", m, "--prompt", "x", "--device", "tpu"}, 2, "--device must be"},
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

// --server: a fake kvrelay.v1.Generation that records what it gets. Tokenize maps each
// byte to its value (+ id 1000 first with special tokens); Generate streams tokens 7, 8
// ("ab") then 9 ("c") with the final message.
class FakeGeneration final : public v1::Generation::Service {
 public:
  grpc::Status Tokenize(grpc::ServerContext*, const v1::TokenizeRequest* req,
                        v1::TokenizeResponse* resp) override {
    absl::MutexLock l(&mu_);
    tokenize_.push_back(*req);
    if (!req->has_add_special_tokens() || req->add_special_tokens()) resp->add_token_ids(1000);
    for (unsigned char c : req->prompt()) resp->add_token_ids(c);
    return grpc::Status::OK;
  }
  grpc::Status Generate(grpc::ServerContext*, const v1::GenerateRequest* req,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    {
      absl::MutexLock l(&mu_);
      generate_.push_back(*req);
    }
    if (req->sampling().max_tokens() == 99) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "queue full");
    }
    v1::GenerateResponse m;
    m.set_request_id("req-1");
    m.add_token_ids(7);
    m.add_token_ids(8);
    m.set_text("ab");
    for (int id : {7, 8}) {
      v1::TokenLogprobs* lp = m.add_logprobs();
      lp->set_token_id(id);
      lp->set_logprob(-0.5f);
      v1::TopLogprob* top = lp->add_top();
      top->set_token_id(id);
      top->set_logprob(-0.5f);
    }
    writer->Write(m);
    m.Clear();
    m.add_token_ids(9);
    m.set_text("c");
    m.add_logprobs()->set_token_id(9);
    v1::Final* f = m.mutable_final();
    f->set_finish_reason("length");
    f->mutable_usage()->set_prompt_tokens(req->token_ids().ids_size());
    f->mutable_usage()->set_completion_tokens(3);
    f->mutable_usage()->set_cached_tokens(32);
    f->mutable_timing()->set_ttft_seconds(0.25);
    f->mutable_timing()->set_mean_itl_seconds(0.002);
    f->mutable_route()->set_decode_worker("decode-0");
    f->mutable_route()->set_prefill_worker("prefill-0");
    f->mutable_route()->set_prefill_mode(v1::PREFILL_MODE_REMOTE);
    f->mutable_transfer()->set_bytes(4096);
    writer->Write(m);
    return grpc::Status::OK;
  }
  std::vector<v1::TokenizeRequest> tokenize() {
    absl::MutexLock l(&mu_);
    return tokenize_;
  }
  std::vector<v1::GenerateRequest> generate() {
    absl::MutexLock l(&mu_);
    return generate_;
  }

 private:
  absl::Mutex mu_;
  std::vector<v1::TokenizeRequest> tokenize_ ABSL_GUARDED_BY(mu_);
  std::vector<v1::GenerateRequest> generate_ ABSL_GUARDED_BY(mu_);
};

class ServerModeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(&fake_);
    server_ = b.BuildAndStart();
    ASSERT_TRUE(server_ != nullptr && port_ > 0);
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
  }
  std::string Address() const { return "127.0.0.1:" + std::to_string(port_); }

  FakeGeneration fake_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

std::vector<int> Ids(const google::protobuf::RepeatedField<int32_t>& r) {
  return std::vector<int>(r.begin(), r.end());
}

TEST_F(ServerModeTest, JsonTurnsTokenizeEachTurnAndSendTheHistory) {
  std::string out, err;
  ASSERT_EQ(RunCmd({"--server",
                    Address(),
                    "--prompt",
                    "Hi",
                    "--prompt",
                    " x",
                    "--json",
                    "--max-tokens",
                    "3",
                    "--temperature",
                    "0.5",
                    "--top-k",
                    "4",
                    "--top-p",
                    "0.9",
                    "--seed",
                    "11",
                    "--stop",
                    "END",
                    "--stop",
                    "\n\n",
                    "--stop-token-id",
                    "5",
                    "--ignore-eos",
                    "--cache-salt",
                    "t1",
                    "--model-name",
                    "m1",
                    "--deadline-seconds",
                    "30"},
                   &out, &err),
            0)
      << err;
  const std::vector<v1::TokenizeRequest> tok = fake_.tokenize();
  ASSERT_EQ(tok.size(), 2u);
  EXPECT_EQ(tok[0].prompt(), "Hi");
  EXPECT_TRUE(tok[0].add_special_tokens());  // turn 1 only, like the single-process mode
  EXPECT_FALSE(tok[1].add_special_tokens());
  EXPECT_EQ(tok[1].model(), "m1");
  const std::vector<v1::GenerateRequest> gen = fake_.generate();
  ASSERT_EQ(gen.size(), 2u);
  EXPECT_EQ(Ids(gen[0].token_ids().ids()), (std::vector<int>{1000, 'H', 'i'}));
  EXPECT_EQ(Ids(gen[1].token_ids().ids()), (std::vector<int>{1000, 'H', 'i', 7, 8, 9, ' ', 'x'}));
  const v1::SamplingParams& sp = gen[0].sampling();
  EXPECT_EQ(sp.max_tokens(), 3u);
  EXPECT_FLOAT_EQ(sp.temperature(), 0.5f);
  EXPECT_EQ(sp.top_k(), 4);
  EXPECT_FLOAT_EQ(sp.top_p(), 0.9f);
  EXPECT_EQ(sp.seed(), 11u);
  EXPECT_THAT(sp.stop(), ::testing::ElementsAre("END", "\n\n"));
  EXPECT_THAT(sp.stop_token_ids(), ::testing::ElementsAre(5));
  EXPECT_TRUE(sp.ignore_eos());
  EXPECT_EQ(gen[0].model(), "m1");
  EXPECT_EQ(gen[0].cache_salt(), "t1");

  const std::vector<json> turns = Lines(out);
  ASSERT_EQ(turns.size(), 2u);
  const json& t = turns[1];
  EXPECT_EQ(t["turn"], 2);
  EXPECT_EQ(t["prompt_token_ids"], json(Ids(gen[1].token_ids().ids())));
  EXPECT_EQ(t["token_ids"], json({7, 8, 9}));
  EXPECT_EQ(t["text"], "abc");
  EXPECT_EQ(t["logprobs"], json::array());  // not asked for
  EXPECT_EQ(t["finish_reason"], "length");
  EXPECT_EQ(t["cached_tokens"], 32);
  EXPECT_DOUBLE_EQ(t["prefill_ms"].get<double>(), 250.0);
  EXPECT_DOUBLE_EQ(t["decode_ms_per_token"].get<double>(), 2.0);
  EXPECT_EQ(t["request_id"], "req-1");
  EXPECT_EQ(t["decode_worker"], "decode-0");
  EXPECT_EQ(t["prefill_worker"], "prefill-0");
  EXPECT_EQ(t["prefill_mode"], "remote");
  EXPECT_EQ(t["transfer_bytes"], 4096);
  // The keys of the single-process mode come first, in the same order.
  std::vector<std::string> keys;
  const nlohmann::ordered_json first = nlohmann::ordered_json::parse(out.substr(0, out.find('\n')));
  for (const auto& item : first.items()) keys.push_back(item.key());
  keys.resize(9);
  EXPECT_THAT(keys, ::testing::ElementsAre("turn", "prompt_token_ids", "token_ids", "text",
                                           "logprobs", "finish_reason", "cached_tokens",
                                           "prefill_ms", "decode_ms_per_token"));
}

TEST_F(ServerModeTest, TextStreamsPromptThenOutputAndLogprobsMatchTheLocalShape) {
  std::string out, err;
  ASSERT_EQ(RunCmd({"--server", Address(), "--prompt", "Hi", "--prompt", " x"}, &out, &err), 0)
      << err;
  EXPECT_EQ(out, "Hiabc\n xabc\n");
  // --prompt-ids: no tokenizer on this side, so only the output is printed.
  ASSERT_EQ(RunCmd({"--server", Address(), "--prompt-ids", "1,2"}, &out, &err), 0) << err;
  EXPECT_EQ(out, "abc\n");
  EXPECT_TRUE(fake_.tokenize().size() == 2u);  // ids are not tokenized
  ASSERT_EQ(RunCmd({"--server", Address(), "--prompt-ids", "1,2", "--logprobs", "1", "--json"},
                   &out, &err),
            0)
      << err;
  const json t = Lines(out).at(0);
  ASSERT_EQ(t["logprobs"].size(), 3u);
  EXPECT_EQ(t["logprobs"][0], json::parse(R"({"token_id":7,"logprob":-0.5,"top":[[7,-0.5]]})"));
  EXPECT_EQ(t["prompt_token_ids"], json({1, 2}));
}

TEST_F(ServerModeTest, ErrorsAreTheStatusCodeAndMessage) {
  std::string out, err;
  EXPECT_EQ(RunCmd({"--server", Address(), "--prompt-ids", "1", "--max-tokens", "99"}, &out, &err),
            1);
  EXPECT_EQ(err, "kvrelay generate: RESOURCE_EXHAUSTED: queue full\n");
  // Nothing listens on the port any more.
  const std::string gone = Address();
  server_->Shutdown();
  server_.reset();
  EXPECT_EQ(RunCmd({"--server", gone, "--prompt", "x", "--deadline-seconds", "30"}, &out, &err), 1);
  EXPECT_THAT(err, ::testing::StartsWith("kvrelay generate: UNAVAILABLE: "));
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
}

TEST(GenerateCmdTest, ServerAndLocalFlagsDoNotMix) {
  std::string out, err;
  struct Case {
    std::vector<std::string> args;
    std::string want;
  };
  for (const Case& c : std::vector<Case>{
           {{"--prompt", "x", "--stop", "y"}, "--stop needs --server"},
           {{"--prompt", "x", "--model-name", "m"}, "--model-name needs --server"},
           {{"--prompt", "x", "--deadline-seconds", "3"}, "--deadline-seconds needs --server"},
           {{"--server", "h:1", "--prompt", "x", "--model", "/m"}, "--model is for the single"},
           {{"--server", "h:1", "--prompt", "x", "--kv-dtype", "f16"}, "--kv-dtype is for the"},
           {{"--server", "h:1", "--prompt", "x", "--threads", "2"}, "--threads is for the"},
           {{"--server", "h:1", "--prompt", "x", "--device", "cpu"}, "--device is for the"},
           {{"--server", "h:1", "--prompt", "x", "--deadline-seconds", "0"},
            "--deadline-seconds must be > 0"},
           {{"--server", "", "--prompt", "x"}, "--server needs HOST:PORT"},
       }) {
    EXPECT_EQ(RunCmd(c.args, &out, &err), 2) << c.want;
    EXPECT_THAT(err, HasSubstr(c.want));
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  }
}

}  // namespace
}  // namespace kvrelay::cli

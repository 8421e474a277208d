// kvrelay generate --model DIR --prompt TEXT [--prompt TEXT ...] [sampling flags] [--json]
// (or --prompt-ids 1,2,3 [--prompt-ids ...]: turns given as token ids)
// kvrelay generate --server HOST:PORT ...: the same, as a client of kvrelay.v1.Generation
// (tokenizes each turn with Tokenize, sends history + turn as token ids), same output.
#include <algorithm>
#include <chrono>
#include <limits>
#include <memory>
#include <ostream>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/kvcache/kv_pool.h"
#include "common/kvcache/prefix_cache.h"
#include "common/model/generator.h"
#include "common/model/model.h"
#include "common/rpc/convert.h"
#include "common/sampling/sampler.h"
#include "common/tokenizer/tokenizer.h"
#include "common/util/file.h"
#include "common/worker/model_runtime.h"
#include "grpcpp/grpcpp.h"
#include "kernels/backend.h"
#include "kernels/ops.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tools/cli/args.h"
#include "tools/cli/cli.h"
#include "tools/cli/client_tls.h"

namespace kvrelay::cli {
namespace {

void DeclareFlags(Args& args) {
  using K = Args::Kind;
  args.Flag("model", K::kString, "Hugging Face model folder (default: the demo model)")
      .Flag("server", K::kString,
            "HOST:PORT of a kvrelay router: generate there (kvrelay.v1.Generation) instead of "
            "in this process")
      .Flag("model-name", K::kString, "--server: the model to use (default: the one served)")
      .Flag("prompt", K::kString, "prompt text; several are successive turns of one conversation",
            true)
      .Flag("prompt-ids", K::kString,
            "prompt as comma-separated token ids instead of text (repeatable like --prompt)", true)
      .IntFlag("max-tokens", 1, 1 << 30, "tokens to generate per turn (default 16)")
      .Flag("temperature", K::kFloat, "0 = greedy (default 0)")
      .IntFlag("top-k", -1, 1 << 30, "keep the k most likely tokens (0 = off)")
      .Flag("top-p", K::kFloat, "nucleus sampling mass (default 1)")
      .Flag("min-p", K::kFloat, "drop tokens below min-p x the top probability (default 0)")
      .Flag("repetition-penalty", K::kFloat, "HF repetition penalty (default 1)")
      .Flag("frequency-penalty", K::kFloat, "OpenAI frequency penalty (default 0)")
      .Flag("presence-penalty", K::kFloat, "OpenAI presence penalty (default 0)")
      .IntFlag("seed", 0, std::numeric_limits<long long>::max(), "sampling seed (default 0)")
      .IntFlag("stop-token-id", 0, std::numeric_limits<int32_t>::max(), "extra stop token id", true)
      .Flag("ignore-eos", K::kBool, "keep generating after an end-of-sequence token")
      .Flag("stop", K::kString, "--server: stop string (the text ends before it)", true)
      .Flag("deadline-seconds", K::kFloat, "--server: deadline of each call (default none)")
      .IntFlag("logprobs", 0, 20, "top-N logprobs per generated token (0-20, default 0)")
      .Flag("kv-dtype", K::kString, "KV cache dtype: f32 | f16 | bf16 | int8 (default f32)")
      .IntFlag("block-size", 1, 1024, "tokens per KV block (default 16)")
      .IntFlag("kv-blocks", 1, std::numeric_limits<int32_t>::max(),
               "KV pool size in blocks (default: enough for the context, max 8192 tokens)")
      .IntFlag("prefill-chunk", 1, 1 << 20, "tokens per prefill step (default 256)")
      .Flag("cache-salt", K::kString,
            "prefix-cache isolation: only requests with the same salt share KV (default none)")
      .Flag("model-id", K::kString,
            "model name in the KV block hashes (default: the model folder's name)")
      .Flag("device", K::kString,
            "where the forward pass runs: cpu | cuda | auto (default auto: cuda when built with "
            "CUDA and a GPU is found)")
      .IntFlag("threads", 0, 1024, "CPU threads on the cpu device (default: all cores)")
      .Flag("isa", K::kString, "CPU kernels: auto | avx2 | scalar (default auto)")
      .Flag("json", K::kBool, "print one JSON object per turn")
      .Flag("help", K::kBool, "this text");
}

absl::Status ReadSampling(const Args& args, sampling::SamplingParams* p) {
  p->max_tokens = static_cast<int>(args.GetInt("max-tokens", 16));
  p->temperature = static_cast<float>(args.GetFloat("temperature", 0.0));
  p->top_k = static_cast<int>(args.GetInt("top-k", 0));
  p->top_p = static_cast<float>(args.GetFloat("top-p", 1.0));
  p->min_p = static_cast<float>(args.GetFloat("min-p", 0.0));
  p->repetition_penalty = static_cast<float>(args.GetFloat("repetition-penalty", 1.0));
  p->frequency_penalty = static_cast<float>(args.GetFloat("frequency-penalty", 0.0));
  p->presence_penalty = static_cast<float>(args.GetFloat("presence-penalty", 0.0));
  p->seed = static_cast<uint64_t>(args.GetInt("seed", 0));
  p->ignore_eos = args.GetBool("ignore-eos");
  for (const std::string& s : args.GetAll("stop-token-id")) {
    int32_t id = 0;
    (void)absl::SimpleAtoi(s, &id);  // range-checked by Parse
    p->stop_token_ids.push_back(id);
  }
  p->logprobs = static_cast<int>(args.GetInt("logprobs", 0));
  return sampling::ValidateSamplingParams(*p);
}

int Fail(std::ostream& err, const std::string& what, int code = 1) {
  err << "kvrelay generate: " << what << "\n";
  return code;
}

int GrpcFail(std::ostream& err, const grpc::Status& s) {
  const absl::Status st = rpc::FromGrpc(s);
  return Fail(err, absl::StatusCodeToString(st.code()) + ": " + std::string(st.message()));
}

// --server: the turns as calls to kvrelay.v1.Generation. Each fresh turn is tokenized by
// the server (special tokens on turn 1 only, as in the single-process mode) and sent
// after the history as token ids, so both modes compute the same thing.
int RunServerGenerate(const Args& args, const std::vector<std::string>& prompts,
                      const std::vector<std::vector<int32_t>>& id_turns,
                      const sampling::SamplingParams& params, std::ostream& out,
                      std::ostream& err) {
  const std::string server = args.GetString("server", "");
  if (server.empty()) return Fail(err, "--server needs HOST:PORT", 2);
  const double deadline_seconds = args.GetFloat("deadline-seconds", 0);
  if (args.Has("deadline-seconds") && !(deadline_seconds > 0)) {
    return Fail(err, "--deadline-seconds must be > 0", 2);
  }
  auto set_deadline = [&](grpc::ClientContext& ctx) {
    if (deadline_seconds > 0) {
      ctx.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::microseconds(static_cast<int64_t>(deadline_seconds * 1e6)));
    }
  };
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = ClientChannel(args, server);
  if (!channel.ok()) return Fail(err, std::string(channel.status().message()), 2);
  std::unique_ptr<v1::Generation::Stub> stub = v1::Generation::NewStub(*channel);
  const std::string model_name = args.GetString("model-name", "");
  v1::SamplingParams sampling = rpc::ToProto(params);
  for (const std::string& stop : args.GetAll("stop")) sampling.add_stop(stop);
  const bool json = args.GetBool("json");
  const size_t turns = prompts.empty() ? id_turns.size() : prompts.size();
  std::vector<int32_t> history;  // previous turns' prompt + output
  for (size_t turn = 0; turn < turns; ++turn) {
    std::vector<int32_t> fresh;
    if (prompts.empty()) {
      fresh = id_turns[turn];
    } else {
      v1::TokenizeRequest treq;
      treq.set_model(model_name);
      treq.set_prompt(prompts[turn]);
      treq.set_add_special_tokens(turn == 0);
      v1::TokenizeResponse tresp;
      grpc::ClientContext ctx;
      set_deadline(ctx);
      if (grpc::Status s = stub->Tokenize(&ctx, treq, &tresp); !s.ok()) return GrpcFail(err, s);
      fresh.assign(tresp.token_ids().begin(), tresp.token_ids().end());
    }
    std::vector<int32_t> prompt = history;
    prompt.insert(prompt.end(), fresh.begin(), fresh.end());
    v1::GenerateRequest req;
    req.set_model(model_name);
    req.mutable_token_ids()->mutable_ids()->Add(prompt.begin(), prompt.end());
    *req.mutable_sampling() = sampling;
    req.set_cache_salt(args.GetString("cache-salt", ""));
    // Without a tokenizer here, --prompt-ids turns print only the generated text.
    if (!json && !prompts.empty()) out << prompts[turn] << std::flush;
    grpc::ClientContext ctx;
    set_deadline(ctx);
    std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader = stub->Generate(&ctx, req);
    std::vector<int32_t> ids;
    std::string text, request_id;
    nlohmann::ordered_json lps = nlohmann::ordered_json::array();
    v1::Final final;
    bool has_final = false;
    v1::GenerateResponse m;
    while (reader->Read(&m)) {
      ids.insert(ids.end(), m.token_ids().begin(), m.token_ids().end());
      text += m.text();
      if (!json) out << m.text() << std::flush;
      if (params.logprobs > 0) {
        for (const v1::TokenLogprobs& lp : m.logprobs()) {
          nlohmann::ordered_json e;
          e["token_id"] = lp.token_id();
          e["logprob"] = lp.logprob();
          nlohmann::ordered_json top = nlohmann::ordered_json::array();
          for (const v1::TopLogprob& t : lp.top()) top.push_back({t.token_id(), t.logprob()});
          e["top"] = std::move(top);
          lps.push_back(std::move(e));
        }
      }
      if (!m.request_id().empty()) request_id = m.request_id();
      if (m.has_final()) {
        final = m.final();
        has_final = true;
      }
    }
    const grpc::Status status = reader->Finish();
    if (!status.ok() || !has_final) {
      if (!json) out << "\n" << std::flush;
      if (!status.ok()) return GrpcFail(err, status);
      return Fail(err, "the server ended the stream without its final message");
    }
    if (!json) {
      out << "\n" << std::flush;
    } else {
      nlohmann::ordered_json j;
      j["turn"] = turn + 1;
      j["prompt_token_ids"] = prompt;
      j["token_ids"] = ids;
      j["text"] = text;
      j["logprobs"] = std::move(lps);
      j["finish_reason"] = final.finish_reason();
      j["cached_tokens"] = final.usage().cached_tokens();
      j["prefill_ms"] = final.timing().ttft_seconds() * 1e3;
      j["decode_ms_per_token"] = final.timing().mean_itl_seconds() * 1e3;
      // Only the server knows these.
      j["request_id"] = request_id;
      j["stop_reason"] = final.stop_reason();
      j["decode_worker"] = final.route().decode_worker();
      j["prefill_worker"] = final.route().prefill_worker();
      j["prefill_mode"] = rpc::PrefillModeName(final.route().prefill_mode());
      j["transfer_bytes"] = final.transfer().bytes();
      out << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n" << std::flush;
    }
    history = prompt;
    history.insert(history.end(), ids.begin(), ids.end());
  }
  return 0;
}

}  // namespace

int RunGenerate(int argc, char** argv, std::ostream& out, std::ostream& err) {
  Args args;
  DeclareFlags(args);
  DeclareClientTlsFlags(args);
  if (absl::Status s = args.Parse(argc, argv, 2); !s.ok())
    return Fail(err, std::string(s.message()), 2);
  if (args.GetBool("help")) {
    out << "usage: kvrelay generate [--model DIR] --prompt TEXT [--prompt TEXT ...] [flags]\n"
           "       kvrelay generate --server HOST:PORT --prompt TEXT [--prompt TEXT ...] [flags]\n"
        << args.Help();
    return 0;
  }
  const std::vector<std::string> prompts = args.GetAll("prompt");
  const std::vector<std::string> id_lists = args.GetAll("prompt-ids");
  if (prompts.empty() == id_lists.empty()) {
    return Fail(err, "give the turns either as --prompt TEXT or as --prompt-ids IDS", 2);
  }
  std::vector<std::vector<int32_t>> id_turns;
  for (const std::string& list : id_lists) {
    std::vector<int32_t>& ids = id_turns.emplace_back();
    for (absl::string_view part : absl::StrSplit(list, ',')) {
      int32_t id = 0;
      if (!absl::SimpleAtoi(part, &id) || id < 0) {
        return Fail(err, "--prompt-ids: '" + std::string(part) + "' is not a token id", 2);
      }
      ids.push_back(id);
    }
  }
  const size_t turns = prompts.empty() ? id_turns.size() : prompts.size();
  sampling::SamplingParams params;
  if (absl::Status s = ReadSampling(args, &params); !s.ok())
    return Fail(err, std::string(s.message()), 2);
  if (args.Has("server")) {
    for (const char* local_only : {"model", "kv-dtype", "block-size", "kv-blocks", "prefill-chunk",
                                   "model-id", "threads", "isa", "device"}) {
      if (args.Has(local_only)) {
        return Fail(err,
                    std::string("--") + local_only +
                        " is for the single-process mode; the server has its own (use "
                        "--model-name to pick a served model)",
                    2);
      }
    }
    return RunServerGenerate(args, prompts, id_turns, params, out, err);
  }
  for (const char* server_only : {"stop", "model-name", "deadline-seconds"}) {
    if (args.Has(server_only)) {
      return Fail(err, std::string("--") + server_only + " needs --server", 2);
    }
  }
  kernels::DType kv_dtype;
  const std::string kv_name = args.GetString("kv-dtype", "f32");
  if (!kernels::ParseDType(kv_name, &kv_dtype)) {
    return Fail(err, "--kv-dtype must be f32, f16, bf16 or int8, got '" + kv_name + "'", 2);
  }
  const long long block_size = args.GetInt("block-size", 16);
  const long long chunk = args.GetInt("prefill-chunk", 256);
  const std::string isa = args.GetString("isa", "auto");
  if (isa == "avx2" || isa == "scalar") {
    if (!kernels::SetActiveIsa(isa == "avx2" ? kernels::Isa::kAvx2 : kernels::Isa::kScalar)) {
      return Fail(err, "--isa " + isa + " is not supported by this CPU", 2);
    }
  } else if (isa != "auto") {
    return Fail(err, "--isa must be auto, avx2 or scalar, got '" + isa + "'", 2);
  }

  std::string dir = args.GetString("model", "");
  if (dir.empty()) {
    absl::StatusOr<std::string> demo = EnsureDemoModel(err);
    if (!demo.ok()) return Fail(err, std::string(demo.status().message()));
    dir = *demo;
  } else if (!IsDirectory(dir)) {
    return Fail(err, "--model " + dir + ": no such folder");
  }
  const std::string device = args.GetString("device", "auto");
  if (absl::StatusOr<kernels::Device> d = kernels::ResolveDevice(device); !d.ok()) {
    return Fail(err, std::string(d.status().message()), 2);  // a usage error
  }
  absl::StatusOr<worker::ModelRuntime> runtime =
      worker::LoadModelRuntime(dir, device, static_cast<int>(args.GetInt("threads", 0)));
  if (!runtime.ok()) return Fail(err, std::string(runtime.status().message()));
  const model::Model& model = *runtime->model;
  absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> tok =
      tokenizer::Tokenizer::FromFile(JoinPath(dir, "tokenizer.json"));
  if (!tok.ok()) return Fail(err, std::string(tok.status().message()));
  const model::ModelConfig& cfg = model.config();

  const long long default_blocks = kvcache::BlocksFor(std::min(cfg.max_position_embeddings, 8192),
                                                      static_cast<int>(block_size)) +
                                   1;
  const long long kv_blocks = args.GetInt("kv-blocks", default_blocks);
  // In the backend's memory (device memory on cuda).
  absl::StatusOr<worker::BackendKvPool> kv_memory = worker::AllocateKvPool(
      *runtime->backend, model.KvLayout(kv_dtype, static_cast<int>(block_size)), kv_blocks);
  if (!kv_memory.ok()) return Fail(err, std::string(kv_memory.status().message()));
  kvcache::PrefixCache::Options cache_options;
  cache_options.num_blocks = kv_blocks;
  cache_options.block_size = static_cast<int>(block_size);
  cache_options.incarnation = kvcache::NewIncarnationId();
  absl::StatusOr<std::unique_ptr<kvcache::PrefixCache>> cache =
      kvcache::PrefixCache::Create(cache_options);
  if (!cache.ok()) return Fail(err, std::string(cache.status().message()));
  model::Generator gen(&model, kv_memory->pool.get(), cache->get(),
                       args.GetString("model-id", BaseName(dir)), static_cast<int>(chunk));
  model::GenerateOptions gen_options;
  gen_options.cache_salt = args.GetString("cache-salt", "");

  const bool json = args.GetBool("json");
  std::vector<int32_t> history;  // previous turns' prompt + output
  for (size_t turn = 0; turn < turns; ++turn) {
    std::vector<int32_t> prompt = history;
    const std::vector<int32_t> fresh =
        prompts.empty() ? id_turns[turn]
                        : (*tok)->Encode(prompts[turn], /*add_special_tokens=*/turn == 0);
    prompt.insert(prompt.end(), fresh.begin(), fresh.end());

    tokenizer::StreamingDetokenizer detok(tok->get(), /*skip_special_tokens=*/true);
    detok.SetPrefix(prompt);
    if (!json) out << (prompts.empty() ? (*tok)->Decode(fresh, true) : prompts[turn]) << std::flush;
    std::string text;  // decoded in the context of the prompt, as streamed
    gen_options.on_token = [&](int32_t id) {
      std::string piece = detok.Push(id);
      if (!json) out << piece << std::flush;
      text += piece;
      return true;
    };
    absl::StatusOr<model::GenerationResult> r = gen.Generate(prompt, params, gen_options);
    if (!r.ok())
      return Fail(err,
                  "turn " + std::to_string(turn + 1) + ": " + std::string(r.status().message()));
    const std::string tail = detok.Flush();
    text += tail;
    if (!json) {
      out << tail << "\n";
    } else {
      nlohmann::ordered_json j;
      j["turn"] = turn + 1;
      j["prompt_token_ids"] = prompt;
      j["token_ids"] = r->token_ids;
      j["text"] = text;
      nlohmann::ordered_json lps = nlohmann::ordered_json::array();
      if (params.logprobs > 0) {
        for (const sampling::SampleResult& s : r->samples) {
          nlohmann::ordered_json e;
          e["token_id"] = s.token;
          e["logprob"] = s.logprob;
          nlohmann::ordered_json top = nlohmann::ordered_json::array();
          for (const auto& [id, lp] : s.top_logprobs) top.push_back({id, lp});
          e["top"] = std::move(top);
          lps.push_back(std::move(e));
        }
      }
      j["logprobs"] = std::move(lps);
      j["finish_reason"] = r->finish_reason;
      j["cached_tokens"] = r->cached_tokens;
      j["prefill_ms"] = r->prefill_seconds * 1e3;
      const size_t steps = r->token_ids.size() > 1 ? r->token_ids.size() - 1 : 0;
      j["decode_ms_per_token"] = steps > 0 ? r->decode_seconds * 1e3 / steps : 0.0;
      out << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    }
    history = prompt;
    history.insert(history.end(), r->token_ids.begin(), r->token_ids.end());
  }
  return 0;
}

}  // namespace kvrelay::cli

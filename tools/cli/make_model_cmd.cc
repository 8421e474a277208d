// kvrelay make-model --family llama|gpt2 --seed S --out DIR [shape flags]
#include <limits>
#include <ostream>

#include "common/model/model_maker.h"
#include "tools/cli/args.h"
#include "tools/cli/cli.h"

namespace kvrelay::cli {

int RunMakeModel(int argc, char** argv, std::ostream& out, std::ostream& err) {
  using K = Args::Kind;
  model::MakeModelOptions d;  // defaults
  Args args;
  args.Flag("family", K::kString, "llama | gpt2 (default llama)")
      .Flag("model-type", K::kString, "llama family: llama | mistral | qwen2 (default llama)")
      .IntFlag("seed", 0, std::numeric_limits<long long>::max(), "random seed (default 0)")
      .Flag("out", K::kString, "output folder (required)")
      .IntFlag("layers", 1, 1024, "transformer layers (default 2)")
      .IntFlag("hidden", 2, 1 << 16, "hidden size (default 64)")
      .IntFlag("heads", 1, 1024, "attention heads (default 4)")
      .IntFlag("kv-heads", 1, 1024, "key/value heads, llama family (default 2)")
      .IntFlag("intermediate", 0, 1 << 20, "MLP size (default llama 8/3 hidden, gpt2 4 hidden)")
      .IntFlag("vocab", 300, 1 << 22,
               "vocabulary size (default 512; the BPE tokenizer is trained up to it)")
      .IntFlag("max-pos", 1, 1 << 22, "context length (default 2048)")
      .Flag("dtype", K::kString, "weights: f32 | f16 | bf16 (default f32)")
      .Flag("tie-embeddings", K::kBool, "llama family: tie lm_head to the embedding")
      .Flag("rope-llama3", K::kBool, "llama: Llama-3 rope scaling (factor 8)")
      .Flag("help", K::kBool, "this text");
  if (absl::Status s = args.Parse(argc, argv, 2); !s.ok()) {
    err << "kvrelay make-model: " << s.message() << "\n";
    return 2;
  }
  if (args.GetBool("help")) {
    out << "usage: kvrelay make-model --out DIR [flags]\n" << args.Help();
    return 0;
  }
  if (!args.Has("out")) {
    err << "kvrelay make-model: --out DIR is required\n";
    return 2;
  }
  model::MakeModelOptions o;
  const std::string family = args.GetString("family", "llama");
  if (family == "llama") {
    o.family = model::Family::kLlama;
  } else if (family == "gpt2") {
    o.family = model::Family::kGpt2;
  } else {
    err << "kvrelay make-model: --family must be llama or gpt2, got '" << family << "'\n";
    return 2;
  }
  o.model_type = args.GetString("model-type", "");
  o.seed = static_cast<uint64_t>(args.GetInt("seed", 0));
  o.layers = static_cast<int>(args.GetInt("layers", d.layers));
  o.hidden = static_cast<int>(args.GetInt("hidden", d.hidden));
  o.heads = static_cast<int>(args.GetInt("heads", d.heads));
  o.kv_heads = static_cast<int>(args.GetInt("kv-heads", d.kv_heads));
  o.intermediate = static_cast<int>(args.GetInt("intermediate", d.intermediate));
  o.vocab = static_cast<int>(args.GetInt("vocab", d.vocab));
  o.max_pos = static_cast<int>(args.GetInt("max-pos", d.max_pos));
  o.tie_embeddings = args.GetBool("tie-embeddings");
  o.rope_llama3 = args.GetBool("rope-llama3");
  const std::string dtype = args.GetString("dtype", "f32");
  if (!kernels::ParseDType(dtype, &o.dtype) || o.dtype == kernels::DType::kI8) {
    err << "kvrelay make-model: --dtype must be f32, f16 or bf16, got '" << dtype << "'\n";
    return 2;
  }
  if (absl::Status s = model::MakeModel(o, args.GetString("out", "")); !s.ok()) {
    err << "kvrelay make-model: " << s.message() << "\n";
    return 1;
  }
  out << args.GetString("out", "") << "\n";
  return 0;
}

}  // namespace kvrelay::cli

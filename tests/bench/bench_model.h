// The ~134M-parameter Llama-shaped bf16 model the benchmarks share, written once to
// $KVRELAY_BENCH_DIR/kvrelay-bench-100m (default /tmp/kvrelay-bench-100m).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/model/model_maker.h"
#include "common/util/file.h"

namespace kvrelay::bench {

inline std::string EnsureBenchModel() {
  const char* env = std::getenv("KVRELAY_BENCH_DIR");
  const std::string dir = std::string(env ? env : "/tmp") + "/kvrelay-bench-100m";
  if (!FileExists(dir + "/model.safetensors")) {
    model::MakeModelOptions o;
    o.layers = 12;
    o.hidden = 768;
    o.heads = 12;
    o.kv_heads = 12;
    o.intermediate = 2048;
    o.vocab = 32000;
    o.max_pos = 4096;
    o.dtype = kernels::DType::kBF16;
    const absl::Status s = model::MakeModel(o, dir);
    if (!s.ok()) {
      std::fprintf(stderr, "make-model: %s\n", std::string(s.message()).c_str());
      std::exit(1);
    }
  }
  return dir;
}

}  // namespace kvrelay::bench

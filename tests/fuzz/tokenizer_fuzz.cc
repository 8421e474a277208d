// tokenizer.json parsing and encoding (issue 17). The first byte picks the case:
//  0: the rest is tokenizer.json text; a tokenizer it yields encodes and decodes a probe;
//  1: the rest is text for two trained byte-level BPE tokenizers (GPT-2 and Llama-3
//     style): encoding then decoding valid UTF-8 gives it back, byte for byte;
//  2: the rest is token ids (any int32, out of range included) to decode.
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/tokenizer/bpe_trainer.h"
#include "common/tokenizer/tokenizer.h"
#include "common/tokenizer/unicode.h"

namespace {

using kvrelay::tokenizer::Tokenizer;

std::unique_ptr<Tokenizer> Trained(kvrelay::tokenizer::ByteLevelStyle style) {
  kvrelay::tokenizer::BpeTrainOptions o;
  o.style = style;
  o.vocab_size = 400;
  auto t = kvrelay::tokenizer::TrainByteLevelBpe(o);
  if (!t.ok()) __builtin_trap();
  auto tok = Tokenizer::FromJson(t->json, "trained");
  if (!tok.ok()) __builtin_trap();
  return *std::move(tok);
}

const std::vector<std::unique_ptr<Tokenizer>>& Tokenizers() {
  static auto* t = [] {
    auto* v = new std::vector<std::unique_ptr<Tokenizer>>();
    v->push_back(Trained(kvrelay::tokenizer::ByteLevelStyle::kGpt2));
    v->push_back(Trained(kvrelay::tokenizer::ByteLevelStyle::kLlama3));
    return v;
  }();
  return *t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string in(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 3) {
    case 0: {
      auto t = Tokenizer::FromJson(in, "fuzz");
      if (t.ok()) {
        const std::vector<int32_t> ids = (*t)->Encode(
            "Hello, world! \xc3\xbc"
            "n\xc3\xaf"
            "c 123",
            true);
        (*t)->Decode(ids, false);
        (*t)->Decode(ids, true);
      }
      break;
    }
    case 1:
      for (const auto& t : Tokenizers()) {
        const std::vector<int32_t> ids = t->Encode(in, false);
        const std::string back = t->Decode(ids, false);
        if (kvrelay::tokenizer::IsValidUtf8(in) && back != in) __builtin_trap();
        t->Encode(in, true);
      }
      break;
    default: {
      std::vector<int32_t> ids(in.size() / 4);
      if (!ids.empty()) std::memcpy(ids.data(), in.data(), ids.size() * 4);
      for (const auto& t : Tokenizers()) {
        t->Decode(ids, false);
        t->Decode(ids, true);
      }
      break;
    }
  }
  return 0;
}

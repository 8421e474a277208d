#include "common/rpc/convert.h"

#include <limits>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/wire_format_lite.h"

namespace kvrelay::rpc {

absl::StatusOr<sampling::SamplingParams> FromProto(const v1::SamplingParams& p) {
  sampling::SamplingParams s;
  if (p.max_tokens() > static_cast<uint32_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.max_tokens must be < 2^31, got ", p.max_tokens()));
  }
  if (p.logprobs() > 1000) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.logprobs must be in [0, 20], got ", p.logprobs()));
  }
  s.max_tokens = p.max_tokens() == 0 ? 16 : static_cast<int>(p.max_tokens());
  s.temperature = p.temperature();
  s.top_k = p.top_k();
  s.top_p = p.has_top_p() ? p.top_p() : 1.0f;
  s.min_p = p.min_p();
  s.repetition_penalty = p.has_repetition_penalty() ? p.repetition_penalty() : 1.0f;
  s.frequency_penalty = p.frequency_penalty();
  s.presence_penalty = p.presence_penalty();
  s.seed = p.seed();
  s.stop_token_ids.assign(p.stop_token_ids().begin(), p.stop_token_ids().end());
  s.ignore_eos = p.ignore_eos();
  s.logprobs = static_cast<int>(p.logprobs());
  const absl::Status st = sampling::ValidateSamplingParams(s);
  if (!st.ok()) return absl::InvalidArgumentError(absl::StrCat("sampling.", st.message()));
  return s;
}

v1::SamplingParams ToProto(const sampling::SamplingParams& s) {
  v1::SamplingParams p;
  p.set_max_tokens(static_cast<uint32_t>(s.max_tokens));
  p.set_temperature(s.temperature);
  p.set_top_k(s.top_k);
  p.set_top_p(s.top_p);
  p.set_min_p(s.min_p);
  p.set_repetition_penalty(s.repetition_penalty);
  p.set_frequency_penalty(s.frequency_penalty);
  p.set_presence_penalty(s.presence_penalty);
  p.set_seed(s.seed);
  for (int32_t id : s.stop_token_ids) p.add_stop_token_ids(id);
  p.set_ignore_eos(s.ignore_eos);
  p.set_logprobs(static_cast<uint32_t>(s.logprobs));
  return p;
}

sampling::SampleResult FromProto(const v1::TokenLogprobs& p) {
  sampling::SampleResult r;
  r.token = p.token_id();
  r.logprob = p.logprob();
  for (const v1::TopLogprob& t : p.top()) r.top_logprobs.emplace_back(t.token_id(), t.logprob());
  return r;
}

void ToProto(const sampling::SampleResult& s, v1::TokenLogprobs* out) {
  out->set_token_id(s.token);
  out->set_logprob(s.logprob);
  for (const auto& [id, lp] : s.top_logprobs) {
    v1::TopLogprob* t = out->add_top();
    t->set_token_id(id);
    t->set_logprob(lp);
  }
}

v1::KvPoolDescriptor ToProto(const transfer::PoolDescriptor& d) {
  v1::KvPoolDescriptor p;
  p.set_transport(d.transport);
  p.set_peer_address(d.peer_address);
  p.set_rkey(d.rkey);
  p.set_base_address(d.base_address);
  p.set_bytes(d.bytes);
  p.set_memory_type(d.memory_type == transfer::MemoryType::kCuda ? v1::MEMORY_TYPE_CUDA
                                                                 : v1::MEMORY_TYPE_HOST);
  p.set_block_bytes(d.block_bytes);
  p.set_num_blocks(d.num_blocks);
  return p;
}

absl::StatusOr<transfer::PoolDescriptor> FromProto(const v1::KvPoolDescriptor& p,
                                                   absl::string_view field_name) {
  auto bad = [&](absl::string_view field, absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(field_name, ".", field, " ", what));
  };
  if (p.transport().empty()) return bad("transport", "is required");
  if (p.peer_address().empty()) return bad("peer_address", "is required");
  if (p.block_bytes() == 0) return bad("block_bytes", "must be > 0");
  if (p.num_blocks() <= 0) return bad("num_blocks", "must be > 0");
  if (p.bytes() / p.block_bytes() < static_cast<uint64_t>(p.num_blocks())) {
    return bad("bytes", absl::StrCat("(", p.bytes(), ") is smaller than num_blocks x block_bytes"));
  }
  transfer::PoolDescriptor d;
  d.transport = p.transport();
  d.peer_address = p.peer_address();
  d.rkey = p.rkey();
  d.base_address = p.base_address();
  d.bytes = p.bytes();
  switch (p.memory_type()) {
    case v1::MEMORY_TYPE_UNSPECIFIED:
    case v1::MEMORY_TYPE_HOST:
      d.memory_type = transfer::MemoryType::kHost;
      break;
    case v1::MEMORY_TYPE_CUDA:
      d.memory_type = transfer::MemoryType::kCuda;
      break;
    default:
      return bad("memory_type", absl::StrCat("has unknown value ", p.memory_type()));
  }
  d.block_bytes = p.block_bytes();
  d.num_blocks = p.num_blocks();
  return d;
}

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

grpc::Status RefusalStatus(const grpc::ServerContextBase& context, const absl::Status& s) {
  if (context.IsCancelled()) {
    return grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the call");
  }
  return ToGrpc(s);
}

const char* PrefillModeName(v1::PrefillMode mode) {
  switch (mode) {
    case v1::PREFILL_MODE_LOCAL:
      return "local";
    case v1::PREFILL_MODE_REMOTE:
      return "remote";
    default:
      return "";
  }
}

int64_t FirstInvalidUtf8(absl::string_view s) {
  const auto* b = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = b[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    uint32_t cp = 0, min = 0;
    if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07, min = 0x10000;
    } else {
      return static_cast<int64_t>(i);  // a continuation byte or 0xF8..0xFF
    }
    if (i + len > n) return static_cast<int64_t>(i);
    for (size_t k = 1; k < len; ++k) {
      if ((b[i + k] & 0xC0) != 0x80) return static_cast<int64_t>(i);
      cp = (cp << 6) | (b[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return static_cast<int64_t>(i);
    }
    i += len;
  }
  return -1;
}

namespace {

std::optional<std::string> FindInvalidUtf8In(absl::string_view bytes,
                                             const google::protobuf::Descriptor* type,
                                             const std::string& prefix, int depth) {
  using google::protobuf::FieldDescriptor;
  using google::protobuf::internal::WireFormatLite;
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(bytes.data()),
                                            static_cast<int>(bytes.size()));
  absl::flat_hash_map<int, int> seen;  // field number -> elements so far (repeated fields)
  while (true) {
    const uint32_t tag = in.ReadTag();
    if (tag == 0) return std::nullopt;
    const int number = WireFormatLite::GetTagFieldNumber(tag);
    const FieldDescriptor* f = type->FindFieldByNumber(number);
    if (WireFormatLite::GetTagWireType(tag) != WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
      if (!WireFormatLite::SkipField(&in, tag)) return std::nullopt;
      continue;
    }
    uint32_t len = 0;
    std::string value;
    if (!in.ReadVarint32(&len) || !in.ReadString(&value, static_cast<int>(len))) {
      return std::nullopt;
    }
    if (f == nullptr) continue;
    std::string name = prefix + f->name();
    if (f->is_repeated()) name += absl::StrCat("[", seen[number]++, "]");
    if (f->type() == FieldDescriptor::TYPE_STRING) {
      if (const int64_t at = FirstInvalidUtf8(value); at >= 0) {
        return absl::StrCat("field '", name, "' is not valid UTF-8 (byte offset ", at,
                            " of its value)");
      }
    } else if (f->type() == FieldDescriptor::TYPE_MESSAGE && depth < 32) {
      if (auto found = FindInvalidUtf8In(value, f->message_type(), name + ".", depth + 1)) {
        return found;
      }
    }
  }
}

}  // namespace

std::optional<std::string> FindInvalidUtf8(absl::string_view bytes,
                                           const google::protobuf::Descriptor* type) {
  if (type == nullptr) return std::nullopt;
  return FindInvalidUtf8In(bytes, type, "", 0);
}

}  // namespace kvrelay::rpc

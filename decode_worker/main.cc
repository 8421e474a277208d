// kvrelay-decode: a decode worker. Prints "READY <port>" once it serves; SIGTERM or
// SIGINT drains running requests (up to --drain_seconds) and exits. The flags every
// worker has are in common/process/worker_flags.cc and process_flags.cc.
#include <algorithm>
#include <cstdio>

#include "absl/flags/flag.h"
#include "common/process/worker_flags.h"
#include "decode_worker/decode_worker.h"

ABSL_FLAG(int, max_batch_tokens, 512, "tokens per forward pass (decode tokens + prefill)");
ABSL_FLAG(int, max_running, 64, "sequences in the running batch");
ABSL_FLAG(int, prefill_chunk, 256, "most prefill tokens of one sequence per step");
ABSL_FLAG(int, max_waiting, 1024, "queued requests beyond this get RESOURCE_EXHAUSTED");
ABSL_FLAG(double, prefill_timeout_seconds, 60,
          "remote plan: how long one prefill worker call may take before falling back");

int main(int argc, char** argv) {
  namespace process = kvrelay::process;
  absl::StatusOr<process::Process> p = process::SetUp(
      "kvrelay-decode", "kvrelay-decode --model DIR [--listen HOST:PORT] ...", argc, argv);
  if (!p.ok()) return process::Failed("kvrelay-decode", p.status());

  kvrelay::decode::DecodeWorkerOptions o;
  if (absl::Status s = process::ApplyWorkerFlags(*p, o); !s.ok()) return p->Fail(s);
  o.engine.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  o.engine.max_running = absl::GetFlag(FLAGS_max_running);
  o.engine.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  o.engine.max_waiting = static_cast<size_t>(std::max(1, absl::GetFlag(FLAGS_max_waiting)));
  o.prefill_timeout = absl::Seconds(absl::GetFlag(FLAGS_prefill_timeout_seconds));
  auto worker = kvrelay::decode::DecodeWorker::Start(o);
  if (!worker.ok()) return p->Fail(worker.status());
  std::fprintf(stderr, "kvrelay-decode: %s\n", (*worker)->device_note().c_str());
  const int code = p->ServeUntilStopped(
      (*worker)->port(),
      [&](absl::Duration grace, absl::Duration linger) { (*worker)->Shutdown(grace, linger); });
  worker->reset();
  return code;
}

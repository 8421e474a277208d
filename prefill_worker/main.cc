// kvrelay-prefill: a prefill worker. Prints "READY <port>" once it serves; SIGTERM or
// SIGINT lets running prefills finish (up to --drain_seconds) and exits. The flags every
// worker has are in common/process/worker_flags.cc and process_flags.cc.
#include <algorithm>
#include <cstdio>

#include "absl/flags/flag.h"
#include "common/process/worker_flags.h"
#include "prefill_worker/prefill_worker.h"

ABSL_FLAG(int, prefill_chunk, 256, "tokens per prefill forward pass");
ABSL_FLAG(int, max_queue, 256, "queued prefills beyond this get RESOURCE_EXHAUSTED");
ABSL_FLAG(uint64_t, transfer_chunk_bytes, 512 << 10, "KV puts larger than this are split");
ABSL_FLAG(int, transfer_max_in_flight, 8, "KV put chunks outstanding at once");
ABSL_FLAG(double, transfer_timeout_seconds, 30, "one KV write, issue to remote completion");

int main(int argc, char** argv) {
  namespace process = kvrelay::process;
  absl::StatusOr<process::Process> p = process::SetUp(
      "kvrelay-prefill", "kvrelay-prefill --model DIR [--listen HOST:PORT] ...", argc, argv);
  if (!p.ok()) return process::Failed("kvrelay-prefill", p.status());

  kvrelay::prefill::PrefillWorkerOptions o;
  if (absl::Status s = process::ApplyWorkerFlags(*p, o); !s.ok()) return p->Fail(s);
  o.engine.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  o.engine.max_queue = static_cast<size_t>(std::max(1, absl::GetFlag(FLAGS_max_queue)));
  o.engine.transfer.chunk_bytes = absl::GetFlag(FLAGS_transfer_chunk_bytes);
  o.engine.transfer.max_in_flight = absl::GetFlag(FLAGS_transfer_max_in_flight);
  o.engine.transfer.timeout = absl::Seconds(absl::GetFlag(FLAGS_transfer_timeout_seconds));
  auto worker = kvrelay::prefill::PrefillWorker::Start(o);
  if (!worker.ok()) return p->Fail(worker.status());
  std::fprintf(stderr, "kvrelay-prefill: %s\n", (*worker)->device_note().c_str());
  const int code = p->ServeUntilStopped(
      (*worker)->port(),
      [&](absl::Duration grace, absl::Duration linger) { (*worker)->Shutdown(grace, linger); });
  worker->reset();
  return code;
}

// What both worker kinds are configured with (common/process/worker_flags.h fills it from
// the flags they share); DecodeWorkerOptions and PrefillWorkerOptions add their engine's.
#pragma once

#include <memory>
#include <string>

#include "common/rpc/registry_client.h"
#include "common/rpc/security.h"
#include "common/worker/kv_store.h"
#include "kernels/backend.h"
#include "prometheus/registry.h"

namespace kvrelay::worker {

struct WorkerOptions {
  std::string model_dir;  // a Hugging Face model folder
  std::string model_id;   // names the model in block hashes; default: the folder's name
  std::string listen = "127.0.0.1:0";  // host:port; port 0 picks a free one
  KvStoreOptions kv;
  std::string device = "auto";      // auto | cpu | cuda (kernels::ResolveDevice)
  kernels::BackendOptions backend;  // e.g. --cuda_split_k_decode
  int threads = 0;                  // CPU threads for the forward pass (CPU backend); 0: all cores
  rpc::RegistrySettings registry;   // routers to register with
  // TLS of the server and of every client call; the cluster token internal calls carry
  // and this worker's service requires (rpc/security.h).
  rpc::Security security;
  // The process's Prometheus registry (served on /metrics by the caller); the engine's
  // and the service's series go there. Null: a registry of the worker's own. Takes
  // precedence over the engine options' registry.
  std::shared_ptr<prometheus::Registry> metrics = nullptr;
};

}  // namespace kvrelay::worker

// RegistryService end to end in one process: a real gRPC server on 127.0.0.1 (port 0)
// with the service over a WorkerRegistry, and real workers' side (rpc::RegistryClient
// over a kvcache::PrefixCache) or a raw stub speaking the protocol by hand.
#include "router/registry_service.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/kvcache/block_hash.h"
#include "common/kvcache/prefix_cache.h"
#include "common/rpc/registry_client.h"
#include "gmock/gmock.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/registry.grpc.pb.h"
#include "prometheus/metric_family.h"
#include "prometheus/registry.h"
#include "router/worker_registry.h"
#include "tests/testing/metric_values.h"
#include "tests/testing/wait.h"

namespace kvrelay::router {
namespace {

using ::testing::HasSubstr;

constexpr int kB = 4;  // block size
constexpr char kModel[] = "tiny";

// Polls `pred` every few ms until it holds or `timeout` passes; the last result.
using ::kvrelay::testing::WaitFor;

RegistryOptions Opts() {
  RegistryOptions o;
  o.router_id = "router-under-test";
  o.model_id = kModel;
  o.block_size = kB;
  // Generous: a loaded machine must not expire a healthy worker. Tests of the deadline
  // set their own.
  o.heartbeat_timeout = absl::Seconds(120);
  return o;
}

using ::kvrelay::testing::Metric;

// A router: WorkerRegistry + RegistryService on a real server; its metrics in a registry
// the test reads (M).
class TestRouter {
 public:
  explicit TestRouter(RegistryOptions options = Opts(), int port = 0)
      : metrics_(std::make_shared<prometheus::Registry>()),
        registry_(std::move(options), metrics_),
        service_(&registry_, [this] { ++changes_; }) {
    grpc::ServerBuilder b;
    b.AddListeningPort(absl::StrCat("127.0.0.1:", port), grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(&service_);
    server_ = b.BuildAndStart();
  }
  ~TestRouter() { Stop(); }

  bool ok() const { return server_ != nullptr && port_ > 0; }
  int port() const { return port_; }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }
  WorkerRegistry& registry() { return registry_; }
  int changes() const { return changes_.load(); }
  double M(const std::string& name, const std::map<std::string, std::string>& labels = {}) const {
    return Metric(*metrics_, name, labels);
  }

  // Cancels every open stream (a router going away).
  void Stop() {
    if (server_ == nullptr) return;
    server_->Shutdown(std::chrono::system_clock::now());
    server_->Wait();
    server_.reset();
  }

 private:
  std::shared_ptr<prometheus::Registry> metrics_;
  WorkerRegistry registry_;
  std::atomic<int> changes_{0};
  RegistryService service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

std::optional<v1::WorkerStatus> Find(const v1::ListWorkersResponse& l, const std::string& id) {
  for (const v1::WorkerStatus& w : l.workers()) {
    if (w.registration().worker_id() == id) return w;
  }
  return std::nullopt;
}

int SlotOf(const WorkerRegistry& reg, const std::string& id) {
  FleetView v = reg.View({});
  for (const auto* list : {&v.decode, &v.prefill}) {
    for (const WorkerLoadView& w : *list) {
      if (w.id == id) return w.slot;
    }
  }
  return -1;
}

struct Seq {
  std::vector<int32_t> tokens;
  std::vector<uint64_t> hashes;
};

// A sequence of `blocks` full blocks computed, cached and released (a finished request).
Seq RunSequence(kvcache::PrefixCache& cache, int seed, int blocks) {
  Seq s;
  for (int i = 0; i < blocks * kB; ++i) s.tokens.push_back(seed * 1000 + i);
  s.hashes = kvcache::BlockHashes(kvcache::RootHash(kModel, ""), s.tokens, kB);
  absl::StatusOr<std::vector<int32_t>> ids = cache.Allocate(blocks);
  EXPECT_TRUE(ids.ok()) << ids.status();
  if (!ids.ok()) return s;
  cache.Store(std::nullopt, *ids, s.hashes, s.tokens);
  cache.Release(*ids);
  return s;
}

// A worker: its prefix cache and its registry client.
class TestWorker {
 public:
  TestWorker(const std::string& id, int64_t num_blocks, size_t event_log_capacity = 4096)
      : id_(id) {
    kvcache::PrefixCache::Options o;
    o.num_blocks = num_blocks;
    o.block_size = kB;
    o.incarnation = kvcache::NewIncarnationId();
    o.event_log_capacity = event_log_capacity;
    auto c = kvcache::PrefixCache::Create(o);
    EXPECT_TRUE(c.ok()) << c.status();
    if (c.ok()) cache_ = *std::move(c);
  }

  rpc::RegistryClientOptions Options(const std::vector<std::string>& routers) const {
    rpc::RegistryClientOptions o;
    o.routers = routers;
    v1::WorkerRegistration& r = o.registration;
    r.set_worker_id(id_);
    r.set_role(v1::WORKER_ROLE_DECODE);
    r.set_address("127.0.0.1:1");
    r.set_model_id(kModel);
    r.set_block_size(kB);
    r.set_num_blocks(cache_->num_blocks());
    r.set_incarnation(cache_->incarnation());
    r.set_kv_dtype("f32");
    o.reconnect_min = absl::Milliseconds(20);
    o.reconnect_max = absl::Milliseconds(500);
    return o;
  }

  absl::Status Start(rpc::RegistryClientOptions o) {
    client_ = std::make_unique<rpc::RegistryClient>(std::move(o), cache_.get(), [this] {
      ++reports_;
      v1::LoadReport l;
      l.set_running(3);
      l.set_active_blocks(cache_->counts().in_use);
      l.set_free_blocks(cache_->counts().free);
      return l;
    });
    return client_->Start();
  }
  void Stop() {
    if (client_ != nullptr) client_->Stop();
  }

  const std::string& id() const { return id_; }
  kvcache::PrefixCache& cache() { return *cache_; }
  rpc::RegistryClient& client() { return *client_; }
  int reports() const { return reports_.load(); }

 private:
  std::string id_;
  std::unique_ptr<kvcache::PrefixCache> cache_;
  std::atomic<int> reports_{0};
  std::unique_ptr<rpc::RegistryClient> client_;
};

// The router's view of `w` agrees with its cache: alive, in step, as many blocks,
// every event applied.
bool Mirrors(const WorkerRegistry& reg, TestWorker& w) {
  std::optional<v1::WorkerStatus> s = Find(reg.List(), w.id());
  return s.has_value() && s->alive() && s->synced() &&
         s->indexed_blocks() == w.cache().counts().cached &&
         s->applied_seq() == w.cache().last_event_seq();
}

std::string Describe(const WorkerRegistry& reg, TestWorker& w) {
  return absl::StrCat("router: ", reg.List().ShortDebugString(),
                      "\ncache: cached=", w.cache().counts().cached,
                      " last_event_seq=", w.cache().last_event_seq());
}

// Per sequence: the router's overlap for the worker equals the cache's own lookup.
void ExpectSameOverlaps(const WorkerRegistry& reg, TestWorker& w, const std::vector<Seq>& seqs) {
  const int slot = SlotOf(reg, w.id());
  ASSERT_GE(slot, 0);
  for (size_t i = 0; i < seqs.size(); ++i) {
    FleetView v = reg.View(seqs[i].hashes);
    EXPECT_EQ(v.overlaps[slot], w.cache().Lookup(seqs[i].hashes, seqs[i].tokens))
        << "sequence " << i;
  }
}

TEST(RegistryServiceTest, IndexMirrorsTheWorkersCache) {
  TestRouter router;
  ASSERT_TRUE(router.ok());
  TestWorker w("decode-0", /*num_blocks=*/16);
  std::vector<Seq> seqs;
  seqs.push_back(RunSequence(w.cache(), 1, 3));  // before the worker connects
  ASSERT_TRUE(w.Start(w.Options({router.address()})).ok());

  ASSERT_TRUE(WaitFor([&] { return w.client().connected() == 1; }));
  ASSERT_TRUE(WaitFor([&] { return Mirrors(router.registry(), w); }))
      << Describe(router.registry(), w);
  EXPECT_EQ(router.registry().View(seqs[0].hashes).overlaps[SlotOf(router.registry(), w.id())], 3);
  EXPECT_GE(router.changes(), 1);  // the registration

  // New blocks arrive as stored events.
  for (int s = 2; s <= 5; ++s) {
    seqs.push_back(RunSequence(w.cache(), s, 3));
    ASSERT_TRUE(WaitFor([&] { return Mirrors(router.registry(), w); }))
        << Describe(router.registry(), w);
    ExpectSameOverlaps(router.registry(), w, seqs);
  }
  ASSERT_EQ(w.cache().counts().cached, 15);

  // The pool is full of cached blocks: new ones evict (removed events).
  seqs.push_back(RunSequence(w.cache(), 6, 4));
  seqs.push_back(RunSequence(w.cache(), 7, 2));
  ASSERT_TRUE(WaitFor([&] { return Mirrors(router.registry(), w); }))
      << Describe(router.registry(), w);
  ExpectSameOverlaps(router.registry(), w, seqs);
  const int slot = SlotOf(router.registry(), w.id());
  int evicted = 0;
  for (const Seq& s : seqs) {
    const int64_t held = w.cache().Lookup(s.hashes, s.tokens);
    if (held < static_cast<int64_t>(s.hashes.size())) ++evicted;
  }
  EXPECT_GT(evicted, 0) << "the test should have evicted something";
  EXPECT_EQ(router.registry().View(seqs.back().hashes).overlaps[slot], 2);

  // The load reports arrive too.
  ASSERT_TRUE(WaitFor([&] {
    std::optional<v1::WorkerStatus> s = Find(router.registry().List(), w.id());
    return s.has_value() && s->load().running() == 3;
  }));
  EXPECT_GT(w.reports(), 0);

  // ListWorkers through the generated stub says the same.
  auto stub = v1::Registry::NewStub(
      grpc::CreateChannel(router.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::ListWorkersResponse listed;
  grpc::Status st = stub->ListWorkers(&ctx, v1::ListWorkersRequest(), &listed);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ASSERT_EQ(listed.workers_size(), 1);
  const v1::WorkerStatus& ws = listed.workers(0);
  EXPECT_EQ(ws.registration().worker_id(), "decode-0");
  EXPECT_EQ(ws.registration().incarnation(), w.cache().incarnation());
  EXPECT_EQ(ws.registration().num_blocks(), 16);
  EXPECT_TRUE(ws.alive());
  EXPECT_TRUE(ws.synced());
  EXPECT_EQ(ws.indexed_blocks(), w.cache().counts().cached);
  EXPECT_EQ(ws.applied_seq(), w.cache().last_event_seq());
  EXPECT_EQ(listed.index_blocks(), w.cache().counts().cached);

  // A cleared cache empties the worker's entries.
  w.cache().Clear();
  ASSERT_TRUE(WaitFor([&] { return Mirrors(router.registry(), w); }))
      << Describe(router.registry(), w);
  EXPECT_EQ(router.registry().List().index_blocks(), 0);
  w.Stop();
}

TEST(RegistryServiceTest, TwoWorkersShareTheIndex) {
  TestRouter router;
  ASSERT_TRUE(router.ok());
  TestWorker a("decode-a", 32), b("decode-b", 32);
  ASSERT_TRUE(a.Start(a.Options({router.address()})).ok());
  ASSERT_TRUE(b.Start(b.Options({router.address()})).ok());
  // The same prompt on both, another only on b.
  Seq shared = RunSequence(a.cache(), 1, 4);
  RunSequence(b.cache(), 1, 2);
  Seq only_b = RunSequence(b.cache(), 2, 3);
  ASSERT_TRUE(WaitFor([&] {
    return Mirrors(router.registry(), a) && Mirrors(router.registry(), b);
  })) << Describe(router.registry(), a)
      << "\n"
      << Describe(router.registry(), b);
  const int sa = SlotOf(router.registry(), "decode-a");
  const int sb = SlotOf(router.registry(), "decode-b");
  ASSERT_NE(sa, sb);
  FleetView v = router.registry().View(shared.hashes);
  EXPECT_EQ(v.overlaps[sa], 4);
  EXPECT_EQ(v.overlaps[sb], 2);
  v = router.registry().View(only_b.hashes);
  EXPECT_EQ(v.overlaps[sa], 0);
  EXPECT_EQ(v.overlaps[sb], 3);
  EXPECT_EQ(router.registry().List().index_blocks(), 7);  // 4 shared hashes + 3
  EXPECT_EQ(router.registry().Alive(v1::WORKER_ROLE_DECODE), 2);
}

TEST(RegistryServiceTest, EventLogOverflowFallsBackToASnapshot) {
  TestRouter router;
  ASSERT_TRUE(router.ok());
  // A tiny event log, read rarely: many events in between overflow it, so the client
  // must notice (need_snapshot) and send a snapshot instead; otherwise the router's
  // index never catches up.
  TestWorker w("decode-0", /*num_blocks=*/8, /*event_log_capacity=*/3);
  rpc::RegistryClientOptions o = w.Options({router.address()});
  o.event_poll = absl::Seconds(2);
  std::vector<Seq> seqs;
  seqs.push_back(RunSequence(w.cache(), 1, 2));
  ASSERT_TRUE(w.Start(std::move(o)).ok());
  ASSERT_TRUE(WaitFor([&] { return Mirrors(router.registry(), w); }))
      << Describe(router.registry(), w);
  const uint64_t seq_before = w.cache().last_event_seq();

  // Right after the first snapshot: the next read is ~2 s away.
  for (int s = 2; s <= 9; ++s) seqs.push_back(RunSequence(w.cache(), s, 2));
  ASSERT_GE(w.cache().last_event_seq(), seq_before + 8) << "stores and evictions expected";
  ASSERT_TRUE(WaitFor([&] { return Mirrors(router.registry(), w); }))
      << Describe(router.registry(), w);
  ExpectSameOverlaps(router.registry(), w, seqs);
  EXPECT_EQ(router.registry().View(seqs.back().hashes).overlaps[SlotOf(router.registry(), w.id())],
            2);
  EXPECT_GE(router.M("kvrelay_router_index_resyncs_total"), 2) << "registration, then overflow";
  EXPECT_EQ(router.M("kvrelay_router_index_blocks"), w.cache().counts().cached);
}

TEST(RegistryServiceTest, StoppedClientIsDeadAndItsEntriesLeave) {
  TestRouter router;
  ASSERT_TRUE(router.ok());
  TestWorker w("decode-0", 16);
  ASSERT_TRUE(w.Start(w.Options({router.address()})).ok());
  Seq s = RunSequence(w.cache(), 1, 3);
  ASSERT_TRUE(WaitFor([&] { return Mirrors(router.registry(), w); }))
      << Describe(router.registry(), w);
  ASSERT_EQ(router.registry().List().index_blocks(), 3);
  const int changes = router.changes();
  EXPECT_GE(changes, 1);

  w.Stop();
  EXPECT_EQ(w.client().connected(), 0);
  ASSERT_TRUE(WaitFor([&] {
    std::optional<v1::WorkerStatus> st = Find(router.registry().List(), w.id());
    return st.has_value() && !st->alive();
  })) << router.registry().List().ShortDebugString();
  std::optional<v1::WorkerStatus> st = Find(router.registry().List(), w.id());
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->indexed_blocks(), 0);
  EXPECT_FALSE(st->synced());
  EXPECT_EQ(router.registry().List().index_blocks(), 0);
  EXPECT_EQ(router.registry().MaxOverlap(s.hashes), 0);
  EXPECT_EQ(router.registry().Alive(v1::WORKER_ROLE_DECODE), 0);
  ASSERT_TRUE(WaitFor([&] { return router.changes() > changes; }))
      << "on_change must run when a worker dies";
  EXPECT_EQ(router.M("kvrelay_router_worker_deaths_total", {{"reason", "disconnected"}}), 1);
  EXPECT_EQ(router.M("kvrelay_router_worker_deaths_total", {{"reason", "heartbeat_timeout"}}), 0);
  EXPECT_EQ(router.M("kvrelay_router_workers", {{"role", "decode"}, {"state", "dead"}}), 1);
  EXPECT_EQ(router.M("kvrelay_router_workers", {{"role", "decode"}, {"state", "alive"}}), 0);
  EXPECT_EQ(router.M("kvrelay_router_index_blocks"), 0);
}

TEST(RegistryServiceTest, RestartedRouterIsRebuiltFromSnapshots) {
  auto router = std::make_unique<TestRouter>();
  ASSERT_TRUE(router->ok());
  const int port = router->port();
  TestWorker w("decode-0", 16);
  ASSERT_TRUE(w.Start(w.Options({router->address()})).ok());
  std::vector<Seq> seqs;
  seqs.push_back(RunSequence(w.cache(), 1, 3));
  ASSERT_TRUE(WaitFor([&] { return Mirrors(router->registry(), w); }))
      << Describe(router->registry(), w);

  router.reset();  // the router goes away (streams cancelled)
  ASSERT_TRUE(WaitFor([&] { return w.client().connected() == 0; }));
  // The cache changes while no router listens.
  seqs.push_back(RunSequence(w.cache(), 2, 4));
  seqs.push_back(RunSequence(w.cache(), 3, 2));

  // A new router process on the same address knows nothing; the worker redials by
  // itself and its snapshot rebuilds the index.
  router = std::make_unique<TestRouter>(Opts(), port);
  ASSERT_TRUE(router->ok()) << "could not listen on port " << port << " again";
  ASSERT_EQ(router->port(), port);
  ASSERT_TRUE(WaitFor([&] { return w.client().connected() == 1; }));
  ASSERT_TRUE(WaitFor([&] { return Mirrors(router->registry(), w); }))
      << Describe(router->registry(), w);
  ExpectSameOverlaps(router->registry(), w, seqs);
  EXPECT_EQ(router->registry().List().index_blocks(), 9);
  EXPECT_GE(router->changes(), 1);
  EXPECT_GE(router->M("kvrelay_router_index_resyncs_total"), 1);
  EXPECT_EQ(router->M("kvrelay_router_index_blocks"), 9);

  // ... and events flow again afterwards.
  seqs.push_back(RunSequence(w.cache(), 4, 2));
  ASSERT_TRUE(WaitFor([&] { return Mirrors(router->registry(), w); }))
      << Describe(router->registry(), w);
  ExpectSameOverlaps(router->registry(), w, seqs);
  w.Stop();
}

// --- the protocol by hand ---

using Stream = grpc::ClientReaderWriter<v1::WorkerMessage, v1::RouterMessage>;

class RawWorker {
 public:
  explicit RawWorker(const std::string& address)
      : stub_(v1::Registry::NewStub(
            grpc::CreateChannel(address, grpc::InsecureChannelCredentials()))) {
    // Bounds every blocking Read below: a broken test fails instead of hanging.
    ctx_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    stream_ = stub_->Connect(&ctx_);
  }
  ~RawWorker() {
    ctx_.TryCancel();
    if (reader_.joinable()) reader_.join();
  }

  bool Send(const v1::WorkerMessage& m) { return stream_->Write(m); }
  bool Register(const v1::WorkerRegistration& r) {
    v1::WorkerMessage m;
    *m.mutable_register_() = r;
    return Send(m);
  }
  bool Read(v1::RouterMessage* m) { return stream_->Read(m); }
  // Reads until the router ends the stream; its status.
  grpc::Status ReadToEnd() {
    v1::RouterMessage m;
    while (stream_->Read(&m)) {
    }
    return stream_->Finish();
  }
  // Reads on a thread until the stream ends (ended() then becomes true).
  void ReadInBackground() {
    reader_ = std::thread([this] {
      v1::RouterMessage m;
      while (stream_->Read(&m)) {
      }
      ended_ = true;
    });
  }
  bool ended() const { return ended_.load(); }

 private:
  std::unique_ptr<v1::Registry::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<Stream> stream_;
  std::thread reader_;
  std::atomic<bool> ended_{false};
};

v1::WorkerRegistration Reg(const std::string& id, uint64_t incarnation) {
  v1::WorkerRegistration r;
  r.set_worker_id(id);
  r.set_role(v1::WORKER_ROLE_PREFILL);
  r.set_address("127.0.0.1:2");
  r.set_model_id(kModel);
  r.set_block_size(kB);
  r.set_num_blocks(10);
  r.set_incarnation(incarnation);
  return r;
}

TEST(RegistryServiceTest, ProtocolErrorsEndTheStream) {
  TestRouter router;
  ASSERT_TRUE(router.ok());
  {
    RawWorker raw(router.address());
    v1::WorkerMessage m;
    m.mutable_load()->set_running(1);
    raw.Send(m);
    grpc::Status st = raw.ReadToEnd();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(st.error_message(), HasSubstr("registration"));
  }
  {
    RawWorker raw(router.address());
    v1::WorkerRegistration r = Reg("p", 1);
    r.set_model_id("another");
    raw.Register(r);
    grpc::Status st = raw.ReadToEnd();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(st.error_message(), HasSubstr("another"));
  }
  {
    RawWorker raw(router.address());
    v1::WorkerRegistration r = Reg("p", 1);
    r.set_block_size(kB * 2);
    raw.Register(r);
    EXPECT_EQ(raw.ReadToEnd().error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  }
  {
    RawWorker raw(router.address());
    raw.Register(Reg("", 1));
    EXPECT_EQ(raw.ReadToEnd().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  EXPECT_EQ(router.registry().List().workers_size(), 0);
  EXPECT_EQ(router.changes(), 0);
  {
    RawWorker raw(router.address());
    raw.Register(Reg("p", 1));
    v1::RouterMessage ack;
    ASSERT_TRUE(raw.Read(&ack));
    ASSERT_TRUE(ack.has_ack());
    raw.Register(Reg("p", 1));
    grpc::Status st = raw.ReadToEnd();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(st.error_message(), HasSubstr("twice"));
  }
  // The stream that ended took its worker with it.
  ASSERT_TRUE(WaitFor([&] {
    std::optional<v1::WorkerStatus> s = Find(router.registry().List(), "p");
    return s.has_value() && !s->alive();
  }));
}

TEST(RegistryServiceTest, AckThenSnapshotRequestOnAGap) {
  RegistryOptions o = Opts();
  o.heartbeat_interval = absl::Milliseconds(700);
  TestRouter router(o);
  ASSERT_TRUE(router.ok());
  RawWorker raw(router.address());
  ASSERT_TRUE(raw.Register(Reg("p", 5)));
  v1::RouterMessage m;
  ASSERT_TRUE(raw.Read(&m));
  ASSERT_TRUE(m.has_ack()) << m.ShortDebugString();
  EXPECT_EQ(m.ack().router_id(), "router-under-test");
  EXPECT_EQ(m.ack().heartbeat_interval_ms(), 700u);

  v1::WorkerMessage snap;
  snap.mutable_snapshot()->set_incarnation(5);
  snap.mutable_snapshot()->set_seq(3);
  snap.mutable_snapshot()->add_hashes(11);
  snap.mutable_snapshot()->add_hashes(12);
  ASSERT_TRUE(raw.Send(snap));
  ASSERT_TRUE(WaitFor([&] {
    std::optional<v1::WorkerStatus> s = Find(router.registry().List(), "p");
    return s.has_value() && s->synced() && s->indexed_blocks() == 2 && s->applied_seq() == 3;
  })) << router.registry().List().ShortDebugString();

  // seq 4 expected, 6 comes: the router asks for a snapshot and forgets the worker's blocks.
  v1::WorkerMessage ev;
  ev.mutable_events()->set_incarnation(5);
  v1::KvEventMsg* e = ev.mutable_events()->add_events();
  e->set_type(v1::KvEventMsg::TYPE_STORED);
  e->set_seq(6);
  e->add_hashes(13);
  ASSERT_TRUE(raw.Send(ev));
  ASSERT_TRUE(raw.Read(&m));
  EXPECT_TRUE(m.has_snapshot_request()) << m.ShortDebugString();
  std::optional<v1::WorkerStatus> s = Find(router.registry().List(), "p");
  ASSERT_TRUE(s.has_value());
  EXPECT_FALSE(s->synced());
  EXPECT_EQ(s->indexed_blocks(), 0);

  EXPECT_EQ(router.M("kvrelay_router_index_resyncs_total"), 1);
  EXPECT_EQ(router.M("kvrelay_router_kv_events_total"), 0) << "the event after the gap";

  snap.mutable_snapshot()->set_seq(6);
  snap.mutable_snapshot()->add_hashes(13);
  ASSERT_TRUE(raw.Send(snap));
  ASSERT_TRUE(WaitFor([&] {
    std::optional<v1::WorkerStatus> s = Find(router.registry().List(), "p");
    return s.has_value() && s->synced() && s->indexed_blocks() == 3 && s->applied_seq() == 6;
  })) << router.registry().List().ShortDebugString();
  EXPECT_EQ(router.M("kvrelay_router_index_resyncs_total"), 2) << "the resync after the gap";
  EXPECT_EQ(router.M("kvrelay_router_index_blocks"), 3);

  // In step again: events apply.
  ev.mutable_events()->mutable_events(0)->set_seq(7);
  ev.mutable_events()->mutable_events(0)->set_hashes(0, 14);
  ASSERT_TRUE(raw.Send(ev));
  ASSERT_TRUE(WaitFor([&] { return router.M("kvrelay_router_kv_events_total") == 1; }));
  EXPECT_EQ(router.M("kvrelay_router_index_blocks"), 4);
}

TEST(RegistryServiceTest, SilentWorkerMissesItsDeadline) {
  RegistryOptions o = Opts();
  o.heartbeat_interval = absl::Milliseconds(20);
  o.heartbeat_timeout = absl::Milliseconds(300);
  TestRouter router(o);
  ASSERT_TRUE(router.ok());
  RawWorker raw(router.address());
  ASSERT_TRUE(raw.Register(Reg("p", 5)));
  v1::RouterMessage m;
  ASSERT_TRUE(raw.Read(&m));
  ASSERT_TRUE(m.has_ack());
  EXPECT_EQ(m.ack().heartbeat_interval_ms(), 20u);
  v1::WorkerMessage snap;
  snap.mutable_snapshot()->set_incarnation(5);
  snap.mutable_snapshot()->add_hashes(11);
  ASSERT_TRUE(raw.Send(snap));
  // Then nothing: the sweeper marks it dead and drops its blocks.
  ASSERT_TRUE(WaitFor([&] {
    std::optional<v1::WorkerStatus> s = Find(router.registry().List(), "p");
    return s.has_value() && !s->alive();
  })) << router.registry().List().ShortDebugString();
  EXPECT_EQ(router.registry().List().index_blocks(), 0);
  EXPECT_EQ(router.registry().Alive(v1::WORKER_ROLE_PREFILL), 0);
  ASSERT_TRUE(WaitFor([&] { return router.changes() >= 2; }))
      << "on_change: registration and death";
  EXPECT_EQ(router.M("kvrelay_router_worker_deaths_total", {{"reason", "heartbeat_timeout"}}), 1);
  EXPECT_EQ(router.M("kvrelay_router_worker_deaths_total", {{"reason", "disconnected"}}), 0);
  EXPECT_EQ(router.M("kvrelay_router_workers", {{"role", "prefill"}, {"state", "dead"}}), 1);
  EXPECT_EQ(router.M("kvrelay_router_workers", {{"role", "prefill"}, {"state", "alive"}}), 0);
}

// A worker expired for missing its heartbeat deadline whose stream stays open must not be
// lost to the router: its next message revives it (with a resync from a snapshot).
TEST(RegistryServiceTest, ExpiredWorkerIsNotLeftOnAnOpenStream) {
  RegistryOptions o = Opts();
  o.heartbeat_interval = absl::Milliseconds(20);
  o.heartbeat_timeout = absl::Milliseconds(300);
  TestRouter router(o);
  ASSERT_TRUE(router.ok());
  RawWorker raw(router.address());
  ASSERT_TRUE(raw.Register(Reg("p", 5)));
  v1::RouterMessage m;
  ASSERT_TRUE(raw.Read(&m));
  ASSERT_TRUE(m.has_ack());
  raw.ReadInBackground();
  ASSERT_TRUE(WaitFor([&] {
    std::optional<v1::WorkerStatus> s = Find(router.registry().List(), "p");
    return s.has_value() && !s->alive();
  }));
  // The worker wakes up and reports again on the same stream, regularly.
  bool recovered = false;
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!recovered && absl::Now() < deadline) {
    v1::WorkerMessage load;
    load.mutable_load()->set_running(1);
    if (!raw.Send(load)) {
      recovered = true;  // the router ended the stream: the client would redial
      break;
    }
    std::optional<v1::WorkerStatus> s = Find(router.registry().List(), "p");
    recovered = raw.ended() || (s.has_value() && s->alive());
    if (!recovered) absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_TRUE(recovered)
      << "the expired worker still talks on an open stream that the router ignores";
}

}  // namespace
}  // namespace kvrelay::router

#include "common/rpc/registry_client.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/kvcache/prefix_cache.h"
#include "gmock/gmock.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "router/registry_service.h"
#include "router/worker_registry.h"
#include "tests/testing/wait.h"

namespace kvrelay::rpc {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr int kB = 4;

// Polls `pred` every few ms until it holds or `timeout` passes; the last result.
using ::kvrelay::testing::WaitFor;

// A live router's registry on 127.0.0.1 (port 0).
class TestRouter {
 public:
  explicit TestRouter(const std::string& model_id = "tiny",
                      absl::Duration heartbeat_interval = absl::Milliseconds(500))
      : registry_(Opts(model_id, heartbeat_interval)), service_(&registry_, nullptr) {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(&service_);
    server_ = b.BuildAndStart();
  }
  ~TestRouter() { Stop(); }

  bool ok() const { return server_ != nullptr && port_ > 0; }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }
  router::WorkerRegistry& registry() { return registry_; }
  void Stop() {
    if (server_ == nullptr) return;
    server_->Shutdown(std::chrono::system_clock::now());  // cancels the open streams
    server_->Wait();
    server_.reset();
  }

 private:
  static router::RegistryOptions Opts(const std::string& model_id, absl::Duration hb) {
    router::RegistryOptions o;
    o.model_id = model_id;
    o.block_size = kB;
    o.heartbeat_interval = hb;
    o.heartbeat_timeout = absl::Seconds(120);
    return o;
  }

  router::WorkerRegistry registry_;
  router::RegistryService service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

std::unique_ptr<kvcache::PrefixCache> MakeCache() {
  kvcache::PrefixCache::Options o;
  o.num_blocks = 32;
  o.block_size = kB;
  o.incarnation = kvcache::NewIncarnationId();
  auto c = kvcache::PrefixCache::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

RegistryClientOptions Options(const kvcache::PrefixCache& cache,
                              const std::vector<std::string>& routers) {
  RegistryClientOptions o;
  o.routers = routers;
  v1::WorkerRegistration& r = o.registration;
  r.set_worker_id("decode-0");
  r.set_role(v1::WORKER_ROLE_DECODE);
  r.set_address("127.0.0.1:9");
  r.set_model_id("tiny");
  r.set_block_size(cache.block_size());
  r.set_num_blocks(cache.num_blocks());
  r.set_incarnation(cache.incarnation());
  r.set_kv_dtype("f32");
  o.reconnect_min = absl::Milliseconds(20);
  o.reconnect_max = absl::Milliseconds(500);
  return o;
}

v1::LoadReport NoLoad() { return v1::LoadReport(); }

std::optional<v1::WorkerStatus> Find(const router::WorkerRegistry& reg, const std::string& id) {
  v1::ListWorkersResponse l = reg.List();
  for (const v1::WorkerStatus& w : l.workers()) {
    if (w.registration().worker_id() == id) return w;
  }
  return std::nullopt;
}

TEST(ParseRouterListTest, GoodLists) {
  auto r = ParseRouterList("", "--routers");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->empty());

  r = ParseRouterList("router-0.kvrelay:50050", "--routers");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(*r, ElementsAre("router-0.kvrelay:50050"));

  r = ParseRouterList("a:1,10.0.0.2:65535,[::1]:50050", "--routers");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(*r, ElementsAre("a:1", "10.0.0.2:65535", "[::1]:50050"));

  // dns:/// entries stand for every address the name resolves to.
  r = ParseRouterList("dns:///kvrelay-router-headless.ns.svc.cluster.local:50050,b:2", "--routers");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(*r, ElementsAre("dns:///kvrelay-router-headless.ns.svc.cluster.local:50050", "b:2"));

  // Empty entries (a trailing comma) are skipped.
  r = ParseRouterList("a:1,,b:2,", "--routers");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(*r, ElementsAre("a:1", "b:2"));
}

// Spaces around an entry are trimmed (" b:2" would be a host that never resolves).
TEST(ParseRouterListTest, SpacesAroundEntriesAreTrimmed) {
  auto r = ParseRouterList("a:1, b:2 ,  c:3", "--routers");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(*r, ElementsAre("a:1", "b:2", "c:3"));
  r = ParseRouterList("  ", "--routers");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->empty());
}

TEST(ParseRouterListTest, BadEntriesNameTheFlag) {
  for (const char* bad : {"a", "a:", ":5000", "a:0", "a:65536", "a:-1", "a:x", "a:1,b", "a:1,b:2x",
                          "dns:///a", "dns:///:5", "dns:///[::1]:5", "dns://a:5"}) {
    SCOPED_TRACE(bad);
    auto r = ParseRouterList(bad, "--routers");
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("--routers"));
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("host:port"));
  }
  EXPECT_THAT(std::string(ParseRouterList("dns:///a", "--router").status().message()),
              HasSubstr("'dns:///a'"));
  auto r = ParseRouterList("good:1,oops", "--prefill_routers");
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("--prefill_routers"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("oops"));
}

TEST(ResolveRouterAddressesTest, LocalhostAndAnUnknownName) {
  auto a = ResolveRouterAddresses("localhost", 5000);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_THAT(*a, ::testing::Contains("127.0.0.1:5000"));
  for (const std::string& address : *a) {  // IPv6 in brackets, never twice
    EXPECT_TRUE(address == "127.0.0.1:5000" || address == "[::1]:5000") << address;
    EXPECT_EQ(std::count(a->begin(), a->end(), address), 1);
  }
  a = ResolveRouterAddresses("10.1.2.3", 7);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_THAT(*a, ElementsAre("10.1.2.3:7"));
  a = ResolveRouterAddresses("no-such-host.invalid", 7);  // RFC 6761: never resolves
  ASSERT_FALSE(a.ok());
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("no-such-host.invalid"));
}

TEST(StartRegistryClientTest, NoRoutersNoClient) {
  auto cache = MakeCache();
  RegistrySettings s;  // no routers
  auto c = StartRegistryClient(s, v1::WORKER_ROLE_DECODE, 5000, "tiny", cache.get(), "f32", NoLoad);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(*c, nullptr);
}

TEST(StartRegistryClientTest, RegistersWhatTheSettingsSay) {
  TestRouter router;
  ASSERT_TRUE(router.ok());
  auto cache = MakeCache();
  RegistrySettings s;
  s.routers = {router.address()};
  auto c =
      StartRegistryClient(s, v1::WORKER_ROLE_DECODE, 7001, "tiny", cache.get(), "bf16", NoLoad);
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_NE(*c, nullptr);
  ASSERT_TRUE(WaitFor([&] { return (*c)->connected() == 1; }));
  // The default worker id is the role and the advertised address.
  std::optional<v1::WorkerStatus> w = Find(router.registry(), "decode-127.0.0.1:7001");
  ASSERT_TRUE(w.has_value()) << router.registry().List().ShortDebugString();
  const v1::WorkerRegistration& r = w->registration();
  EXPECT_EQ(r.role(), v1::WORKER_ROLE_DECODE);
  EXPECT_EQ(r.address(), "127.0.0.1:7001");
  EXPECT_EQ(r.model_id(), "tiny");
  EXPECT_EQ(r.block_size(), kB);
  EXPECT_EQ(r.num_blocks(), 32);
  EXPECT_EQ(r.incarnation(), cache->incarnation());
  EXPECT_EQ(r.kv_dtype(), "bf16");

  RegistrySettings named;
  named.routers = {router.address()};
  named.worker_id = "p-zero";
  named.advertise_host = "10.1.2.3";
  auto p =
      StartRegistryClient(named, v1::WORKER_ROLE_PREFILL, 7002, "tiny", cache.get(), "f32", NoLoad);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_NE(*p, nullptr);
  ASSERT_TRUE(WaitFor([&] { return (*p)->connected() == 1; }));
  w = Find(router.registry(), "p-zero");
  ASSERT_TRUE(w.has_value()) << router.registry().List().ShortDebugString();
  EXPECT_EQ(w->registration().role(), v1::WORKER_ROLE_PREFILL);
  EXPECT_EQ(w->registration().address(), "10.1.2.3:7002");

  RegistrySettings unnamed_prefill;
  unnamed_prefill.routers = {router.address()};
  auto q = StartRegistryClient(unnamed_prefill, v1::WORKER_ROLE_PREFILL, 7003, "tiny", cache.get(),
                               "f32", NoLoad);
  ASSERT_TRUE(q.ok()) << q.status();
  ASSERT_TRUE(WaitFor([&] { return (*q)->connected() == 1; }));
  EXPECT_TRUE(Find(router.registry(), "prefill-127.0.0.1:7003").has_value());

  // Incomplete settings are refused.
  auto bad = StartRegistryClient(s, v1::WORKER_ROLE_DECODE, 7004, "", cache.get(), "f32", NoLoad);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("model_id"));
}

TEST(RegistryClientTest, StartRefusesAnIncompleteRegistration) {
  auto cache = MakeCache();
  struct Case {
    const char* field;
    void (*mutate)(RegistryClientOptions*);
  };
  const Case cases[] = {
      {"worker_id", [](RegistryClientOptions* o) { o->registration.clear_worker_id(); }},
      {"role",
       [](RegistryClientOptions* o) { o->registration.set_role(v1::WORKER_ROLE_UNSPECIFIED); }},
      {"address", [](RegistryClientOptions* o) { o->registration.clear_address(); }},
      {"model_id", [](RegistryClientOptions* o) { o->registration.clear_model_id(); }},
      {"block_size", [](RegistryClientOptions* o) { o->registration.set_block_size(0); }},
      {"num_blocks", [](RegistryClientOptions* o) { o->registration.set_num_blocks(0); }},
      {"event_poll", [](RegistryClientOptions* o) { o->event_poll = absl::ZeroDuration(); }},
      {"heartbeat", [](RegistryClientOptions* o) { o->heartbeat = -absl::Seconds(1); }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.field);
    RegistryClientOptions o = Options(*cache, {"127.0.0.1:1"});
    c.mutate(&o);
    RegistryClient client(std::move(o), cache.get(), NoLoad);
    absl::Status s = client.Start();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.field));
    EXPECT_EQ(client.connected(), 0);
  }
  // The complete one starts (and stops even though nothing listens there).
  RegistryClient client(Options(*cache, {"127.0.0.1:1"}), cache.get(), NoLoad);
  EXPECT_TRUE(client.Start().ok());
  EXPECT_EQ(client.connected(), 0);
  client.Stop();
  client.Stop();  // twice: harmless
}

TEST(RegistryClientTest, ConnectedFollowsTheRouter) {
  auto router = std::make_unique<TestRouter>();
  ASSERT_TRUE(router->ok());
  auto cache = MakeCache();
  RegistryClient client(Options(*cache, {router->address()}), cache.get(), NoLoad);
  ASSERT_TRUE(client.Start().ok());
  ASSERT_TRUE(WaitFor([&] { return client.connected() == 1; }));
  ASSERT_TRUE(WaitFor([&] {
    std::optional<v1::WorkerStatus> w = Find(router->registry(), "decode-0");
    return w.has_value() && w->alive() && w->synced();
  }));

  router->Stop();
  ASSERT_TRUE(WaitFor([&] { return client.connected() == 0; }));
  router.reset();
  client.Stop();
  EXPECT_EQ(client.connected(), 0);
}

TEST(RegistryClientTest, CountsOnlyRoutersThatAcked) {
  TestRouter good;
  TestRouter other_model("another-model");  // refuses the registration
  ASSERT_TRUE(good.ok());
  ASSERT_TRUE(other_model.ok());
  auto cache = MakeCache();
  RegistryClient client(Options(*cache, {good.address(), other_model.address(), "127.0.0.1:1"}),
                        cache.get(), NoLoad);
  ASSERT_TRUE(client.Start().ok());
  ASSERT_TRUE(WaitFor([&] { return client.connected() == 1; }));
  ASSERT_TRUE(WaitFor([&] { return Find(good.registry(), "decode-0").has_value(); }));
  EXPECT_EQ(other_model.registry().List().workers_size(), 0);
  EXPECT_EQ(client.connected(), 1);
  client.Stop();
  EXPECT_EQ(client.connected(), 0);
}

// A dns:/// entry (a headless Service over the router replicas): one stream per
// address the name resolves to, following the answers; a failed lookup keeps the last.
TEST(RegistryClientTest, DnsEntryKeepsAStreamToEveryAddressItResolvesTo) {
  TestRouter a;
  TestRouter b;
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(b.ok());
  auto cache = MakeCache();
  absl::Mutex mu;
  absl::StatusOr<std::vector<std::string>> answer = std::vector<std::string>{a.address()};
  std::atomic<int> lookups{0};
  RegistryClientOptions o = Options(*cache, {"dns:///routers.test:50050"});
  o.resolve_interval = absl::Milliseconds(20);
  o.resolver = [&](const std::string& host, int port) {
    EXPECT_EQ(host, "routers.test");
    EXPECT_EQ(port, 50050);
    absl::MutexLock l(&mu);
    ++lookups;
    return answer;
  };
  auto set_answer = [&](absl::StatusOr<std::vector<std::string>> v) {
    absl::MutexLock l(&mu);
    answer = std::move(v);
    return lookups.load();
  };
  RegistryClient client(std::move(o), cache.get(), NoLoad);
  ASSERT_TRUE(client.Start().ok());
  ASSERT_TRUE(WaitFor([&] { return client.connected() == 1; }));
  EXPECT_THAT(client.routers(), ElementsAre(a.address()));
  ASSERT_TRUE(WaitFor([&] { return Find(a.registry(), "decode-0").has_value(); }));

  // A second replica appears.
  set_answer(std::vector<std::string>{a.address(), b.address()});
  ASSERT_TRUE(WaitFor([&] { return client.connected() == 2; }));
  ASSERT_TRUE(WaitFor([&] {
    std::optional<v1::WorkerStatus> w = Find(b.registry(), "decode-0");
    return w.has_value() && w->alive();
  }));

  // The first one goes away: its stream is closed, the router sees the worker leave.
  set_answer(std::vector<std::string>{b.address()});
  ASSERT_TRUE(WaitFor([&] { return client.routers() == std::vector<std::string>{b.address()}; }));
  ASSERT_TRUE(WaitFor([&] {
    std::optional<v1::WorkerStatus> w = Find(a.registry(), "decode-0");
    return !w.has_value() || !w->alive();
  }));
  EXPECT_EQ(client.connected(), 1);

  // A failed lookup keeps what the last good one said.
  const int before = set_answer(absl::UnavailableError("dns down"));
  ASSERT_TRUE(WaitFor([&] { return lookups.load() >= before + 3; }));
  EXPECT_THAT(client.routers(), ElementsAre(b.address()));
  EXPECT_EQ(client.connected(), 1);
  client.Stop();
  EXPECT_EQ(client.connected(), 0);
  EXPECT_TRUE(client.routers().empty());
}

// A name with no address yet (no router pod) is asked again soon, not after the interval.
TEST(RegistryClientTest, DnsEntryNotResolvedYetIsRetriedWithinASecond) {
  TestRouter router;
  ASSERT_TRUE(router.ok());
  auto cache = MakeCache();
  std::atomic<int> lookups{0};
  RegistryClientOptions o = Options(*cache, {"dns:///routers.test:50050"});
  o.resolve_interval = absl::Hours(1);
  o.resolver = [&](const std::string&, int) -> absl::StatusOr<std::vector<std::string>> {
    if (++lookups < 3) return absl::NotFoundError("no such name yet");
    return std::vector<std::string>{router.address()};
  };
  RegistryClient client(std::move(o), cache.get(), NoLoad);
  ASSERT_TRUE(client.Start().ok());
  ASSERT_TRUE(WaitFor([&] { return client.connected() == 1; }));
  EXPECT_EQ(lookups.load(), 3);
  client.Stop();
}

// The real resolver: localhost is 127.0.0.1 (where the router listens) and maybe ::1.
TEST(RegistryClientTest, DnsEntryWithTheSystemResolver) {
  TestRouter router;
  ASSERT_TRUE(router.ok());
  auto cache = MakeCache();
  const std::string port = router.address().substr(router.address().rfind(':') + 1);
  RegistryClient client(Options(*cache, {"dns:///localhost:" + port}), cache.get(), NoLoad);
  ASSERT_TRUE(client.Start().ok());
  ASSERT_TRUE(WaitFor([&] { return client.connected() == 1; }));
  EXPECT_THAT(client.routers(), ::testing::Contains(router.address()));
  ASSERT_TRUE(WaitFor([&] { return Find(router.registry(), "decode-0").has_value(); }));
  client.Stop();
}

// Load reports follow the heartbeat even when KV events are polled rarely (a worker
// tuned to batch its events must not be declared dead).
TEST(RegistryClientTest, LoadReportsFollowTheHeartbeatNotTheEventPoll) {
  TestRouter router("tiny", /*heartbeat_interval=*/absl::Milliseconds(50));
  ASSERT_TRUE(router.ok());
  auto cache = MakeCache();
  RegistryClientOptions o = Options(*cache, {router.address()});
  o.event_poll = absl::Seconds(10);
  o.heartbeat = absl::Milliseconds(50);
  std::atomic<int> reports{0};
  RegistryClient client(std::move(o), cache.get(), [&reports] {
    ++reports;
    return v1::LoadReport();
  });
  ASSERT_TRUE(client.Start().ok());
  ASSERT_TRUE(WaitFor([&] { return client.connected() == 1; }));
  // 50 ms apart, 5 reports take ~0.25 s; a generous bound that still fails when the
  // reports only come every event_poll (10 s).
  EXPECT_TRUE(WaitFor([&] { return reports.load() >= 5; }, absl::Seconds(5)))
      << "load reports sent: " << reports.load();
  client.Stop();
}

}  // namespace
}  // namespace kvrelay::rpc

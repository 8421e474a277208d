#include "common/util/stop_signal.h"

#include <signal.h>
#include <unistd.h>

#include <thread>

#include "gtest/gtest.h"

namespace kvrelay {
namespace {

TEST(StopSignalTest, SignalsWakeTheWaiterWithTheirNumber) {
  ASSERT_TRUE(InstallStopSignals().ok());
  ASSERT_TRUE(InstallStopSignals().ok());  // idempotent
  ASSERT_EQ(::raise(SIGTERM), 0);          // the handler runs: the process is not killed
  EXPECT_EQ(WaitForStopSignal(), SIGTERM);
  // From another thread too (gRPC's threads may take the signal).
  std::thread t([] { ::kill(::getpid(), SIGINT); });
  EXPECT_EQ(WaitForStopSignal(), SIGINT);
  t.join();
}

}  // namespace
}  // namespace kvrelay

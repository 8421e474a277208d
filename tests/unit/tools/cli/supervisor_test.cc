#include "tools/cli/supervisor.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <set>
#include <sstream>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::cli {
namespace {

using ::testing::HasSubstr;
using Kind = Supervisor::Event::Kind;

constexpr absl::Duration kBound = absl::Seconds(60);

std::vector<std::string> Sh(const std::string& script) { return {"/bin/sh", "-c", script}; }

// The next event that is not a timeout, within kBound.
Supervisor::Event NextEvent(Supervisor& s) { return s.Next(absl::Now() + kBound); }

void ExpectLine(Supervisor& s, const std::string& child, const std::string& line) {
  Supervisor::Event e = NextEvent(s);
  EXPECT_EQ(e.kind, Kind::kLine);
  EXPECT_EQ(e.child, child);
  EXPECT_EQ(e.line, line);
}

TEST(SupervisorTest, LinesComeBeforeTheExit) {
  std::ostringstream log;
  auto s = Supervisor::Create(log);
  ASSERT_TRUE(s.ok()) << s.status();
  auto pid = (*s)->Start("a", Sh("echo 'READY 7'; echo second; printf 'no newline'; exit 3"));
  ASSERT_TRUE(pid.ok()) << pid.status();
  EXPECT_TRUE((*s)->Running("a"));
  ExpectLine(**s, "a", "READY 7");
  ExpectLine(**s, "a", "second");
  ExpectLine(**s, "a", "no newline");
  Supervisor::Event e = NextEvent(**s);
  ASSERT_EQ(e.kind, Kind::kExit);
  EXPECT_EQ(e.child, "a");
  EXPECT_EQ(e.pid, *pid);
  ASSERT_TRUE(WIFEXITED(e.status));
  EXPECT_EQ(WEXITSTATUS(e.status), 3);
  EXPECT_FALSE((*s)->Running("a"));
  EXPECT_EQ(DescribeWaitStatus(e.status), "exited with status 3");
  // Nothing else happens: a short deadline times out.
  EXPECT_EQ((*s)->Next(absl::Now() + absl::Milliseconds(20)).kind, Kind::kTimeout);
}

TEST(SupervisorTest, ChildHasNoStdinAndOwnProcessGroup) {
  std::ostringstream log;
  auto s = Supervisor::Create(log);
  ASSERT_TRUE(s.ok());
  auto pid = (*s)->Start("a", Sh("read x; echo \"got:$x:$?\"; cut -d' ' -f5 /proc/$$/stat"));
  ASSERT_TRUE(pid.ok());
  ExpectLine(**s, "a", "got::1");  // read hit EOF (/dev/null)
  ExpectLine(**s, "a", std::to_string(*pid));
  EXPECT_EQ(NextEvent(**s).kind, Kind::kExit);
}

TEST(SupervisorTest, StartFailsWhenTheBinaryCannotRun) {
  std::ostringstream log;
  auto s = Supervisor::Create(log);
  ASSERT_TRUE(s.ok());
  auto pid = (*s)->Start("x", {"/nonexistent/kvrelay-router", "--flag"});
  ASSERT_FALSE(pid.ok());
  EXPECT_THAT(pid.status().message(), HasSubstr("cannot run /nonexistent/kvrelay-router"));
  EXPECT_TRUE((*s)->RunningChildren().empty());
  ASSERT_TRUE((*s)->Start("y", Sh("exit 0")).ok());
  EXPECT_FALSE((*s)->Start("y", Sh("exit 0")).ok());  // names are unique
}

TEST(SupervisorTest, OnlyOneAtATime) {
  std::ostringstream log;
  auto s = Supervisor::Create(log);
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(Supervisor::Create(log).ok());
  s->reset();
  EXPECT_TRUE(Supervisor::Create(log).ok());
}

TEST(SupervisorTest, StopIsGracefulWhenTheChildObeysSigterm) {
  std::ostringstream log;
  auto s = Supervisor::Create(log);
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE(
      (*s)->Start("w", Sh("trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.05; done"))
          .ok());
  ASSERT_TRUE(
      (*s)->Start("other", Sh("trap 'exit 0' TERM; echo up; while :; do sleep 0.05; done")).ok());
  // Two children: their lines arrive in either order.
  std::multiset<std::string> up;
  for (int i = 0; i < 2; ++i) {
    Supervisor::Event e = NextEvent(**s);
    EXPECT_EQ(e.kind, Kind::kLine);
    EXPECT_EQ(e.line, "up");
    up.insert(e.child);
  }
  EXPECT_EQ(up, (std::multiset<std::string>{"other", "w"}));
  (*s)->Stop({"w"}, kBound);
  ASSERT_EQ((*s)->stopped().size(), 1u);
  EXPECT_EQ((*s)->stopped()[0].first, "w");
  EXPECT_TRUE(WIFEXITED((*s)->stopped()[0].second));
  EXPECT_EQ(WEXITSTATUS((*s)->stopped()[0].second), 0);
  EXPECT_THAT(log.str(), HasSubstr("[w] bye"));  // lines during Stop go to the log
  EXPECT_EQ((*s)->RunningChildren(), std::vector<std::string>{"other"});
  (*s)->StopAll(kBound);
  EXPECT_TRUE((*s)->RunningChildren().empty());
}

TEST(SupervisorTest, StopKillsAChildThatIgnoresSigterm) {
  std::ostringstream log;
  auto s = Supervisor::Create(log);
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE(
      (*s)->Start("stubborn", Sh("trap '' TERM; echo up; while :; do sleep 0.05; done")).ok());
  ExpectLine(**s, "stubborn", "up");
  const absl::Time start = absl::Now();
  (*s)->Stop({"stubborn"}, absl::Milliseconds(300));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(300));
  ASSERT_EQ((*s)->stopped().size(), 1u);
  ASSERT_TRUE(WIFSIGNALED((*s)->stopped()[0].second));
  EXPECT_EQ(WTERMSIG((*s)->stopped()[0].second), SIGKILL);
  EXPECT_THAT(log.str(), HasSubstr("grace period over, killing: stubborn"));
}

TEST(SupervisorTest, StopSignalsBecomeEvents) {
  std::ostringstream log;
  auto s = Supervisor::Create(log);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(::raise(SIGTERM), 0);  // handled: the test keeps running
  Supervisor::Event e = NextEvent(**s);
  EXPECT_EQ(e.kind, Kind::kSignal);
  EXPECT_EQ(e.signal, SIGTERM);
  ASSERT_EQ(::raise(SIGINT), 0);
  e = NextEvent(**s);
  EXPECT_EQ(e.kind, Kind::kSignal);
  EXPECT_EQ(e.signal, SIGINT);
}

TEST(SupervisorTest, ASecondSignalDuringStopKillsAtOnce) {
  std::ostringstream log;
  auto s = Supervisor::Create(log);
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE(
      (*s)->Start("stubborn", Sh("trap '' TERM; echo up; while :; do sleep 0.05; done")).ok());
  ExpectLine(**s, "stubborn", "up");
  ASSERT_EQ(::raise(SIGINT), 0);  // already pending when Stop starts waiting
  const absl::Time start = absl::Now();
  (*s)->Stop({"stubborn"}, kBound);
  EXPECT_LT(absl::Now() - start, absl::Seconds(30));
  ASSERT_EQ((*s)->stopped().size(), 1u);
  EXPECT_TRUE(WIFSIGNALED((*s)->stopped()[0].second));
  EXPECT_THAT(log.str(), HasSubstr("second signal"));
}

TEST(SupervisorTest, DestructorKillsAndReapsRunningChildren) {
  pid_t pid = -1;
  {
    std::ostringstream log;
    auto s = Supervisor::Create(log);
    ASSERT_TRUE(s.ok());
    auto p = (*s)->Start("sleeper", Sh("trap '' TERM; echo up; while :; do sleep 0.05; done"));
    ASSERT_TRUE(p.ok());
    pid = *p;
    ExpectLine(**s, "sleeper", "up");
  }
  errno = 0;
  EXPECT_NE(::kill(pid, 0), 0);  // reaped: no such process
  EXPECT_EQ(errno, ESRCH);
}

TEST(SupervisorTest, DescribesSignals) {
  EXPECT_THAT(DescribeWaitStatus(SIGKILL), HasSubstr("killed by signal 9"));
}

}  // namespace
}  // namespace kvrelay::cli

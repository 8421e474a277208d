#include "tools/cli/supervisor.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

extern char** environ;

namespace kvrelay::cli {
namespace {

constexpr int kHandled[] = {SIGINT, SIGTERM, SIGHUP, SIGCHLD};
constexpr size_t kNumHandled = sizeof(kHandled) / sizeof(kHandled[0]);

// Signal handler state. Only one Supervisor exists at a time (checked by Create).
std::atomic<bool> g_active{false};
int g_wake_fd = -1;  // write end of the self-pipe
volatile sig_atomic_t g_stop_count = 0;
volatile sig_atomic_t g_last_stop_signal = 0;
struct sigaction g_previous[kNumHandled];

void OnSignal(int sig) {
  const int saved = errno;
  if (sig != SIGCHLD) {
    g_last_stop_signal = sig;
    g_stop_count = g_stop_count + 1;
  }
  const char c = static_cast<char>(sig);
  (void)!::write(g_wake_fd, &c, 1);  // non-blocking: a full pipe already means "wake up"
  errno = saved;
}

void CloseFd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

}  // namespace

std::string DescribeWaitStatus(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    const char* name = ::strsignal(sig);
    return absl::StrCat("killed by signal ", sig, " (", name != nullptr ? name : "?", ")",
                        WCOREDUMP(status) ? ", core dumped" : "");
  }
  return absl::StrCat("wait status ", status);
}

absl::StatusOr<std::unique_ptr<Supervisor>> Supervisor::Create(std::ostream& log) {
  bool expected = false;
  if (!g_active.compare_exchange_strong(expected, true)) {
    return absl::FailedPreconditionError("only one Supervisor may exist at a time");
  }
  std::unique_ptr<Supervisor> s(new Supervisor(log));
  if (::pipe2(s->wake_fds_, O_CLOEXEC | O_NONBLOCK) != 0) {
    g_active = false;
    return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
  }
  g_wake_fd = s->wake_fds_[1];
  g_stop_count = 0;
  g_last_stop_signal = 0;
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  for (int sig : kHandled) sigaddset(&sa.sa_mask, sig);  // handlers never interleave
  for (size_t i = 0; i < kNumHandled; ++i) {
    sa.sa_flags = SA_RESTART | (kHandled[i] == SIGCHLD ? SA_NOCLDSTOP : 0);
    ::sigaction(kHandled[i], &sa, &g_previous[i]);
  }
  return s;
}

Supervisor::~Supervisor() {
  for (auto& c : children_) {
    if (!c->reaped) {
      KillGroup(*c, SIGKILL);
      int status;
      while (::waitpid(c->pid, &status, 0) < 0 && errno == EINTR) {
      }
      c->reaped = true;
    }
    CloseFd(c->out_fd);
  }
  for (size_t i = 0; i < kNumHandled; ++i) ::sigaction(kHandled[i], &g_previous[i], nullptr);
  g_wake_fd = -1;
  CloseFd(wake_fds_[0]);
  CloseFd(wake_fds_[1]);
  g_active = false;
}

Supervisor::Child* Supervisor::Find(const std::string& name) {
  for (auto& c : children_)
    if (c->name == name) return c.get();
  return nullptr;
}

const Supervisor::Child* Supervisor::Find(const std::string& name) const {
  for (const auto& c : children_)
    if (c->name == name) return c.get();
  return nullptr;
}

absl::StatusOr<pid_t> Supervisor::Start(const std::string& name,
                                        const std::vector<std::string>& argv) {
  if (argv.empty()) return absl::InvalidArgumentError("empty command");
  if (Find(name) != nullptr) return absl::InvalidArgumentError("duplicate child name " + name);
  // Everything the child needs is prepared before fork: between fork and exec it may
  // only call async-signal-safe functions.
  std::vector<std::string> args = argv;
  std::vector<char*> cargv;
  for (std::string& a : args) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  int out[2], exec_err[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return absl::InternalError("pipe: " + std::to_string(errno));
  if (::pipe2(exec_err, O_CLOEXEC) != 0) {
    ::close(out[0]);
    ::close(out[1]);
    return absl::InternalError("pipe: " + std::to_string(errno));
  }
  const int devnull = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid == 0) {
    for (int sig : kHandled) ::signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::setpgid(0, 0);
    int e = 0;
    if (::prctl(PR_SET_PDEATHSIG, SIGTERM) != 0) e = errno;
    // The parent may have died before the prctl: then no signal would ever come.
    if (e == 0 && ::getppid() != parent) ::_exit(127);
    if (e == 0 && devnull >= 0 && ::dup2(devnull, 0) < 0) e = errno;
    if (e == 0 && ::dup2(out[1], 1) < 0) e = errno;
    if (e == 0) {
      ::execve(cargv[0], cargv.data(), environ);
      e = errno;
    }
    (void)!::write(exec_err[1], &e, sizeof(e));
    ::_exit(127);
  }
  const int fork_errno = errno;
  ::close(out[1]);
  ::close(exec_err[1]);
  if (devnull >= 0) ::close(devnull);
  if (pid < 0) {
    ::close(out[0]);
    ::close(exec_err[0]);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(fork_errno)));
  }
  ::setpgid(pid, pid);  // also here, so the group exists before this returns (no race)
  // The error pipe closes on a successful exec (O_CLOEXEC); otherwise it carries errno.
  int child_errno = 0;
  ssize_t n;
  while ((n = ::read(exec_err[0], &child_errno, sizeof(child_errno))) < 0 && errno == EINTR) {
  }
  ::close(exec_err[0]);
  if (n > 0) {
    int status;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    ::close(out[0]);
    return absl::FailedPreconditionError(
        absl::StrCat("cannot run ", argv[0], ": ", std::strerror(child_errno)));
  }
  ::fcntl(out[0], F_SETFL, ::fcntl(out[0], F_GETFL) | O_NONBLOCK);
  auto c = std::make_unique<Child>();
  c->name = name;
  c->pid = pid;
  c->out_fd = out[0];
  children_.push_back(std::move(c));
  return pid;
}

void Supervisor::ReadOutput(Child& c, bool until_eof) {
  char buf[16384];
  while (c.out_fd >= 0) {
    const ssize_t n = ::read(c.out_fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n > 0) {
      c.buffer.append(buf, static_cast<size_t>(n));
      for (size_t nl; (nl = c.buffer.find('\n')) != std::string::npos;) {
        Event e;
        e.kind = Event::Kind::kLine;
        e.child = c.name;
        e.pid = c.pid;
        e.line = c.buffer.substr(0, nl);
        c.buffer.erase(0, nl + 1);
        pending_.push_back(std::move(e));
      }
      if (!until_eof) return;  // one read per wake-up; poll says when there is more
      continue;
    }
    // EOF, or nothing more for now (EAGAIN: a grandchild may still hold the pipe).
    if (n == 0 || until_eof) {
      if (!c.buffer.empty()) {
        Event e;
        e.kind = Event::Kind::kLine;
        e.child = c.name;
        e.pid = c.pid;
        e.line = std::move(c.buffer);
        c.buffer.clear();
        pending_.push_back(std::move(e));
      }
      CloseFd(c.out_fd);
    }
    return;
  }
}

void Supervisor::ReapExited() {
  for (auto& c : children_) {
    if (c->reaped) continue;
    int status = 0;
    pid_t r;
    while ((r = ::waitpid(c->pid, &status, WNOHANG)) < 0 && errno == EINTR) {
    }
    if (r != c->pid) continue;
    c->reaped = true;
    ReadOutput(*c, /*until_eof=*/true);  // its last lines come before its exit
    Event e;
    e.kind = Event::Kind::kExit;
    e.child = c->name;
    e.pid = c->pid;
    e.status = status;
    pending_.push_back(std::move(e));
  }
}

Supervisor::Event Supervisor::Next(absl::Time deadline) {
  for (;;) {
    if (g_stop_count != signals_seen_) {
      signals_seen_ = g_stop_count;
      Event e;
      e.kind = Event::Kind::kSignal;
      e.signal = g_last_stop_signal;
      return e;
    }
    ReapExited();
    if (!pending_.empty()) {
      Event e = std::move(pending_.front());
      pending_.pop_front();
      return e;
    }
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return Event{};
    std::vector<pollfd> fds = {{wake_fds_[0], POLLIN, 0}};
    std::vector<Child*> owners = {nullptr};
    for (auto& c : children_) {
      if (c->out_fd < 0) continue;
      fds.push_back({c->out_fd, POLLIN, 0});
      owners.push_back(c.get());
    }
    // The self-pipe wakes us for signals and child exits; the 1 s cap is only a
    // safety net.
    const int timeout_ms =
        static_cast<int>(std::clamp<int64_t>(absl::ToInt64Milliseconds(left) + 1, 1, 1000));
    const int r = ::poll(fds.data(), fds.size(), timeout_ms);
    if (r <= 0) continue;  // timeout or EINTR: re-check everything
    if (fds[0].revents != 0) {
      char drain[256];
      while (::read(wake_fds_[0], drain, sizeof(drain)) > 0) {
      }
    }
    for (size_t i = 1; i < fds.size(); ++i) {
      if (fds[i].revents != 0) ReadOutput(*owners[i], /*until_eof=*/false);
    }
  }
}

void Supervisor::KillGroup(Child& c, int sig) {
  if (c.reaped) return;
  // The child leads its own group; the group id cannot be reused while it is unreaped.
  if (::kill(-c.pid, sig) != 0) ::kill(c.pid, sig);
}

void Supervisor::Signal(const std::string& name, int sig) {
  if (Child* c = Find(name)) KillGroup(*c, sig);
}

void Supervisor::Stop(const std::vector<std::string>& names, absl::Duration grace) {
  std::set<std::string> waiting;
  const int first = escalated_ ? SIGKILL : SIGTERM;
  for (const std::string& n : names) {
    Child* c = Find(n);
    if (c == nullptr || c->reaped) continue;
    KillGroup(*c, first);
    waiting.insert(n);
  }
  bool killed = escalated_;
  absl::Time deadline = absl::Now() + (killed ? absl::Seconds(10) : grace);
  while (!waiting.empty()) {
    Event e = Next(deadline);
    switch (e.kind) {
      case Event::Kind::kLine:
        log_ << "[" << e.child << "] " << e.line << "\n" << std::flush;
        break;
      case Event::Kind::kExit:
        stopped_.emplace_back(e.child, e.status);
        if (waiting.erase(e.child) == 0) {
          log_ << "kvrelay local: " << e.child << " (pid " << e.pid << ") "
               << DescribeWaitStatus(e.status) << "\n"
               << std::flush;
        } else if (!WIFEXITED(e.status) || WEXITSTATUS(e.status) != 0) {
          log_ << "kvrelay local: " << e.child << " " << DescribeWaitStatus(e.status)
               << " while stopping\n"
               << std::flush;
        }
        break;
      case Event::Kind::kSignal:
      case Event::Kind::kTimeout:
        if (killed) {
          if (e.kind == Event::Kind::kSignal) break;  // already killing
          log_ << "kvrelay local: could not reap:";
          for (const std::string& n : waiting) log_ << " " << n;
          log_ << "\n" << std::flush;
          return;  // the destructor tries again
        }
        if (e.kind == Event::Kind::kSignal) escalated_ = true;
        log_ << "kvrelay local: "
             << (e.kind == Event::Kind::kSignal ? "second signal" : "grace period over")
             << ", killing:";
        for (const std::string& n : waiting) {
          log_ << " " << n;
          Signal(n, SIGKILL);
        }
        log_ << "\n" << std::flush;
        killed = true;
        deadline = absl::Now() + absl::Seconds(10);  // SIGKILL cannot be refused
        break;
    }
  }
}

void Supervisor::StopAll(absl::Duration grace) { Stop(RunningChildren(), grace); }

bool Supervisor::Running(const std::string& name) const {
  const Child* c = Find(name);
  return c != nullptr && !c->reaped;
}

std::vector<std::string> Supervisor::RunningChildren() const {
  std::vector<std::string> names;
  for (const auto& c : children_)
    if (!c->reaped) names.push_back(c->name);
  return names;
}

}  // namespace kvrelay::cli

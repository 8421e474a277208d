// Child processes for `kvrelay local`: starts binaries, reads their stdout line by line,
// notices their exits and stop signals, and stops them in order. Single-threaded: every
// method runs on the thread that created the Supervisor (the signal handlers only write
// to a pipe that Next() polls).
//
// Children are never orphaned: each one runs with PR_SET_PDEATHSIG(SIGTERM) (checked
// against a parent that died before the prctl), so it gets SIGTERM when the supervising
// thread dies, even by SIGKILL. Each child leads its own process group, so a Ctrl-C in
// the terminal reaches only the supervisor, which then stops the children in its own
// order; stdin is /dev/null, stdout a pipe to the supervisor, stderr inherited. Forks
// happen on the calling thread, which must outlive the children (PDEATHSIG follows the
// thread, not the process).
#pragma once

#include <sys/types.h>

#include <deque>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvrelay::cli {

// "exited with status 1", "killed by signal 9 (Killed)".
std::string DescribeWaitStatus(int status);

class Supervisor {
 public:
  struct Event {
    enum class Kind {
      kLine,     // a child printed `line` on stdout
      kExit,     // a child exited; `status` is its wait status (it has been reaped)
      kSignal,   // the supervisor got SIGINT, SIGTERM or SIGHUP (`signal`)
      kTimeout,  // the deadline passed first
    };
    Kind kind = Kind::kTimeout;
    std::string child;  // kLine, kExit: the child's name
    pid_t pid = -1;     // kLine, kExit
    std::string line;   // kLine, without '\n'
    int status = 0;     // kExit
    int signal = 0;     // kSignal
  };

  // Installs handlers for SIGINT, SIGTERM, SIGHUP and SIGCHLD (restored by the
  // destructor); only one Supervisor may exist at a time. `log` gets the lines that
  // Stop() forwards and its notes.
  static absl::StatusOr<std::unique_ptr<Supervisor>> Create(std::ostream& log);
  // SIGKILLs and reaps every child still running, then restores the signal handlers.
  ~Supervisor();
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  // Starts argv[0] (a path) as the child `name` (unique). Fails, with nothing left
  // running, when it cannot be executed.
  absl::StatusOr<pid_t> Start(const std::string& name, const std::vector<std::string>& argv);

  // The next event, or kTimeout at `deadline`. A child's lines come before its exit.
  Event Next(absl::Time deadline);

  // Sends `sig` to the child's process group (no-op once it has been reaped).
  void Signal(const std::string& name, int sig);

  // Stops `names` (the running ones): SIGTERM, then up to `grace` for them to exit,
  // then SIGKILL. Another stop signal meanwhile escalates to SIGKILL at once. Lines
  // are forwarded to the log as "[name] line". Returns once all of them are reaped.
  // Children outside `names` that exit meanwhile are reported to the log.
  void Stop(const std::vector<std::string>& names, absl::Duration grace);
  // Stops every running child at once.
  void StopAll(absl::Duration grace);

  bool Running(const std::string& name) const;
  std::vector<std::string> RunningChildren() const;  // in start order
  // Exits seen by Stop() (name, wait status), in order.
  const std::vector<std::pair<std::string, int>>& stopped() const { return stopped_; }

 private:
  struct Child {
    std::string name;
    pid_t pid = -1;
    int out_fd = -1;  // read end of its stdout, -1 after EOF
    std::string buffer;
    bool reaped = false;
  };
  explicit Supervisor(std::ostream& log) : log_(log) {}
  Child* Find(const std::string& name);
  const Child* Find(const std::string& name) const;
  void ReadOutput(Child& c, bool until_eof);
  void ReapExited();
  void KillGroup(Child& c, int sig);

  std::ostream& log_;
  std::vector<std::unique_ptr<Child>> children_;
  std::deque<Event> pending_;
  std::vector<std::pair<std::string, int>> stopped_;
  int signals_seen_ = 0;    // stop signals already returned by Next()
  bool escalated_ = false;  // a stop signal arrived during Stop(): SIGKILL from then on
  int wake_fds_[2] = {-1, -1};
};

}  // namespace kvrelay::cli

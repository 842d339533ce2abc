// RemoteSource: the servers of a mount served by a translation agent on another host
// (`ulsp mount --remote ADDR:PORT/NAME`): each is a connection (RemotePort) attached
// to the agent's export. When one is gone — the link cut, the agent killed — the
// IsolatedPort that owns this source answers what was in flight with ECONNRESET,
// keeps new requests waiting up to their deadline, and connects again with back-off
// (100 ms doubling to 5 s, for ever); the nodes the kernel holds are found again in
// the new connection's stack by their names.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "kernel/msgport/host_port.h"
#include "kernel/msgport/remote_port.h"
#include "ulsp/core/isolated.h"

namespace ulsp::core {

class RemoteSource final : public ServerSource {
 public:
  // `last_error` (may be null) hears why the latest connection attempt failed.
  RemoteSource(msgport::RemoteOptions options, std::shared_ptr<std::string> last_error)
      : options_(std::move(options)), last_error_(std::move(last_error)) {}

  std::shared_ptr<msgport::Port> Start(pid_t* pid) override;
  void WaitGone(const std::shared_ptr<msgport::Port>& server, pid_t pid) override;
  void Interrupt(const std::shared_ptr<msgport::Port>& server, pid_t pid) override;
  bool resend_in_flight() const override { return false; }
  unsigned max_start_failures() const override { return 0; }
  std::chrono::milliseconds wait_limit() const override { return options_.wait_limit; }
  std::string kind() const override { return "remote"; }
  std::string peer() const override { return msgport::JoinHostPort(options_.host, options_.port) + "/" + options_.name; }
  double rtt_us() const override;
  // "connected", or why not.
  std::string state() const;

 private:
  const msgport::RemoteOptions options_;
  std::shared_ptr<std::string> last_error_;
  mutable std::mutex mu_;
  std::shared_ptr<msgport::RemotePort> current_;
  std::string last_logged_;
};

}  // namespace ulsp::core

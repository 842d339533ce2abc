#include "ulsp/core/remote_source.h"

#include "kernel/msgport/log.h"

namespace ulsp::core {

std::shared_ptr<msgport::Port> RemoteSource::Start(pid_t* pid) {
  *pid = 0;
  auto port = msgport::RemotePort::Connect(options_);
  std::lock_guard lock(mu_);
  if (!port) {
    if (last_error_) *last_error_ = port.error();
    if (port.error() != last_logged_) {  // once per reason, not once per retry
      Logger("remote")->warn("{}: {}", peer(), port.error());
      last_logged_ = port.error();
    }
    current_.reset();
    return nullptr;
  }
  if (!last_logged_.empty()) Logger("remote")->info("{}: connected again", peer());
  last_logged_.clear();
  current_ = *port;
  return current_;
}

void RemoteSource::WaitGone(const std::shared_ptr<msgport::Port>& server, pid_t) {
  auto remote = std::static_pointer_cast<msgport::RemotePort>(server);
  remote->WaitGone();
  std::lock_guard lock(mu_);
  last_logged_ = remote->why_gone();
  Logger("remote")->warn("{}: {}", peer(), last_logged_);
}

void RemoteSource::Interrupt(const std::shared_ptr<msgport::Port>& server, pid_t) {
  if (server) std::static_pointer_cast<msgport::RemotePort>(server)->Close();
}

double RemoteSource::rtt_us() const {
  std::lock_guard lock(mu_);
  return current_ && current_->alive() ? current_->rtt_us() : 0;
}

std::string RemoteSource::state() const {
  std::lock_guard lock(mu_);
  if (current_ && current_->alive()) return "connected";
  return last_logged_.empty() ? "connecting" : "reconnecting (" + last_logged_ + ")";
}

}  // namespace ulsp::core

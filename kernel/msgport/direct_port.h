// DirectPort: serves each message in the sending thread, by calling the server at
// once. DoMsg through it is a function call (the synchronous fast path); a server
// that keeps the message to reply later from another thread works too (the sender
// then waits). Thread-safe exactly as far as the server is.
#pragma once

#include "kernel/msgport/port.h"

namespace ulsp::msgport {

class DirectPort final : public Port {
 public:
  // `server` must outlive the port.
  DirectPort(std::string name, Server& server) : Port(std::move(name)), server_(server) {}
  void Put(MessagePtr msg) override { server_.Serve(std::move(msg)); }
  bool CountsReplies() const noexcept override { return false; }

 private:
  Server& server_;
};

}  // namespace ulsp::msgport

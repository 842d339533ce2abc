// RemotePort: a port whose server is a layer stack exported by a translation agent
// on another host (agent.capnp), reached on Cap'n Proto RPC over TCP — plain with a
// shared token, or mutual TLS (kj-tls). Messages carry what an isolated server takes:
// the command is the VfsOp and the payload a vfs.capnp request; the reply's payload is
// the vfs.capnp reply. Many messages are in flight at once on the one connection.
//
// Failure: every message has a deadline (its own, or the port's call timeout). A
// connection is watched with a ping every second; when it dies (the peer closed it,
// the link is down and a ping went unanswered, a frame was malformed), every message
// in flight is replied ECONNRESET at once, and any not answered by its deadline
// ETIMEDOUT. VFS messages (vfs_message.h) may be answered without a round trip, from
// attributes and prefetched bytes the agent sent before (remote_cache.h). A port does
// not reconnect: the relay that owns it (ulsp/core/isolated.h)
// makes a new one, with back-off, and finds its nodes again.
//
// Threading: a port runs its own thread with a kj event loop, which owns the
// connection. Put may be called from any thread; replies are delivered on the port's
// thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <expected>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "kernel/msgport/port.h"
#include "kernel/msgport/remote_cache.h"
#include "kernel/msgport/unique_fd.h"

namespace ulsp::msgport {

struct RemoteOptions {
  std::string host;     // the agent's address (IPv4, IPv6 or a name)
  uint16_t port = 0;
  std::string name;     // the export
  std::string token;    // the shared secret, if the agent wants one
  // Mutual TLS: PEM texts (not paths) of this side's certificate and key, and of the
  // CA that signed the agent's. All empty: plain TCP.
  std::string tls_cert, tls_key, tls_ca;
  std::string tls_server_name;  // the name the agent's certificate must carry (default: host)
  std::chrono::milliseconds connect_timeout{std::chrono::seconds(5)};
  // How long a request waits for a connection (RemoteSource::wait_limit). A call sent
  // to a connected agent waits for its answer however long that takes, unless the
  // message has a deadline of its own: the pings say when the agent is gone.
  std::chrono::milliseconds wait_limit{std::chrono::seconds(10)};
};

class RemotePort final : public Port {
 public:
  // Connects, authenticates and attaches to the export. Fails with a one-line reason:
  // "connecting to 10.0.0.2:9000: Connection refused", "the agent refused: wrong
  // token", "TLS: certificate verify failed" ...
  static std::expected<std::shared_ptr<RemotePort>, std::string> Connect(const RemoteOptions& options);
  ~RemotePort() override;  // closes the connection; what was in flight is answered

  // Takes a request (any thread). Answered ECONNRESET at once when the connection is
  // gone.
  void Put(MessagePtr msg) override;

  // Blocks until the connection is gone or Close is called.
  void WaitGone();
  // Closes the connection (any thread); messages in flight are answered ECONNRESET.
  void Close();

  bool alive() const noexcept { return alive_.load(); }
  const std::string& peer() const noexcept { return peer_; }
  double rtt_us() const noexcept { return rtt_us_.load(); }
  // Why the connection ended ("" while it lives).
  std::string why_gone() const;

 private:
  explicit RemotePort(RemoteOptions options);
  void Run();  // the port's thread
  // Puts forget requests for the lookups only the cache knows of.
  void QueueForgets();
  // Tells the port's thread to look at the inbox (and at closing_).
  void Wake() noexcept;

  struct Loop;  // the kj side, alive on the port's thread
  struct Outgoing {
    MessagePtr msg;
    uint64_t generation = 0;  // the cache's, when it was put
  };
  const RemoteOptions options_;
  RemoteCache cache_;
  std::string peer_;
  UniqueFd wake_;  // eventfd: new messages in the inbox, or close

  mutable std::mutex mu_;  // guards what follows
  std::condition_variable cv_;
  std::deque<Outgoing> inbox_;
  bool connected_ = false;  // Connect's answer is in
  std::string error_;       // Connect's failure, or why the connection ended
  bool closing_ = false;
  bool gone_ = false;

  std::atomic<bool> alive_{false};
  std::atomic<double> rtt_us_{0};
  std::thread thread_;
};

}  // namespace ulsp::msgport

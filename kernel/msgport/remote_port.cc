#include "kernel/msgport/remote_port.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <kj/async-unix.h>
#include <kj/compat/tls.h>
#include <kj/debug.h>

#include <cstring>
#include <map>

#include "kernel/msgport/agent.capnp.h"
#include "kernel/msgport/agent_wire.h"
#include "kernel/msgport/host_port.h"
#include "kernel/msgport/log.h"
#include "kernel/msgport/vfs_codec.h"
#include "kernel/msgport/vfs_message.h"

namespace ulsp::msgport {

capnp::ReaderOptions AgentFrameLimits() {
  capnp::ReaderOptions o;
  o.traversalLimitInWords = 4u << 20;  // 32 MiB
  o.nestingLimit = 32;
  return o;
}

std::string DescribeKjError(const kj::Exception& e) {
  std::string text = e.getDescription().cStr();
  // Remote exceptions arrive as "remote exception: <text>".
  if (auto at = text.find("remote exception: "); at != std::string::npos) text = text.substr(at + 18);
  // OpenSSL's own words are what says why ("...: tlsv1 alert unknown ca").
  if (auto at = text.find("message = "); at != std::string::npos) {
    text = text.substr(at + 10);
    if (auto colon = text.rfind("::"); colon != std::string::npos) text = text.substr(colon + 2);
    return text;
  }
  // A certificate that failed verification: "...not trusted; reason = hostname mismatch".
  if (auto at = text.find("; reason = "); at != std::string::npos) {
    std::string why = text.substr(at + 11);
    text = text.substr(0, at) + ": " + why;
    if (why == "hostname mismatch")
      text += " (kj-tls checks the name as a DNS subjectAltName, also for an IP address; see --tls-name)";
    return text;
  }
  if (auto at = text.find("; "); at != std::string::npos && text.rfind("syscall", 0) != 0) text = text.substr(0, at);
  return text;
}

namespace {

constexpr auto kPingEvery = std::chrono::seconds(1);
constexpr auto kPingTimeout = std::chrono::seconds(2);

kj::Duration ToKj(std::chrono::nanoseconds d) { return static_cast<int64_t>(d.count()) * kj::NANOSECONDS; }

int ErrnoOf(const kj::Exception& e) {
  switch (e.getType()) {
    case kj::Exception::Type::DISCONNECTED:
      return ECONNRESET;
    case kj::Exception::Type::OVERLOADED:
      return ETIMEDOUT;  // kj's timeoutAfter
    default:
      return EIO;
  }
}

}  // namespace

struct RemotePort::Loop {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::Own<kj::TlsContext> tls;
  kj::Own<kj::TlsKeypair> keypair;
  kj::Vector<kj::TlsCertificate> trusted;
  kj::Own<kj::AsyncIoStream> stream;
  kj::Own<capnp::TwoPartyVatNetwork> network;
  kj::Own<capnp::RpcSystem<capnp::rpc::twoparty::VatId>> rpc;
  kj::Maybe<wire::Stack::Client> stack;
  std::map<uint64_t, Outgoing> pending;  // sent, not yet answered
  uint64_t next_id = 1;
};

RemotePort::RemotePort(RemoteOptions options)
    : Port("remote:" + JoinHostPort(options.host, options.port) + "/" + options.name), options_(std::move(options)) {
  peer_ = JoinHostPort(options_.host, options_.port);
}

std::expected<std::shared_ptr<RemotePort>, std::string> RemotePort::Connect(const RemoteOptions& options) {
  std::shared_ptr<RemotePort> port(new RemotePort(options));
  const int efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd < 0) return std::unexpected(std::string("eventfd: ") + std::strerror(errno));
  port->wake_.Reset(efd);
  port->thread_ = std::thread([p = port.get()] { p->Run(); });
  std::unique_lock lock(port->mu_);
  port->cv_.wait(lock, [&] { return port->connected_ || port->gone_; });
  if (port->gone_ || !port->connected_) {
    std::string why = port->error_.empty() ? "the connection ended" : port->error_;
    lock.unlock();
    port->Close();
    return std::unexpected(why);
  }
  return port;
}

RemotePort::~RemotePort() {
  // The thread answers what is in flight and in the inbox as it ends; nothing enters
  // the inbox once it is gone (Put and QueueForgets check gone_ under mu_).
  Close();
  if (thread_.joinable()) thread_.join();
}

void RemotePort::QueueForgets() {
  auto forgets = cache_.TakeForgets();
  if (forgets.empty()) return;
  {
    std::lock_guard lock(mu_);
    if (gone_ || closing_) return;  // the agent drops the connection's lookups itself
    for (auto [node, count] : forgets) {
      auto f = std::make_unique<VfsMessage>(VfsOp::kForget);
      f->req.node = node;
      f->req.count = count;
      EncodeVfsRequest(f->req, f->payload);
      f->reply_port = nullptr;
      inbox_.push_back(Outgoing{MessagePtr(f.release()), 0});
    }
  }
  Wake();
}

void RemotePort::Wake() noexcept {
  const uint64_t one = 1;
  if (wake_) (void)!::write(wake_.get(), &one, sizeof one);
}

void RemotePort::Put(MessagePtr msg) {
  uint64_t generation = 0;
  auto* vfs = dynamic_cast<VfsMessage*>(msg.get());
  const bool answered = vfs != nullptr && cache_.Answer(*vfs, &generation);
  if (vfs != nullptr) QueueForgets();
  if (answered) {
    counters().replied.fetch_add(1, std::memory_order_relaxed);
    Reply(std::move(msg), 0);
    return;
  }
  {
    std::lock_guard lock(mu_);
    if (!gone_ && !closing_) {
      inbox_.push_back(Outgoing{std::move(msg), generation});
      msg = nullptr;
    }
  }
  if (msg) {
    counters().refused.fetch_add(1, std::memory_order_relaxed);
    Reply(std::move(msg), ECONNRESET);
    return;
  }
  Wake();
}

void RemotePort::Close() {
  {
    std::lock_guard lock(mu_);
    closing_ = true;
  }
  Wake();
}

void RemotePort::WaitGone() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [this] { return gone_ || closing_; });
}

std::string RemotePort::why_gone() const {
  std::lock_guard lock(mu_);
  return gone_ ? error_ : "";
}

void RemotePort::Run() {
  auto finish = [this](const std::string& why) {
    std::lock_guard lock(mu_);
    if (error_.empty()) error_ = why;
    gone_ = true;
    alive_ = false;
    cv_.notify_all();
  };
  std::map<uint64_t, Outgoing> orphans;  // in flight when the connection ended
  try {
    Loop loop;
    kj::WaitScope& ws = loop.io.waitScope;
    kj::Timer& timer = loop.io.provider->getTimer();
    const kj::Duration connect_timeout = ToKj(options_.connect_timeout);
    const std::string where = "connecting to " + peer_;
    // Connect (and, with TLS, handshake), then attach: each step fails with its reason.
    try {
      auto addr = timer.timeoutAfter(connect_timeout, loop.io.provider->getNetwork().parseAddress(options_.host, options_.port))
                      .wait(ws);
      loop.stream = timer.timeoutAfter(connect_timeout, addr->connect()).wait(ws);
    } catch (const kj::Exception& e) {
      finish(where + ": " + DescribeKjError(e));
      return;
    }
    if (!options_.tls_cert.empty()) {
      try {
        loop.keypair = kj::heap<kj::TlsKeypair>(
            kj::TlsKeypair{kj::TlsPrivateKey(options_.tls_key.c_str()), kj::TlsCertificate(options_.tls_cert.c_str())});
        loop.trusted.add(kj::TlsCertificate(options_.tls_ca.c_str()));
        kj::TlsContext::Options o;
        o.useSystemTrustStore = false;
        o.trustedCertificates = loop.trusted.asPtr();
        o.defaultKeypair = *loop.keypair;
        loop.tls = kj::heap<kj::TlsContext>(kj::mv(o));
      } catch (const kj::Exception& e) {
        finish("TLS: " + DescribeKjError(e));
        return;
      }
      const std::string server_name = options_.tls_server_name.empty() ? options_.host : options_.tls_server_name;
      try {
        loop.stream = timer.timeoutAfter(connect_timeout, loop.tls->wrapClient(kj::mv(loop.stream), server_name)).wait(ws);
      } catch (const kj::Exception& e) {
        finish("TLS with " + peer_ + ": " + DescribeKjError(e));
        return;
      }
    }
    loop.network = kj::heap<capnp::TwoPartyVatNetwork>(*loop.stream, capnp::rpc::twoparty::Side::CLIENT, AgentFrameLimits());
    loop.rpc = kj::heap(capnp::makeRpcClient(*loop.network));
    {
      capnp::word scratch[4];
      std::memset(scratch, 0, sizeof scratch);
      capnp::MallocMessageBuilder message(scratch);
      auto vat = message.getRoot<capnp::rpc::twoparty::VatId>();
      vat.setSide(capnp::rpc::twoparty::Side::SERVER);
      auto agent = loop.rpc->bootstrap(vat).castAs<wire::Agent>();
      auto attach = agent.attachRequest();
      attach.setName(options_.name);
      attach.setToken(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(options_.token.data()), options_.token.size()));
      try {
        auto reply = timer.timeoutAfter(connect_timeout, attach.send()).wait(ws);
        if (reply.getVersion() != kAgentProtocolVersion) {
          finish("the agent at " + peer_ + " speaks protocol version " + std::to_string(reply.getVersion()) + ", not " +
                 std::to_string(kAgentProtocolVersion));
          return;
        }
        loop.stack = reply.getStack();
      } catch (const kj::Exception& e) {
        // An agent with mutual TLS hangs up on a client that starts without: it reads
        // the client's first bytes as a bad handshake.
        const std::string why = DescribeKjError(e);
        if (e.getType() != kj::Exception::Type::DISCONNECTED) {
          finish("the agent at " + peer_ + " refused: " + why);
        } else if (loop.tls) {
          finish("TLS with " + peer_ + ": the agent closed the connection (" + why + ")");
        } else {
          // Or it is no agent: an HTTP server's answer reads as a frame of 1347703881
          // segments ("HTTP"), and the client hangs up.
          finish("the agent at " + peer_ + " closed the connection (" + why +
                 "): if it asks for mutual TLS, give --tls-cert, --tls-key and --tls-ca; if no ulsp agent listens "
                 "there, check ADDR:PORT");
        }
        return;
      }
    }
    {
      std::lock_guard lock(mu_);
      connected_ = true;
      alive_ = true;
      cv_.notify_all();
    }
    wire::Stack::Client stack = KJ_ASSERT_NONNULL(loop.stack);

    // What ends the connection: the peer going, a ping unanswered, Close.
    auto ended = kj::newPromiseAndFulfiller<std::string>();
    kj::Own<kj::PromiseFulfiller<std::string>> end = kj::mv(ended.fulfiller);
    auto end_with = [&end](const std::string& why) {
      if (end->isWaiting()) end->fulfill(kj::cp(why));
    };

    struct ErrorHandler final : kj::TaskSet::ErrorHandler {
      void taskFailed(kj::Exception&& e) override { Logger("remote")->debug("a task failed: {}", DescribeKjError(e)); }
    } errors;
    kj::TaskSet tasks(errors);

    tasks.add(loop.network->onDisconnect().then([&] { end_with("the agent closed the connection"); }));

    // Pings: the round-trip time, and the watch on a link that went quiet.
    std::function<kj::Promise<void>()> ping = [&]() -> kj::Promise<void> {
      return timer.afterDelay(ToKj(kPingEvery)).then([&]() {
        const auto sent = std::chrono::steady_clock::now();
        return timer.timeoutAfter(ToKj(kPingTimeout), stack.pingRequest().send())
            .then([&, sent](auto&&) {
              const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - sent).count();
              const double old = rtt_us_.load();
              rtt_us_.store(old == 0 ? us : 0.8 * old + 0.2 * us);
              return ping();
            });
      });
    };
    tasks.add(ping().catch_([&](kj::Exception&& e) {
      end_with("no answer from the agent (" + DescribeKjError(e) + ")");
    }));

    // The inbox: messages put by other threads, sent as calls.
    kj::UnixEventPort::FdObserver observer(loop.io.unixEventPort, wake_.get(), kj::UnixEventPort::FdObserver::OBSERVE_READ);
    std::function<kj::Promise<void>()> drain = [&]() -> kj::Promise<void> {
      return observer.whenBecomesReadable().then([&]() {
        uint64_t count;
        while (::read(wake_.get(), &count, sizeof count) > 0) {
        }
        std::deque<Outgoing> batch;
        bool closing;
        {
          std::lock_guard lock(mu_);
          batch.swap(inbox_);
          closing = closing_;
        }
        if (closing) end_with("closed");
        for (auto& [msg, generation] : batch) {
          const uint64_t id = loop.next_id++;
          const auto deadline = msg->deadline;
          auto call = stack.callRequest();
          call.setOp(msg->command);
          if (msg->command == static_cast<uint32_t>(VfsOp::kOpenDir)) call.setListingChunk(cache_.listing_chunk());
          call.setRequest(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(msg->payload.data()), msg->payload.size()));
          loop.pending.emplace(id, Outgoing{std::move(msg), generation});
          // A call to a connected agent is not given up on for its time: an agent
          // whose disk is slow does what was asked once the disk moves, and an
          // ETIMEDOUT before that would tell the program a change failed that then
          // happens (docs/agents.md, Failure). The pings find an agent that is gone.
          // Only a message with a deadline of its own keeps one: a DoMsg's, as the
          // relay's lend, reopen and relookup are. (A request's wait for a
          // connection is IsolatedPort's, in relay.wait_until, not a deadline.)
          auto sent = call.send();
          kj::Promise<capnp::Response<wire::Stack::CallResults>> answered =
              deadline == kNoDeadline
                  ? kj::mv(sent)
                  : timer.timeoutAfter(ToKj(std::max<std::chrono::nanoseconds>(deadline - Clock::now(),
                                                                              std::chrono::nanoseconds(0))),
                                       kj::mv(sent));
          tasks.add(kj::mv(answered)
                        .then(
                            [&, id](capnp::Response<wire::Stack::CallResults>&& r) {
                              auto it = loop.pending.find(id);
                              if (it == loop.pending.end()) return;
                              MessagePtr m = std::move(it->second.msg);
                              const uint64_t sent_generation = it->second.generation;
                              loop.pending.erase(it);
                              const int error = r.getError();
                              auto data = r.getReply();
                              m->payload.resize(data.size());
                              if (data.size() > 0) std::memcpy(m->payload.data(), data.begin(), data.size());
                              if (error == 0) {
                                if (auto* vfs = dynamic_cast<VfsMessage*>(m.get())) {
                                  auto prefetch = r.getPrefetch();
                                  std::vector<std::vector<char>> listing;
                                  for (auto chunk : r.getListing())
                                    listing.emplace_back(reinterpret_cast<const char*>(chunk.begin()),
                                                         reinterpret_cast<const char*>(chunk.end()));
                                  cache_.Learn(*vfs, sent_generation,
                                               std::as_bytes(std::span(prefetch.begin(), prefetch.size())),
                                               r.getPrefetchEof(), std::move(listing));
                                  QueueForgets();
                                }
                              }
                              counters().replied.fetch_add(1, std::memory_order_relaxed);
                              Reply(std::move(m), error < 0 || error > 4095 ? EIO : error);
                            },
                            [&, id](kj::Exception&& e) {
                              auto it = loop.pending.find(id);
                              if (it == loop.pending.end()) return;
                              MessagePtr m = std::move(it->second.msg);
                              loop.pending.erase(it);
                              const int error = ErrnoOf(e);
                              if (error == ECONNRESET) end_with("the connection broke (" + DescribeKjError(e) + ")");
                              Reply(std::move(m), error);
                            }));
        }
        return drain();
      });
    };
    tasks.add(drain());
    Wake();  // anything put before the loop watched

    const std::string why = ended.promise.wait(ws);
    {
      std::lock_guard lock(mu_);
      if (error_.empty()) error_ = why;
      gone_ = true;
      alive_ = false;
    }
    orphans.swap(loop.pending);
    // Destroying the loop (tasks, RPC, connection) cancels what is left.
  } catch (const kj::Exception& e) {
    finish("the connection failed: " + DescribeKjError(e));
  } catch (const std::exception& e) {
    finish(std::string("the connection failed: ") + e.what());
  }
  finish("the connection ended");
  for (auto& [id, o] : orphans) Reply(std::move(o.msg), ECONNRESET);
  std::deque<Outgoing> left;
  {
    std::lock_guard lock(mu_);
    left.swap(inbox_);
  }
  for (auto& o : left) Reply(std::move(o.msg), ECONNRESET);
}

}  // namespace ulsp::msgport

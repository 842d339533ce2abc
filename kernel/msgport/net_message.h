// The net message family: one networking system call of a sandboxed group, caught by
// the group's seccomp filter (seccomp_shim.h), as a message for the group's net ULSP.
//
// The shim fills the arguments: the call and its raw register arguments, the caller's
// socket (a duplicate, from pidfd_getfd) with what the kernel says of it, and every
// pointer argument copied out of the caller exactly once (addresses, datagrams,
// control messages) — the ULSP never reads the caller's memory, and the kernel never
// re-reads it for a decision. The ULSP decides and fills the results: let the call
// run as it is (only for calls whose pointer arguments carry no decision), answer
// with a value or an errno, give the caller a new descriptor (a socket of the
// ULSP's), and maybe install a socket of its own in place of the caller's descriptor
// and write results back into the caller's memory.
#pragma once

#include <sys/types.h>

#include <cerrno>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kernel/msgport/message.h"
#include "kernel/msgport/unique_fd.h"

namespace ulsp::msgport {

// The calls the filter sends. The value is Message::command.
enum class NetCall : uint32_t {
  kSocket = 1,
  kSocketPair,
  kConnect,
  kBind,
  kListen,
  kAccept,
  kAccept4,
  kSendTo,
  kSendMsg,
  kSendMmsg,
  kSetSockOpt,
  kCount,  // not a call: one past the last
};

std::string_view NetCallName(NetCall call) noexcept;  // "connect", ...

// One message of sendmsg/sendmmsg (or sendto's data), copied out of the caller.
struct NetDatagram {
  std::vector<char> name;     // msg_name (empty: none)
  std::vector<char> data;     // the iovecs' bytes, joined
  std::vector<char> control;  // msg_control, as the caller wrote it
  bool truncated = false;     // the data was longer than the copy limit (stream sockets)
  uint64_t len_at = 0;        // sendmmsg: where msg_len of this entry is in the caller
};

// Where the net ULSP's answer goes.
enum class NetVerdict {
  kContinue,  // the kernel runs the call as the caller made it (after `install`, if set)
  kReturn,    // the call returns `value`
  kError,     // the call fails with `error`
  kNewFd,     // the call returns a new descriptor of the caller's: `install`, added
              // and answered in one step (socket), close-on-exec when `value` is 1
};

struct NetRequest {
  NetCall call = NetCall::kSocket;
  pid_t tid = 0;   // the calling thread (host pid namespace)
  uint64_t args[6] = {};

  // --- the socket named by args[0], for calls that name one (for a socket() the
  // ULSP answers kNewFd: the kind of the socket it made, for the shim to keep) ---
  UniqueFd socket;       // a duplicate of the caller's descriptor (same open file)
  int family = 0;        // SO_DOMAIN
  int type = 0;          // SO_TYPE
  int protocol = 0;      // SO_PROTOCOL
  bool host_netns = false;  // the socket lives in the ULSP's network namespace
  int fd_error = 0;      // why there is no socket: EBADF, ENOTSOCK

  // --- pointer arguments, copied once ---
  std::vector<char> addr;           // connect, bind, sendto: the sockaddr
  std::vector<NetDatagram> msgs;    // sendto (one), sendmsg (one), sendmmsg (each)
  int copy_error = 0;               // EFAULT, EINVAL, EMSGSIZE when copying failed

  // The caller's thread, for descriptors named in SCM_RIGHTS (shared: the shim keeps
  // a thread's pidfd for its next call).
  std::shared_ptr<const UniqueFd> pidfd;
  // Whether the caller still waits for the answer (not killed, not interrupted by a
  // signal). A ULSP that waits on the network asks it now and then, and gives up.
  std::function<bool()> still_waiting;

  // The calling thread's process (read from /proc on first use, then kept).
  pid_t Process() const;

  // --- results ---
  NetVerdict verdict = NetVerdict::kError;
  int64_t value = 0;
  int error = EACCES;   // positive; the shim makes it negative for the kernel
  UniqueFd install;     // put this socket at the caller's descriptor args[0] (or, with
                        // kNewFd, at a new one)
  struct Write {
    uint64_t at;
    std::vector<char> bytes;
  };
  std::vector<Write> writes;  // caller memory to fill before answering (sendmmsg's msg_len)

  mutable pid_t process_ = 0;  // Process()'s cache
};

class NetMessage final : public Message {
 public:
  explicit NetMessage(NetCall call) noexcept : Message(static_cast<uint32_t>(call)) { req.call = call; }
  NetRequest req;
  uint64_t notif_id = 0;  // the kernel's notification id (the shim's)
};

}  // namespace ulsp::msgport

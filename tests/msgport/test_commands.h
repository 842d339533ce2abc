// Commands understood by shm_test_server, the ULSP process the shared-memory port
// tests talk to. Shared by the server and the tests.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel/msgport/port.h"

namespace ulsp::msgport::testing {

enum TestCommand : uint32_t {
  kEcho = 1,          // reply with the request's payload
  kSleepUs = 2,       // payload: uint32 microseconds to sleep before replying
  kErrno = 3,         // payload: uint32 errno to reply with
  kWriteToFd = 4,     // write the payload into the one descriptor sent, reply its byte count
  kOpenFile = 5,      // payload: a path; reply with an O_RDONLY descriptor for it
  kCorruptReply = 6,  // reply with garbage in place of an envelope
  kCrash = 7,         // _exit(9) without replying
  kPid = 8,           // reply with the server's pid
  kBigReply = 9,      // payload: uint32 size; reply with that many bytes
  kScribble = 10,     // scribble on the shared header and request ring, then reply with a cell
                      // that claims 64 MiB
  kWaitForAbort = 11, // on another thread, wait up to 5 s for the message to be aborted:
                      // reply ECANCELED when it is, ETIMEDOUT when not
};

template <class T>
std::vector<std::byte> Bytes(const T& value) {
  std::vector<std::byte> b(sizeof(T));
  std::memcpy(b.data(), &value, sizeof(T));
  return b;
}
// Sends msg to port asynchronously, its reply to go to `replies`.
inline void SendTo(Port& port, MessagePtr msg, Port& replies) {
  msg->reply_port = &replies;
  Send(port, std::move(msg));
}

template <class T>
T From(const std::vector<std::byte>& b) {
  T value{};
  if (b.size() >= sizeof(T)) std::memcpy(&value, b.data(), sizeof(T));
  return value;
}

}  // namespace ulsp::msgport::testing

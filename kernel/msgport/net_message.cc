#include "kernel/msgport/net_message.h"

#include <fstream>
#include <string>

namespace ulsp::msgport {

std::string_view NetCallName(NetCall call) noexcept {
  switch (call) {
    case NetCall::kSocket: return "socket";
    case NetCall::kSocketPair: return "socketpair";
    case NetCall::kConnect: return "connect";
    case NetCall::kBind: return "bind";
    case NetCall::kListen: return "listen";
    case NetCall::kAccept: return "accept";
    case NetCall::kAccept4: return "accept4";
    case NetCall::kSendTo: return "sendto";
    case NetCall::kSendMsg: return "sendmsg";
    case NetCall::kSendMmsg: return "sendmmsg";
    case NetCall::kSetSockOpt: return "setsockopt";
    case NetCall::kCount: break;
  }
  return "?";
}

pid_t NetRequest::Process() const {
  if (process_ == 0) {
    std::ifstream status("/proc/" + std::to_string(tid) + "/status");
    for (std::string line; std::getline(status, line);) {
      if (line.rfind("Tgid:", 0) == 0) {
        process_ = static_cast<pid_t>(std::stol(line.substr(5)));
        break;
      }
    }
    if (process_ == 0) process_ = tid;  // gone: the thread's id is the best left
  }
  return process_;
}

}  // namespace ulsp::msgport

#include "kernel/msgport/net_message.h"

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

}  // namespace ulsp::msgport

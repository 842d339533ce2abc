#include "kernel/msgport/host_port.h"

namespace ulsp::msgport {

bool SplitHostPort(const std::string& text, std::string& host, uint16_t& port, bool zero_port) {
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size()) return false;
  host = text.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  unsigned long p = 0;
  try {
    size_t used = 0;
    p = std::stoul(text.substr(colon + 1), &used);
    if (used != text.size() - colon - 1) return false;
  } catch (...) {
    return false;
  }
  if ((p == 0 && !zero_port) || p > 65535) return false;
  port = static_cast<uint16_t>(p);
  return true;
}

}  // namespace ulsp::msgport

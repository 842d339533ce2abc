#include "ulsp/net/conn_log.h"

#include <unistd.h>

#include <chrono>
#include <ctime>
#include <fstream>
#include <nlohmann/json.hpp>

#include "kernel/msgport/log.h"
#include "kernel/msgport/own_file.h"

namespace ulsp::net {

std::expected<std::unique_ptr<ConnLog>, std::string> ConnLog::Open(const std::string& path, std::string group) {
  std::unique_ptr<ConnLog> log(new ConnLog());
  log->group_ = std::move(group);
  if (path.empty()) return log;
  auto fd = OpenOwnFile(path, /*append=*/true);
  if (!fd) return std::unexpected("the connection log " + fd.error());
  log->log_ = LineLog(std::move(*fd), path, "net", "group " + log->group_ + ": the connection log");
  return log;
}

std::string ProgramOf(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline");
  std::string argv0;
  std::getline(in, argv0, '\0');
  return argv0;
}

void ConnLog::Write(const LogEntry& e) noexcept {
  if (!log_.enabled()) return;
  try {
    const auto now = std::chrono::system_clock::now();
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count();
    const std::time_t secs = static_cast<std::time_t>(us / 1000000);
    std::tm tm{};
    ::gmtime_r(&secs, &tm);
    char stamp[64];
    std::snprintf(stamp, sizeof stamp, "%04d-%02d-%02dT%02d:%02d:%02d.%06lldZ", tm.tm_year + 1900, tm.tm_mon + 1,
                  tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<long long>(us % 1000000));
    nlohmann::ordered_json j;
    j["time"] = stamp;
    j["group"] = group_;
    j["pid"] = e.pid;
    j["argv0"] = ProgramOf(e.pid);
    j["call"] = e.call;
    if (!e.proto.empty()) j["proto"] = e.proto;
    if (!e.path.empty()) {
      j["path"] = e.path;
    } else if (!e.address.empty()) {
      j["address"] = e.address;
      j["port"] = e.port;
    }
    if (!e.name.empty()) j["name"] = e.name;
    if (e.call == "resolve") j["addresses"] = e.addresses;
    j["verdict"] = e.verdict;
    j["rule"] = e.rule;
    // Bytes that are not UTF-8 (a hostile path) are replaced, not refused.
    std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
    std::lock_guard lock(mu_);
    // After lines were dropped, the first write that succeeds says how many.
    const bool written = log_.Append(line, [&](uint64_t count, const char* error) {
      nlohmann::ordered_json gap;
      gap["time"] = stamp;
      gap["group"] = group_;
      gap["call"] = "lost";
      gap["count"] = count;
      gap["error"] = error;
      return gap.dump() + "\n";
    });
    (written ? lines_ : failures_).fetch_add(1, std::memory_order_relaxed);
  } catch (...) {
    failures_.fetch_add(1, std::memory_order_relaxed);
  }
}

}  // namespace ulsp::net

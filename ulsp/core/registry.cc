#include "ulsp/core/registry.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "kernel/msgport/control.capnp.h"
#include "kernel/msgport/log.h"
#include "kernel/msgport/own_file.h"

namespace ulsp::core {
namespace {

std::string Now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

void Encode(const StatusBuilder& s, msgport::wire::Status::Builder b) {
  b.setPid(static_cast<uint32_t>(s.pid));
  b.setKind(s.kind);
  b.setCommand(s.command);
  b.setStartedAt(s.started_at);
  auto groups = b.initGroups(static_cast<unsigned>(s.groups.size()));
  for (unsigned i = 0; i < s.groups.size(); ++i) {
    const auto& g = s.groups[i];
    auto o = groups[i];
    o.setName(g.name);
    o.setPolicy(g.policy);
    o.setInitPid(static_cast<uint32_t>(g.init_pid));
    o.setNetDefault(g.net_default);
    o.setNotifications(g.notifications);
    o.setInFlight(g.in_flight);
    o.setWorkers(g.workers);
    o.setAllowed(g.allowed);
    o.setDenied(g.denied);
    o.setLogged(g.logged);
    o.setKept(g.kept);
    o.setProcesses(g.processes);
    o.setProcessesMax(g.processes_max);
  }
  auto mounts = b.initMounts(static_cast<unsigned>(s.mounts.size()));
  for (unsigned i = 0; i < s.mounts.size(); ++i) {
    const auto& m = s.mounts[i];
    auto o = mounts[i];
    o.setPath(m.path);
    o.setStack(m.stack);
    o.setGroup(m.group);
    o.setIsolated(m.isolated);
    o.setRequests(m.requests);
    o.setInFlight(m.in_flight);
    o.setNodes(m.nodes);
  }
  auto ulsps = b.initUlsps(static_cast<unsigned>(s.ulsps.size()));
  for (unsigned i = 0; i < s.ulsps.size(); ++i) {
    const auto& u = s.ulsps[i];
    auto o = ulsps[i];
    o.setName(u.name);
    o.setKind(u.kind);
    o.setPid(static_cast<uint32_t>(u.pid));
    o.setRestarts(u.restarts);
    o.setState(u.state);
  }
  auto ports = b.initPorts(static_cast<unsigned>(s.ports.size()));
  for (unsigned i = 0; i < s.ports.size(); ++i) {
    const auto& p = s.ports[i];
    auto o = ports[i];
    o.setName(p.name);
    o.setKind(p.kind);
    o.setPut(p.put);
    o.setReplied(p.replied);
    o.setRefused(p.refused);
    o.setBadInput(p.bad_input);
    o.setInFlight(p.in_flight);
    o.setPeer(p.peer);
    o.setState(p.state);
    o.setRttUs(p.rtt_us);
  }
}

nlohmann::ordered_json ToJson(msgport::wire::Status::Reader s) {
  nlohmann::ordered_json j;
  j["pid"] = s.getPid();
  j["kind"] = s.getKind().cStr();
  j["command"] = s.getCommand().cStr();
  j["started_at"] = s.getStartedAt().cStr();
  j["groups"] = nlohmann::ordered_json::array();
  for (auto g : s.getGroups()) {
    j["groups"].push_back({{"name", g.getName().cStr()},
                           {"policy", g.getPolicy().cStr()},
                           {"init_pid", g.getInitPid()},
                           {"net_default", g.getNetDefault().cStr()},
                           {"notifications", g.getNotifications()},
                           {"in_flight", g.getInFlight()},
                           {"workers", g.getWorkers()},
                           {"allowed", g.getAllowed()},
                           {"denied", g.getDenied()},
                           {"logged", g.getLogged()},
                           {"kept", g.getKept()},
                           {"processes", g.getProcessesMax() > 0 ? nlohmann::ordered_json(g.getProcesses()) : nlohmann::ordered_json()},
                           {"processes_max", g.getProcessesMax() > 0 ? nlohmann::ordered_json(g.getProcessesMax()) : nlohmann::ordered_json()}});
  }
  j["mounts"] = nlohmann::ordered_json::array();
  for (auto m : s.getMounts()) {
    j["mounts"].push_back({{"path", m.getPath().cStr()},
                           {"stack", m.getStack().cStr()},
                           {"group", m.getGroup().cStr()},
                           {"isolated", m.getIsolated()},
                           {"requests", m.getRequests()},
                           {"in_flight", m.getInFlight()},
                           {"nodes", m.getNodes()}});
  }
  j["ulsps"] = nlohmann::ordered_json::array();
  for (auto u : s.getUlsps()) {
    j["ulsps"].push_back({{"name", u.getName().cStr()},
                          {"kind", u.getKind().cStr()},
                          {"pid", u.getPid()},
                          {"restarts", u.getRestarts()},
                          {"state", u.getState().cStr()}});
  }
  j["ports"] = nlohmann::ordered_json::array();
  for (auto p : s.getPorts()) {
    j["ports"].push_back({{"name", p.getName().cStr()},
                          {"kind", p.getKind().cStr()},
                          {"put", p.getPut()},
                          {"replied", p.getReplied()},
                          {"refused", p.getRefused()},
                          {"bad_input", p.getBadInput()},
                          {"in_flight", p.getInFlight()},
                          {"peer", p.getPeer().cStr()},
                          {"state", p.getState().cStr()},
                          {"rtt_us", p.getRttUs()}});
  }
  return j;
}

bool Alive(pid_t pid) { return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM); }

// Removes the entries of processes killed before they could clean up (kill -9), and
// returns the live ones, sorted.
std::vector<std::filesystem::path> LiveEntries(const std::string& dir) {
  std::error_code ec;
  std::vector<std::filesystem::path> live;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const pid_t pid = static_cast<pid_t>(std::atoi(e.path().filename().c_str()));
    if (pid <= 0) continue;
    if (Alive(pid)) {
      live.push_back(e.path());
    } else {
      std::error_code rm;
      std::filesystem::remove_all(e.path(), rm);
    }
  }
  std::sort(live.begin(), live.end());
  return live;
}

}  // namespace

std::string RuntimeDir() {
  const char* dir = std::getenv("ULSP_RUNTIME_DIR");
  if (dir != nullptr && *dir != '\0') return dir;
  if (::geteuid() == 0) return "/run/ulsp";
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg != nullptr && xdg[0] == '/') return std::string(xdg) + "/ulsp";
  return "/tmp/ulsp-" + std::to_string(::geteuid());  // MakeOwnDirectory refuses one another user made
}

std::expected<std::string, std::string> MakeRunDir() {
  const std::string top = RuntimeDir();
  // One an earlier ulsp made while its umask was a passthrough layer's 0 (0777) is
  // this user's to mend; MakeOwnDirectory refuses what others may write.
  struct stat st {};
  if (::lstat(top.c_str(), &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == ::geteuid() && (st.st_mode & (022 | S_ISVTX)) != 0)
    ::chmod(top.c_str(), st.st_mode & 0755);
  const std::string dir = top + "/" + std::to_string(::getpid());
  for (const std::string& d : {top, dir}) {
    if (auto made = MakeOwnDirectory(d); !made) return std::unexpected(made.error());
  }
  return dir;
}

void StatusBuilder::AddPort(const msgport::Port& port, std::string port_kind, uint64_t in_flight, std::string peer,
                            std::string state, double rtt_us) {
  const auto& c = port.counters();
  ports.push_back({port.name(), std::move(port_kind), c.put.load(), c.replied.load(), c.refused.load(),
                   c.bad_input.load(), in_flight, std::move(peer), std::move(state), rtt_us});
}

Result<std::unique_ptr<ControlServer>> ControlServer::Start(const std::string& dir, Fill fill) {
  if (dir.empty()) return Fail(ENOENT);  // MakeRunDir failed: not listed
  (void)LiveEntries(std::filesystem::path(dir).parent_path());  // what killed processes left
  std::unique_ptr<ControlServer> c(new ControlServer());
  c->path_ = dir + "/control";
  c->fill_ = std::move(fill);
  c->started_at_ = Now();
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (c->path_.size() >= sizeof addr.sun_path) return Fail(ENAMETOOLONG);
  std::memcpy(addr.sun_path, c->path_.c_str(), c->path_.size() + 1);
  auto s = Sys([] { return ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0); });
  if (!s) return std::unexpected(s.error());
  c->listen_.Reset(*s);
  ::unlink(c->path_.c_str());
  if (auto r = Sys([&] { return ::bind(c->listen_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr); }); !r)
    return std::unexpected(r.error());
  ::chmod(c->path_.c_str(), 0600);
  if (auto r = Sys([&] { return ::listen(c->listen_.get(), 16); }); !r) return std::unexpected(r.error());
  auto e = Sys([] { return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); });
  if (!e) return std::unexpected(e.error());
  c->stop_.Reset(*e);
  c->thread_ = std::thread([p = c.get()] { p->Loop(); });
  return c;
}

void ControlServer::Stop() noexcept {
  const uint64_t one = 1;
  if (stop_) (void)!::write(stop_.get(), &one, sizeof one);
}

ControlServer::~ControlServer() {
  Stop();
  if (thread_.joinable()) thread_.join();
  ::unlink(path_.c_str());
}

void ControlServer::Loop() {
  for (;;) {
    pollfd p[2] = {{listen_.get(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (p[1].revents != 0) return;
    UniqueFd conn(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn) continue;
    try {
      StatusBuilder s;
      s.pid = ::getpid();
      s.started_at = started_at_;
      fill_(s);
      capnp::MallocMessageBuilder message;
      Encode(s, message.initRoot<msgport::wire::Status>());
      capnp::writeMessageToFd(conn.get(), message);
    } catch (const std::exception& e) {
      Logger("core")->warn("control: answering ulsp ps failed: {}", e.what());
    }
  }
}

namespace {
// Every live process's status, as `ulsp ps --json` prints it. `hidden` gets the pids
// whose control socket another user owns.
nlohmann::ordered_json Statuses(const char* who, std::string& hidden) {
  const std::string dir = RuntimeDir();
  nlohmann::ordered_json all = nlohmann::ordered_json::array();
  for (const auto& entry : LiveEntries(dir)) {
    const pid_t pid = static_cast<pid_t>(std::atoi(entry.filename().c_str()));
    const std::string path = entry.string() + "/control";
    UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (!s || path.size() >= sizeof addr.sun_path) continue;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    timeval tv{2, 0};
    ::setsockopt(s.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (::connect(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      if (errno == EACCES) {  // its owner's alone (0600): say so, not that nothing serves
        hidden += (hidden.empty() ? "" : ", ") + std::to_string(pid);
      }
      continue;  // else starting or ending
    }
    // A stopped process (SIGSTOP, a debugger) accepts and never answers.
    pollfd answer{s.get(), POLLIN, 0};
    if (::poll(&answer, 1, 2000) == 0) {
      std::fprintf(stderr, "%s: pid %d did not answer within 2 s (is it stopped?)\n", who, pid);
      continue;
    }
    try {
      capnp::StreamFdMessageReader reader(s.get());
      all.push_back(ToJson(reader.getRoot<msgport::wire::Status>()));
    } catch (const kj::Exception& e) {  // its description, without kj's stack trace
      std::fprintf(stderr, "%s: pid %d did not answer: %s\n", who, pid, e.getDescription().cStr());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: pid %d did not answer: %s\n", who, pid, e.what());
    }
  }
  return all;
}
}  // namespace

pid_t MountServerPid(const std::string& mountpoint) {
  std::string hidden;
  for (const auto& s : Statuses("ulsp umount", hidden)) {
    if (s["kind"] != "mount") continue;
    for (const auto& m : s["mounts"])
      if (m["path"] == mountpoint) return s["pid"].get<pid_t>();
  }
  return 0;
}

int Ps(bool json) {
  std::string hidden;  // pids whose control socket another user owns
  const nlohmann::ordered_json all = Statuses("ulsp ps", hidden);
  if (!hidden.empty()) {
    std::fprintf(stderr, "ulsp ps: not shown, as only their owners may ask them (run ulsp ps as root or as that user): "
                 "pid %s\n", hidden.c_str());
  }
  if (json) {
    // Names are bytes; what is not UTF-8 shows as U+FFFD (nlohmann would throw).
    std::printf("%s\n", all.dump(2, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return 0;
  }
  if (all.empty()) {
    if (hidden.empty()) std::printf("no ulsp process is serving anything\n");
    return 0;
  }
  std::printf("%-8s %-6s %-20s %s\n", "PID", "KIND", "STARTED", "COMMAND");
  for (const auto& s : all)
    std::printf("%-8d %-6s %-20s %s\n", s["pid"].get<int>(), s["kind"].get<std::string>().c_str(),
                s["started_at"].get<std::string>().c_str(), s["command"].get<std::string>().c_str());
  bool header = false;
  for (const auto& s : all) {
    for (const auto& g : s["groups"]) {
      if (!header) {
        std::printf("\nGROUPS\n%-8s %-12s %-8s %-6s %8s %8s %7s %7s %7s %7s %6s %11s  %s\n", "PID", "GROUP", "INIT", "NET", "CALLS",
                    "INFLIGHT", "WORKERS", "ALLOWED", "DENIED", "LOGGED", "KEPT", "PROCS", "POLICY");
        header = true;
      }
      // PROCS: the command's processes and threads now, of its limit ("-": no limit).
      const std::string procs = g.value("processes_max", nlohmann::ordered_json()).is_null()
                                    ? "-"
                                    : std::to_string(g["processes"].get<unsigned long long>()) + "/" +
                                          std::to_string(g["processes_max"].get<unsigned long long>());
      std::printf("%-8d %-12s %-8d %-6s %8llu %8llu %7llu %7llu %7llu %7llu %6llu %11s  %s\n", s["pid"].get<int>(),
                  g["name"].get<std::string>().c_str(), g["init_pid"].get<int>(), g["net_default"].get<std::string>().c_str(),
                  g["notifications"].get<unsigned long long>(), g["in_flight"].get<unsigned long long>(),
                  g["workers"].get<unsigned long long>(), g["allowed"].get<unsigned long long>(),
                  g["denied"].get<unsigned long long>(), g["logged"].get<unsigned long long>(),
                  g["kept"].get<unsigned long long>(), procs.c_str(), g["policy"].get<std::string>().c_str());
    }
  }
  header = false;
  for (const auto& s : all) {
    for (const auto& m : s["mounts"]) {
      if (!header) {
        std::printf("\nMOUNTS\n%-8s %-24s %-10s %-8s %10s %8s %8s  %s\n", "PID", "PATH", "GROUP", "ISOLATED", "REQUESTS",
                    "INFLIGHT", "NODES", "STACK");
        header = true;
      }
      std::printf("%-8d %-24s %-10s %-8s %10llu %8llu %8llu  %s\n", s["pid"].get<int>(), m["path"].get<std::string>().c_str(),
                  m["group"].get<std::string>().empty() ? "-" : m["group"].get<std::string>().c_str(),
                  m["isolated"].get<bool>() ? "yes" : "no", m["requests"].get<unsigned long long>(),
                  m["in_flight"].get<unsigned long long>(), m["nodes"].get<unsigned long long>(),
                  m["stack"].get<std::string>().c_str());
    }
  }
  header = false;
  for (const auto& s : all) {
    for (const auto& u : s["ulsps"]) {
      if (!header) {
        std::printf("\nULSPS\n%-8s %-28s %-18s %-8s %8s  %s\n", "OWNER", "NAME", "KIND", "PID", "RESTARTS", "STATE");
        header = true;
      }
      // A ULSP on another host (a remote mount's agent) has no pid here: "-".
      const int pid = u["pid"].get<int>();
      std::printf("%-8d %-28s %-18s %-8s %8llu  %s\n", s["pid"].get<int>(), u["name"].get<std::string>().c_str(),
                  u["kind"].get<std::string>().c_str(), pid > 0 ? std::to_string(pid).c_str() : "-",
                  u["restarts"].get<unsigned long long>(), u["state"].get<std::string>().c_str());
    }
  }
  header = false;
  for (const auto& s : all) {
    for (const auto& p : s["ports"]) {
      if (!header) {
        std::printf("\nPORTS\n%-8s %-28s %-14s %10s %10s %8s %6s %8s  %-8s %s\n", "OWNER", "NAME", "KIND", "PUT", "REPLIED",
                    "REFUSED", "BAD", "INFLIGHT", "STATE", "PEER (RTT)");
        header = true;
      }
      const std::string peer = p["peer"].get<std::string>();
      char rtt[64] = "";
      // No ping answered yet: no round-trip time to show (not "0 us").
      if (!peer.empty()) {
        const double us = p["rtt_us"].get<double>();
        if (us > 0) std::snprintf(rtt, sizeof rtt, " (%.0f us)", us);
        else std::snprintf(rtt, sizeof rtt, " (no ping answered yet)");
      }
      std::printf("%-8d %-28s %-14s %10llu %10llu %8llu %6llu %8llu  %-8s %s%s\n", s["pid"].get<int>(),
                  p["name"].get<std::string>().c_str(), p["kind"].get<std::string>().c_str(),
                  p["put"].get<unsigned long long>(), p["replied"].get<unsigned long long>(),
                  p["refused"].get<unsigned long long>(), p["bad_input"].get<unsigned long long>(),
                  p["in_flight"].get<unsigned long long>(), p["state"].get<std::string>().c_str(),
                  peer.empty() ? "-" : peer.c_str(), rtt);
    }
  }
  return 0;
}

}  // namespace ulsp::core

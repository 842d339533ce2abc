#include "ulsp/core/policy.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "kernel/msgport/own_file.h"
#include "ulsp/vfs/size.h"
#include "ulsp/vfs/stack.h"

namespace ulsp::core {
namespace {

// A refusal: "FILE:LINE: reason". Thrown while parsing (configuration at start-up,
// STYLE 5) and caught once, in ParsePolicy.
struct Refusal {
  std::string message;
};

class Parser {
 public:
  explicit Parser(const std::string& file) : file_(file) {
    const std::filesystem::path p(file);
    dir_ = std::filesystem::absolute(p).parent_path().string();
  }

  [[noreturn]] void Fail(const toml::source_region& at, const std::string& reason) const {
    throw Refusal{file_ + ":" + std::to_string(at.begin.line) + ": " + reason};
  }
  std::string Where(const toml::source_region& at) const { return file_ + ":" + std::to_string(at.begin.line); }

  // Refuses keys of `table` not in `known`.
  void OnlyKeys(const toml::table& table, const std::string& what, std::initializer_list<std::string_view> known) const {
    for (auto&& [key, node] : table) {
      if (std::find(known.begin(), known.end(), key.str()) != known.end()) continue;
      std::string list;
      for (auto k : known) list += (list.empty() ? "" : ", ") + std::string(k);
      Fail(key.source(), "unknown key '" + std::string(key.str()) + "' in " + what + " (known: " + list + ")");
    }
  }

  std::string String(const toml::table& t, std::string_view key, const std::string& what, bool required,
                     const std::string& fallback = "") const {
    const toml::node* n = t.get(key);
    if (n == nullptr) {
      if (required) Fail(t.source(), what + " needs `" + std::string(key) + "`");
      return fallback;
    }
    if (!n->is_string()) Fail(n->source(), "`" + std::string(key) + "` in " + what + " must be a string");
    return std::string(*n->value<std::string_view>());
  }

  bool Bool(const toml::table& t, std::string_view key, const std::string& what, bool fallback) const {
    const toml::node* n = t.get(key);
    if (n == nullptr) return fallback;
    if (!n->is_boolean()) Fail(n->source(), "`" + std::string(key) + "` in " + what + " must be true or false");
    return *n->value<bool>();
  }

  // A whole number, or a size string ("1G") when `size` is set.
  std::optional<uint64_t> Count(const toml::table& t, std::string_view key, const std::string& what, bool size) const {
    const toml::node* n = t.get(key);
    if (n == nullptr) return std::nullopt;
    if (n->is_integer()) {
      const int64_t v = *n->value<int64_t>();
      if (v <= 0) Fail(n->source(), "`" + std::string(key) + "` in " + what + " must be more than 0");
      return static_cast<uint64_t>(v);
    }
    if (size && n->is_string()) {
      auto bytes = vfs::ParseSize(*n->value<std::string_view>());
      if (!bytes) Fail(n->source(), "`" + std::string(key) + "` in " + what + ": give bytes, optionally with K, M, G or T");
      return *bytes;
    }
    Fail(n->source(), "`" + std::string(key) + "` in " + what + " must be a whole number" + (size ? " or a size like \"2G\"" : ""));
  }

  // A path from the file, relative to the file's directory.
  std::string PathFromFile(const std::string& p) const {
    if (p.empty()) return p;
    return vfs::NormalPath(p.front() == '/' ? std::filesystem::path(p) : std::filesystem::path(dir_) / p);
  }

  GroupPolicy Group(const std::string& name, const toml::table& g) const {
    const std::string what = "[group." + name + "]";
    OnlyKeys(g, what, {"net_default", "log", "loopback", "pid_namespace", "private_tmp", "read_only_host", "set_id_files", "mount", "net",
                     "limits", "hosts"});
    GroupPolicy group;
    group.name = name;
    group.where = Where(g.source());

    const std::string net_default = String(g, "net_default", what, false, "deny");
    if (net_default != "allow" && net_default != "deny")
      Fail(g.get("net_default")->source(), "net_default must be \"allow\" or \"deny\", not \"" + net_default + "\"");
    group.log = PathFromFile(String(g, "log", what, false));
    const std::string loopback = String(g, "loopback", what, false, "host");
    if (loopback != "group" && loopback != "host")
      Fail(g.get("loopback")->source(), "loopback must be \"group\" or \"host\", not \"" + loopback + "\"");
    group.loopback_group = loopback == "group";
    group.pid_namespace = Bool(g, "pid_namespace", what, true);
    group.private_tmp = Bool(g, "private_tmp", what, false);
    group.read_only_host = Bool(g, "read_only_host", what, false);
    group.set_id_files = Bool(g, "set_id_files", what, false);

    std::vector<net::Rule> rules;
    if (const toml::node* n = g.get("net")) {
      const toml::array* list = n->as_array();
      if (list == nullptr) Fail(n->source(), "`net` in " + what + " must be an array of tables: write [[group." + name + ".net]]");
      for (const toml::node& item : *list) {
        const toml::table* t = item.as_table();
        if (t == nullptr) Fail(item.source(), "each `net` rule of " + what + " must be a table");
        rules.push_back(Rule(name, *t));
      }
    }
    group.net = net::RuleSet(std::move(rules), net_default == "allow");

    if (const toml::node* n = g.get("mount")) {
      const toml::array* list = n->as_array();
      if (list == nullptr) Fail(n->source(), "`mount` in " + what + " must be an array of tables: write [[group." + name + ".mount]]");
      std::map<std::string, std::string> seen;  // path -> where
      std::vector<toml::source_region> sources;
      for (const toml::node& item : *list) {
        const toml::table* t = item.as_table();
        if (t == nullptr) Fail(item.source(), "each `mount` of " + what + " must be a table");
        MountPolicy m = Mount(name, *t);
        if (auto it = seen.find(m.path); it != seen.end())
          Fail(t->source(), "mount point " + m.path + " overlaps the mount at " + it->second + " (one stack per mount point)");
        seen[m.path] = m.where;
        sources.push_back(t->get("path")->source());
        group.mounts.push_back(std::move(m));
      }
      // A mount point under none of the group's other mounts is the host's: it must be
      // there (ulsp makes no directories on the host), which `ulsp run` would find out
      // only once it had started to build the group. One under another mount of the
      // group is whatever that stack shows; one under a private /tmp is made in it.
      for (size_t i = 0; i < group.mounts.size(); ++i) {
        const std::string& path = group.mounts[i].path;
        if (group.private_tmp && path == "/tmp")
          Fail(sources[i], "mount point /tmp: the group's private_tmp is a fresh /tmp too: drop one of the two");
        if (group.private_tmp && path.starts_with("/tmp/")) continue;
        const bool nested = std::any_of(group.mounts.begin(), group.mounts.end(), [&path](const MountPolicy& o) {
          return o.path != path && vfs::IsWithin(path, o.path);
        });
        struct stat st {};
        if (nested) continue;
        if (::stat(path.c_str(), &st) != 0)
          Fail(sources[i], "mount point " + path + (errno == ENOENT ? " does not exist" : ": " + std::string(std::strerror(errno))) +
                               " (ulsp makes no mount points: make it first)");
        if (!S_ISDIR(st.st_mode)) Fail(sources[i], "mount point " + path + " is not a directory");
      }
      // Parents before children, so a nested mount point lands on the stack above it.
      std::stable_sort(group.mounts.begin(), group.mounts.end(), [](const MountPolicy& a, const MountPolicy& b) {
        return std::count(a.path.begin(), a.path.end(), '/') - (a.path == "/") <
               std::count(b.path.begin(), b.path.end(), '/') - (b.path == "/");
      });
    }

    if (const toml::node* n = g.get("hosts")) {
      const toml::table* t = n->as_table();
      if (t == nullptr) Fail(n->source(), "`hosts` in " + what + " must be a table of names: hosts = { \"db.internal\" = \"10.0.0.5\" }");
      for (auto&& [key, value] : *t) {
        const std::string host(key.str());
        if (!net::IsHostName(host) || host.starts_with("*."))
          Fail(key.source(), "hosts: '" + host + "' is not a host name");
        std::vector<std::string> addresses;
        auto add = [&](const toml::node& item) {
          if (!item.is_string()) Fail(item.source(), "hosts: the addresses of '" + host + "' must be strings");
          const std::string text(*item.value<std::string_view>());
          auto c = net::Cidr::Parse(text);
          if (!c || text.find('/') != std::string::npos) Fail(item.source(), "hosts: '" + text + "' is not an IPv4 or IPv6 address");
          addresses.push_back(text);
        };
        if (const toml::array* list = value.as_array()) {
          for (const toml::node& item : *list) add(item);
        } else {
          add(value);
        }
        if (addresses.empty()) Fail(key.source(), "hosts: '" + host + "' has no address");
        group.hosts[net::NormalizeName(host)] = std::move(addresses);
      }
    }

    if (const toml::node* n = g.get("limits")) {
      const toml::table* t = n->as_table();
      if (t == nullptr) Fail(n->source(), "`limits` in " + what + " must be a table: write [group." + name + ".limits]");
      const std::string lw = "[group." + name + ".limits]";
      OnlyKeys(*t, lw, {"wall_seconds", "cpu_seconds", "memory", "open_files", "file_size", "processes", "group_memory"});
      group.limits.wall_seconds = Count(*t, "wall_seconds", lw, false);
      group.limits.cpu_seconds = Count(*t, "cpu_seconds", lw, false);
      group.limits.memory_bytes = Count(*t, "memory", lw, true);
      group.limits.open_files = Count(*t, "open_files", lw, false);
      group.limits.file_size_bytes = Count(*t, "file_size", lw, true);
      group.limits.processes = Count(*t, "processes", lw, false);
      if (const toml::node* p = t->get("processes")) group.limits.processes_where = Where(p->source());
      group.limits.group_memory_bytes = Count(*t, "group_memory", lw, true);
      if (const toml::node* m = t->get("group_memory")) group.limits.group_memory_where = Where(m->source());
    }
    return group;
  }

  net::Rule Rule(const std::string& group, const toml::table& t) const {
    const std::string what = "a [[group." + group + ".net]] rule";
    OnlyKeys(t, what, {"action", "proto", "to", "ports", "call"});
    net::Rule r;
    r.where = Where(t.source());
    const std::string action = String(t, "action", what, true);
    if (action == "allow") r.action = net::Action::kAllow;
    else if (action == "deny") r.action = net::Action::kDeny;
    else if (action == "log") r.action = net::Action::kLog;
    else Fail(t.get("action")->source(), "action must be \"allow\", \"deny\" or \"log\", not \"" + action + "\"");
    const std::string proto = String(t, "proto", what, false, "any");
    if (proto == "tcp") r.proto = net::Proto::kTcp;
    else if (proto == "udp") r.proto = net::Proto::kUdp;
    else if (proto == "unix") r.proto = net::Proto::kUnix;
    else if (proto == "any") r.proto = net::Proto::kAny;
    else Fail(t.get("proto")->source(), "proto must be \"tcp\", \"udp\", \"unix\" or \"any\", not \"" + proto + "\"");
    const std::string call = String(t, "call", what, false, "connect");
    if (call == "connect") r.call = net::Call::kConnect;
    else if (call == "bind") r.call = net::Call::kBind;
    else Fail(t.get("call")->source(), "call must be \"connect\" or \"bind\", not \"" + call + "\"");
    if (r.call == net::Call::kBind && r.proto == net::Proto::kUnix)
      Fail(t.source(), "a bind rule is about TCP or UDP ports; binding UNIX socket paths is governed by the file-system view");
    const toml::node* to = t.get("to");
    if (to != nullptr && !to->is_string()) Fail(to->source(), "`to` must be a string: a CIDR, a host name or a socket path");
    if (auto ok = r.SetTo(to ? *to->value<std::string_view>() : "any"); !ok) Fail(to ? to->source() : t.source(), ok.error());
    if (const toml::node* ports = t.get("ports")) {
      std::string text;
      if (ports->is_integer()) {
        text = std::to_string(*ports->value<int64_t>());
      } else if (ports->is_string()) {
        text = *ports->value<std::string_view>();
      } else {
        Fail(ports->source(), "`ports` must be a port number or a string (\"8000-8099\", \"any\")");
      }
      if (r.proto == net::Proto::kUnix) Fail(ports->source(), "a UNIX socket rule has no ports");
      if (auto ok = r.SetPorts(text); !ok) Fail(ports->source(), ok.error());
    }
    return r;
  }

  MountPolicy Mount(const std::string& group, const toml::table& t) const {
    const std::string what = "a [[group." + group + ".mount]]";
    OnlyKeys(t, what, {"path", "stack", "isolated", "read_only", "timeout"});
    MountPolicy m;
    m.where = Where(t.source());
    const std::string path = String(t, "path", what, true);
    if (path.empty() || path.front() != '/') Fail(t.get("path")->source(), "mount path '" + path + "' must be absolute");
    m.path = vfs::NormalPath(path);
    if (m.path.find("/..") != std::string::npos) Fail(t.get("path")->source(), "mount path '" + path + "' must not use ..");
    if (vfs::IsWithin(m.path, "/dev"))  // the group's /dev, made after the mounts, would hide it
      Fail(t.get("path")->source(), "mount path '" + path + "' is in /dev, which is the group's own (its devices)");
    const std::string stack = String(t, "stack", what, true);
    auto layers = vfs::ParseStackSpec(stack);
    if (!layers) Fail(t.get("stack")->source(), "stack \"" + stack + "\": " + layers.error());
    std::vector<vfs::LayerSpec> resolved;
    for (const vfs::LayerSpec& l : *layers) {
      std::string arg = l.name == "memfs" ? l.argument : PathFromFile(l.argument);
      if (l.name == "passthrough") {
        struct stat st {};
        if (::stat(arg.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
          Fail(t.get("stack")->source(), "stack \"" + stack + "\": " + l.name + ":" + arg + " is not a directory");
      } else if (l.name == "view" && ::access(arg.c_str(), R_OK) != 0) {
        Fail(t.get("stack")->source(), "stack \"" + stack + "\": view:" + arg + ": the allow-list cannot be read");
      }
      resolved.push_back({l.name, std::move(arg)});
    }
    if (auto apart = vfs::CheckApart(resolved); !apart)
      Fail(t.get("stack")->source(), "stack \"" + stack + "\": " + apart.error());
    m.stack = vfs::ComposeStackSpec(resolved);
    m.isolated = Bool(t, "isolated", what, false);
    m.read_only = Bool(t, "read_only", what, false);
    if (const toml::node* n = t.get("timeout")) {
      // TOML has nan and inf; neither is a time the kernel can cache for.
      if (!n->is_number() || !(*n->value<double>() >= 0 && std::isfinite(*n->value<double>())))
        Fail(n->source(), "`timeout` must be 0 or more seconds");
      m.timeout = *n->value<double>();
    }
    return m;
  }

 private:
  std::string file_;
  std::string dir_;
};

}  // namespace

std::expected<const GroupPolicy*, std::string> Policy::Group(std::string_view name) const {
  std::string names;
  for (const auto& [n, g] : groups) names += (names.empty() ? "" : ", ") + n;
  if (name.empty()) {
    if (groups.size() == 1) return &groups.begin()->second;
    return std::unexpected(file + ": holds " + std::to_string(groups.size()) + " groups (" + names +
                           "): say which with --group NAME");
  }
  auto it = groups.find(std::string(name));
  if (it == groups.end())
    return std::unexpected(file + ": no group '" + std::string(name) + "' (groups: " + (names.empty() ? "none" : names) + ")");
  return &it->second;
}

std::expected<Policy, std::string> ParsePolicy(std::string_view text, const std::string& file) {
  Parser parser(file);
  try {
    toml::table root;
    try {
      root = toml::parse(text, file);
    } catch (const toml::parse_error& e) {
      return std::unexpected(file + ":" + std::to_string(e.source().begin.line) + ": " + std::string(e.description()));
    }
    parser.OnlyKeys(root, "the file", {"group"});
    Policy policy;
    policy.file = file;
    const toml::node* groups = root.get("group");
    if (groups == nullptr) return std::unexpected(file + ": no groups: declare one with [group.NAME]");
    const toml::table* table = groups->as_table();
    if (table == nullptr) parser.Fail(groups->source(), "`group` must be a table of groups: write [group.NAME]");
    if (table->empty()) parser.Fail(groups->source(), "no groups: declare one with [group.NAME]");
    for (auto&& [key, node] : *table) {
      const toml::table* g = node.as_table();
      if (g == nullptr) parser.Fail(key.source(), "group." + std::string(key.str()) + " must be a table: write [group." + std::string(key.str()) + "]");
      policy.groups.emplace(std::string(key.str()), parser.Group(std::string(key.str()), *g));
    }
    return policy;
  } catch (const Refusal& r) {
    return std::unexpected(r.message);
  }
}

std::expected<Policy, std::string> LoadPolicy(const std::string& file) {
  auto text = ReadTextFile(file, 4u << 20);
  if (!text) return std::unexpected(file + ": " + text.error());
  return ParsePolicy(*text, file);
}

}  // namespace ulsp::core

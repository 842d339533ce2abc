// Policy files: what a good one becomes, and the one-line refusal (FILE:LINE: reason)
// for each kind of mistake. The shipped examples in policies/ must all pass.
#include <gtest/gtest.h>

#include <filesystem>

#include "tests/temp_dir.h"
#include "ulsp/core/policy.h"

namespace ulsp::core {
namespace {

std::string Refusal(const std::string& text) {
  auto p = ParsePolicy(text, "p.toml");
  return p ? "accepted" : p.error();
}

TEST(Policy, ReadsGroupsMountsRulesAndLimits) {
  auto p = ParsePolicy(R"(
[group.build]
net_default = "deny"
log = "/var/log/ulsp/build.jsonl"
loopback = "group"
pid_namespace = false
private_tmp = true
hosts = { "db.internal" = "10.0.0.5", "Two.Internal" = ["10.0.0.6", "fd00::6"] }

[[group.build.mount]]
path  = "/usr/local/src/"
stack = "overlay:/tmp/build-upper,passthrough:/usr/share/doc"

[[group.build.mount]]
path = "/"
stack = "trace:/tmp/t.jsonl,passthrough:/"
timeout = 0
read_only = true

[[group.build.net]]
action = "allow"
proto  = "tcp"
to     = "127.0.0.1/32"
ports  = "8000-8099"

[[group.build.net]]
action = "log"
proto = "udp"
to = "db.internal"
ports = 53

[group.build.limits]
wall_seconds = 600
memory = "2G"
open_files = 1024
processes = 256
group_memory = "3G"

[group.web]
net_default = "allow"
)",
                       "/etc/p.toml");
  ASSERT_TRUE(p.has_value()) << p.error();
  ASSERT_EQ(p->groups.size(), 2u);
  const GroupPolicy& g = p->groups.at("build");
  EXPECT_FALSE(g.net.default_allow());
  EXPECT_EQ(g.log, "/var/log/ulsp/build.jsonl");
  EXPECT_TRUE(g.loopback_group);
  EXPECT_FALSE(g.pid_namespace);
  EXPECT_TRUE(g.private_tmp);
  ASSERT_EQ(g.mounts.size(), 2u);
  EXPECT_EQ(g.mounts[0].path, "/");  // parents first
  EXPECT_EQ(g.mounts[0].timeout, 0.0);
  EXPECT_TRUE(g.mounts[0].read_only);
  EXPECT_FALSE(g.mounts[1].read_only);
  EXPECT_EQ(g.mounts[1].path, "/usr/local/src");
  EXPECT_EQ(g.mounts[1].where, "/etc/p.toml:10");
  ASSERT_EQ(g.net.rules().size(), 2u);
  EXPECT_EQ(g.net.rules()[0].port_lo, 8000);
  EXPECT_EQ(g.net.rules()[1].host, "db.internal");
  EXPECT_EQ(g.net.rules()[1].port_lo, 53);
  EXPECT_EQ(g.net.Describe(1), "rule 2 (/etc/p.toml:26)");
  EXPECT_EQ(*g.limits.wall_seconds, 600u);
  EXPECT_EQ(*g.limits.memory_bytes, 2ull << 30);
  EXPECT_FALSE(g.limits.cpu_seconds.has_value());
  EXPECT_EQ(*g.limits.processes, 256u);
  EXPECT_EQ(*g.limits.group_memory_bytes, 3ull << 30);
  EXPECT_TRUE(g.limits.group_memory_where.ends_with(":37")) << g.limits.group_memory_where;
  EXPECT_TRUE(g.limits.processes_where.ends_with(":36")) << g.limits.processes_where;
  EXPECT_EQ(g.hosts.at("two.internal"), (std::vector<std::string>{"10.0.0.6", "fd00::6"}));
  EXPECT_TRUE(p->groups.at("web").net.default_allow());
  EXPECT_TRUE(p->groups.at("web").pid_namespace);

  EXPECT_EQ((*p->Group("web"))->name, "web");
  EXPECT_EQ(p->Group("").error(), "/etc/p.toml: holds 2 groups (build, web): say which with --group NAME");
  EXPECT_EQ(p->Group("nope").error(), "/etc/p.toml: no group 'nope' (groups: build, web)");
}

TEST(Policy, RelativePathsAreTheFilesDirectorys) {
  auto p = ParsePolicy("[group.g]\nlog = \"logs/c.jsonl\"\n[[group.g.mount]]\npath = \"/mnt\"\nstack = \"overlay:up,memfs:1M\"\n",
                       "/srv/policies/p.toml");
  ASSERT_TRUE(p.has_value()) << p.error();
  EXPECT_EQ(p->groups.at("g").log, "/srv/policies/logs/c.jsonl");
  EXPECT_EQ(p->groups.at("g").mounts[0].stack, "overlay:/srv/policies/up,memfs:1M");
  // `ulsp ps` once showed passthrough:.. as "passthrough:/srv/" (policies/offline-build.toml).
  p = ParsePolicy("[group.g]\n[[group.g.mount]]\npath = \"/mnt/\"\nstack = \"overlay:up/,passthrough:..\"\n",
                  "/srv/policies/p.toml");
  ASSERT_TRUE(p.has_value()) << p.error();
  EXPECT_EQ(p->groups.at("g").mounts[0].path, "/mnt");
  EXPECT_EQ(p->groups.at("g").mounts[0].stack, "overlay:/srv/policies/up,passthrough:/srv");
}

// A mount point under another of the group's mounts is whatever that stack shows:
// nothing on the host says whether it will be there.
TEST(Policy, AMountPointUnderAnotherMountOfTheGroupIsNotLookedForOnTheHost) {
  auto p = ParsePolicy("[group.g]\n[[group.g.mount]]\npath = \"/nonexistent-top/deeper\"\nstack = \"memfs:1M\"\n"
                       "[[group.g.mount]]\npath = \"/nonexistent-top\"\nstack = \"memfs:1M\"\n",
                       "/srv/p.toml");
  EXPECT_FALSE(p.has_value());  // the outer one is the host's
  p = ParsePolicy("[group.g]\n[[group.g.mount]]\npath = \"/mnt/nonexistent/deeper\"\nstack = \"memfs:1M\"\n"
                  "[[group.g.mount]]\npath = \"/mnt\"\nstack = \"memfs:1M\"\n"
                  "[[group.g.mount]]\npath = \"/\"\nstack = \"passthrough:/\"\n[[group.g.mount]]\npath = \"/also-not-here\"\n"
                  "stack = \"memfs:1M\"\n",
                  "/srv/p.toml");
  ASSERT_TRUE(p.has_value()) << p.error();
  EXPECT_EQ(p->groups.at("g").mounts.size(), 4u);
}

TEST(Policy, RefusesEachMistakeWithFileLineAndReason) {
  EXPECT_EQ(Refusal("[group.g]\nnet_defualt = \"deny\"\n"),
            "p.toml:2: unknown key 'net_defualt' in [group.g] (known: net_default, log, loopback, pid_namespace, "
            "private_tmp, read_only_host, set_id_files, mount, net, limits, hosts)");
  EXPECT_EQ(Refusal("[group.g]\nnet_default = \"maybe\"\n"), "p.toml:2: net_default must be \"allow\" or \"deny\", not \"maybe\"");
  EXPECT_EQ(Refusal("[group.g]\npid_namespace = \"yes\"\n"), "p.toml:2: `pid_namespace` in [group.g] must be true or false");
  EXPECT_EQ(Refusal("[group.g]\nread_only_host = 1\n"), "p.toml:2: `read_only_host` in [group.g] must be true or false");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.net]]\naction = \"allow\"\nto = \"10.0.0.0/40\"\n"),
            "p.toml:4: '10.0.0.0/40': the prefix length must be 0 to 32");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.net]]\naction = \"allow\"\nto = \"10.0.0.1\"\nports = \"80-\"\n"),
            "p.toml:5: ports '80-': give a port (80), a range (8000-8099) or \"any\"");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.net]]\naction = \"permit\"\n"),
            "p.toml:3: action must be \"allow\", \"deny\" or \"log\", not \"permit\"");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.net]]\nproto = \"tcp\"\n"), "p.toml:2: a [[group.g.net]] rule needs `action`");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.net]]\naction = \"allow\"\nport = 80\n"),
            "p.toml:4: unknown key 'port' in a [[group.g.net]] rule (known: action, proto, to, ports, call)");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.mount]]\npath = \"/x\"\nstack = \"bogus:/y,memfs:1M\"\n"),
            "p.toml:4: stack \"bogus:/y,memfs:1M\": unknown layer 'bogus' (known: passthrough:DIR, memfs:SIZE, "
            "overlay:UPPERDIR, trace:LOG, view:ALLOWLIST)");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.mount]]\npath = \"/x\"\nstack = \"passthrough:/nonexistent/dir\"\n"),
            "p.toml:4: stack \"passthrough:/nonexistent/dir\": passthrough:/nonexistent/dir is not a directory");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.mount]]\npath = \"/x\"\nstack = \"memfs:1M\"\n[[group.g.mount]]\npath = \"/x/\"\n"
                    "stack = \"memfs:2M\"\n"),
            "p.toml:5: mount point /x overlaps the mount at p.toml:2 (one stack per mount point)");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.mount]]\npath = \"/x\"\nstack = \"memfs:1M\"\nread_only = \"yes\"\n"),
            "p.toml:5: `read_only` in a [[group.g.mount]] must be true or false");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.mount]]\npath = \"/x\"\nstack = \"memfs:1M\"\nreadonly = true\n"),
            "p.toml:5: unknown key 'readonly' in a [[group.g.mount]] (known: path, stack, isolated, read_only, timeout)");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.mount]]\npath = \"x\"\nstack = \"memfs:1M\"\n"), "p.toml:3: mount path 'x' must be absolute");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.mount]]\npath = \"/tmp\"\nstack = \"memfs:1M\"\ntimeout = nan\n"),
            "p.toml:5: `timeout` must be 0 or more seconds");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.mount]]\npath = \"/tmp\"\nstack = \"overlay:/usr,passthrough:/usr/share\"\n"),
            "p.toml:4: stack \"overlay:/usr,passthrough:/usr/share\": passthrough:/usr/share lies inside overlay:/usr, so "
            "the overlay's changes would land in the layer it keeps unchanged: put the upper directory elsewhere");
  // The host's mount points are looked at now: `ulsp run` once found one missing only
  // while it built the group, after `ulsp policy check` had said ok.
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.mount]]\npath = \"/nonexistent-mount-point\"\nstack = \"memfs:1M\"\n"),
            "p.toml:3: mount point /nonexistent-mount-point does not exist (ulsp makes no mount points: make it first)");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.mount]]\npath = \"/etc/hostname\"\nstack = \"memfs:1M\"\n"),
            "p.toml:3: mount point /etc/hostname is not a directory");
  EXPECT_EQ(Refusal("[group.g]\n[group.g.limits]\nmemory = \"lots\"\n"),
            "p.toml:3: `memory` in [group.g.limits]: give bytes, optionally with K, M, G or T");
  EXPECT_EQ(Refusal("[group.g]\n[group.g.limits]\nwall_seconds = -1\n"), "p.toml:3: `wall_seconds` in [group.g.limits] must be more than 0");
  EXPECT_EQ(Refusal("[group.g]\nhosts = { \"db\" = \"10.0.0.300\" }\n"), "p.toml:2: hosts: '10.0.0.300' is not an IPv4 or IPv6 address");
  EXPECT_EQ(Refusal("[group.g]\nmount = 3\n"), "p.toml:2: `mount` in [group.g] must be an array of tables: write [[group.g.mount]]");
  EXPECT_EQ(Refusal("group = 1\n"), "p.toml:1: `group` must be a table of groups: write [group.NAME]");
  EXPECT_EQ(Refusal("[groups.g]\n"), "p.toml:1: unknown key 'groups' in the file (known: group)");
  EXPECT_EQ(Refusal(""), "p.toml: no groups: declare one with [group.NAME]");
  EXPECT_EQ(Refusal("[group]\n"), "p.toml:1: no groups: declare one with [group.NAME]");
  EXPECT_EQ(Refusal("[group.g\n"), "p.toml:1: Error while parsing table header: expected ']', saw '\\n'");
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.net]]\naction = \"allow\"\nproto = \"unix\"\nto = \"/run/x\"\nports = 1\n"),
            "p.toml:6: a UNIX socket rule has no ports");
}

// The group's /dev is its own (made after its mounts): a mount there would be hidden.
TEST(Policy, AMountInDevIsRefused) {
  EXPECT_EQ(Refusal("[group.g]\n[[group.g.mount]]\npath = \"/dev/shm/x\"\nstack = \"memfs:1M\"\n"),
            "p.toml:3: mount path '/dev/shm/x' is in /dev, which is the group's own (its devices)");
}

TEST(Policy, MissingFileIsNamed) {
  EXPECT_EQ(LoadPolicy("/nonexistent/p.toml").error(), "/nonexistent/p.toml: No such file or directory");
}

// A directory was read as an empty file ("no groups"), /dev/zero and a huge file
// for ever or until memory ran out. A pipe (/dev/stdin) is read.
TEST(Policy, WhatIsNotAPolicyFileIsNamed) {
  testing::TempDir dir;
  EXPECT_EQ(LoadPolicy(dir.path()).error(), dir.path() + ": a directory, not a file");
  EXPECT_EQ(LoadPolicy("/dev/zero").error(), "/dev/zero: not a regular file or a pipe");
  ASSERT_EQ(testing::Shell("head -c 5000000 /dev/zero | tr '\\0' '#' > " + dir / "big.toml"), 0);
  EXPECT_EQ(LoadPolicy(dir / "big.toml").error(), dir / "big.toml: larger than 4 MiB");
  EXPECT_EQ(testing::Output("printf '[group.a]\\n' | " + std::string(ULSP_BIN) + " policy check /dev/stdin"),
            "/dev/stdin: ok: a (0 mounts, 0 net rules, net_default deny)\n");
}

TEST(Policy, TheShippedExamplesAreValid) {
  int seen = 0;
  for (const auto& e : std::filesystem::directory_iterator(std::string(ULSP_SOURCE_DIR) + "/policies")) {
    if (e.path().extension() != ".toml") continue;
    ++seen;
    auto p = LoadPolicy(e.path().string());
    EXPECT_TRUE(p.has_value()) << p.error();
  }
  EXPECT_GE(seen, 3);
}

}  // namespace
}  // namespace ulsp::core

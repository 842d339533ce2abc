@0xb7c4e1f09a3d2c58;
# The control family: what `ulsp ps` asks a running ulsp process (an `ulsp run`
# supervisor, a background `ulsp mount`) over its control socket, and the answer.
# The question is the connection itself; the answer is one Status message.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("ulsp::msgport::wire");

struct Status {
  pid @0 :UInt32;
  kind @1 :Text;          # "run" or "mount"
  command @2 :Text;
  startedAt @3 :Text;     # UTC, ISO 8601
  groups @4 :List(Group);
  mounts @5 :List(Mount);
  ulsps @6 :List(Ulsp);
  ports @7 :List(PortInfo);

  struct Group {
    name @0 :Text;
    policy @1 :Text;
    initPid @2 :UInt32;
    netDefault @3 :Text;
    notifications @4 :UInt64;   # seccomp notifications received
    inFlight @5 :UInt64;
    workers @6 :UInt64;
    allowed @7 :UInt64;
    denied @8 :UInt64;
    logged @9 :UInt64;
    kept @10 :UInt64;           # stayed inside the group (bind, loopback)
    processes @11 :UInt64;      # the command's processes and threads now (with a limit)
    processesMax @12 :UInt64;   # its `processes` limit; 0: none
  }
  struct Mount {
    path @0 :Text;
    stack @1 :Text;
    group @2 :Text;             # "" for a plain `ulsp mount`
    isolated @3 :Bool;
    requests @4 :UInt64;
    inFlight @5 :UInt64;
    nodes @6 :UInt64;           # nodes the kernel holds
  }
  struct Ulsp {
    name @0 :Text;
    kind @1 :Text;
    pid @2 :UInt32;
    restarts @3 :UInt64;
    state @4 :Text;
  }
  struct PortInfo {
    name @0 :Text;
    kind @1 :Text;              # "direct", "shared memory", "remote"
    put @2 :UInt64;
    replied @3 :UInt64;
    refused @4 :UInt64;
    badInput @5 :UInt64;
    inFlight @6 :UInt64;        # sent and not yet answered (the queue's depth)
    peer @7 :Text;
    state @8 :Text;
    rttUs @9 :Float64;
  }
}

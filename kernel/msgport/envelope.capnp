@0xd1c6a2b4e8f35a17;
# What crosses a process (or, later, host) boundary for one message: the request, or
# its reply. A family's own arguments (VFS, net) travel in `payload`, encoded as that
# family's own Cap'n Proto struct; inside one process nothing is encoded at all.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("ulsp::msgport::wire");

struct Envelope {
  id @0 :UInt64;          # the sender's correlation id; a reply carries its request's
  command @1 :UInt32;     # family-defined
  flags @2 :UInt32;       # the MsgFlag bits the other side may honour (SYNC, ABORTED)
  error @3 :Int32;        # in a reply: 0 or a positive errno
  fdCount @4 :UInt16;     # descriptors sent on the port's socket ahead of the envelope
  deadlineNs @5 :Int64;   # CLOCK_MONOTONIC nanoseconds; 0 for none
  payload @6 :Data;
}

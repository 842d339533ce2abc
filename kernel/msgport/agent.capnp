@0xe3a7c1d95b2f4068;
# Translation agents: a port carried across the network on Cap'n Proto RPC. An agent
# (`ulsp agent serve`) exports named layer stacks; a remote port (`ulsp mount
# --remote`) attaches to one and sends it VFS requests. Each request and its results
# are the vfs.capnp payloads an isolated server takes, inside an RPC call, so a mount
# served on another host behaves as one served in another process.
#
# Many calls are in flight on one connection at once (the RPC system numbers them);
# readdirplus answers a listing and its entries' attributes in one call, an opendir
# brings the listing and an open a small file's contents (see Stack.call).

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("ulsp::msgport::wire");

interface Agent {
  # The bootstrap capability of an agent's connection.
  attach @0 (name :Text, token :Data) -> (stack :Stack, version :UInt32);
  # The export `name`, as a stack of its own for this connection (its node ids and
  # open handles are this connection's). `token`: the shared secret, when the agent
  # was started with --token-file (empty otherwise). Fails with a message that says
  # what was wrong: an unknown name, a wrong token.
}

interface Stack {
  call @0 (op :UInt32, request :Data, listingChunk :UInt32)
      -> (error :Int32, reply :Data, prefetch :Data, prefetchEof :Bool, listing :List(Data));
  # One VFS request: `op` is the VfsOp, `request` a vfs.capnp VfsRequest. `error` is
  # 0 and `reply` a vfs.capnp VfsReply, or `error` a positive errno and no reply.
  # So that the caller answers what follows without a round trip:
  #  - a read-only open of a small regular file (128 KiB at most) brings the file's
  #    bytes, read through the stack right after the open: `prefetch` holds them
  #    from offset 0, and `prefetchEof` says they are all there is;
  #  - an opendir with `listingChunk` > 0 brings the listing: `listing` holds the
  #    replies of readdirplus requests of that size made right after the opendir
  #    (the first at offset 0, each next one where the last left off; 256 KiB in
  #    all at most), and `prefetchEof` says the last one ended the listing. Each
  #    entry counts a lookup, as a readdirplus does: the caller forgets those it
  #    does not hand on.

  ping @1 () -> ();
  # For the round-trip time `ulsp ps` shows, and to notice a dead link.
}

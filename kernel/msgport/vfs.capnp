@0xb5f0c7a3d2e19f48;
# The VFS family across a process boundary: a VfsRequest (vfs_message.h) going to an
# isolated ULSP, and its results coming back. Carried as an Envelope's payload on a
# shared-memory port; the Envelope's command is the operation (VfsOp).

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("ulsp::msgport::wire");

struct Attr {
  ino @0 :UInt64;
  mode @1 :UInt32;
  nlink @2 :UInt64;
  uid @3 :UInt32;
  gid @4 :UInt32;
  rdev @5 :UInt64;
  size @6 :Int64;
  blksize @7 :Int64;
  blocks @8 :Int64;
  atimeSec @9 :Int64;
  atimeNsec @10 :Int64;
  mtimeSec @11 :Int64;
  mtimeNsec @12 :Int64;
  ctimeSec @13 :Int64;
  ctimeNsec @14 :Int64;
}

struct VfsRequest {
  uid @0 :UInt32;
  gid @1 :UInt32;
  pid @2 :Int32;
  umaskTook @3 :UInt32;  # VfsContext::umask_took
  node @4 :UInt64;
  name @5 :Data;
  node2 @6 :UInt64;
  name2 @7 :Data;
  fh @8 :UInt64;
  fh2 @9 :UInt64;
  hasFh @10 :Bool;
  offset @11 :Int64;
  offset2 @12 :Int64;
  size @13 :UInt64;
  count @14 :UInt64;
  flags @15 :Int32;
  mode @16 :UInt32;
  rdev @17 :UInt64;
  attr @18 :Attr;
  in @19 :Data;
  timeout @20 :Float64;
  kernelIoOk @21 :Bool;  # open, create: the shim can give the kernel the file's descriptor
  handlelessOk @22 :Bool;  # opendir: the kernel can list without handles (vfs_message.h)
}

struct VfsReply {
  entryNode @0 :UInt64;
  entryGeneration @1 :UInt64;
  entryAttr @2 :Attr;
  entryAttrTimeout @3 :Float64;
  entryTimeout @4 :Float64;
  outAttr @5 :Attr;
  openFh @6 :UInt64;
  openFlags @7 :UInt32;   # bit 0 direct_io, 1 keep_cache, 2 nonseekable, 3 cache_readdir,
                          # 4 the message carries the file's descriptor (backing_fd),
                          # 5 it carries a copy's descriptor (copy_fd) instead,
                          # 6 a lend's file is held by the server (VfsOpenReply::held)
  out @8 :Data;
  outSize @9 :UInt64;
  statfs @10 :List(UInt64);  # bsize frsize blocks bfree bavail files ffree favail fsid flag namemax
  dirEnd @11 :Bool;          # readdir(plus): nothing follows `out` (VfsRequest::dir_end)
  changed @12 :List(UInt64); # nodes whose attributes changed besides (VfsRequest::changed)
  copyTag @13 :UInt64;       # with bit 5 of openFlags: VfsRequest::copy_tag
  btimeKnown @14 :Bool;      # getattr: out_btime is the file's birth time
  btimeSec @15 :Int64;
  btimeNsec @16 :Int64;
}

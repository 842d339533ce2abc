// VfsRequest across a process boundary (vfs.capnp): the shim encodes a request into a
// message's payload, the isolated ULSP decodes it, serves it and encodes the results,
// and the shim decodes them into the original request.
//
// Decoding treats its input as hostile (it comes from another process): a frame that
// is not a valid message of the schema, or whose fields exceed the kernel's limits,
// is refused with EBADMSG and leaves the request untouched or partly filled.
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/unique_fd.h"
#include "kernel/msgport/vfs_message.h"

namespace ulsp::msgport {

// Writes req's arguments into `out` (replacing its contents).
void EncodeVfsRequest(const VfsRequest& req, std::vector<std::byte>& out);
// Reads arguments into `req` (its op comes from the envelope's command). `in` data
// is copied into `storage`, which must live as long as req.in is used.
Result<void> DecodeVfsRequest(std::span<const std::byte> bytes, VfsRequest& req, std::vector<char>& storage);

// Writes req's results (those its op has) into `out`. An open's backing_fd is only
// marked: the sender attaches the descriptor to the message itself.
void EncodeVfsReply(const VfsRequest& req, std::vector<std::byte>& out);
// Reads results into `req`. `fds`: the message's descriptors; an open marked as
// carrying its file's descriptor gets the first as backing_fd (borrowed from the
// message), or none when the message carries none.
Result<void> DecodeVfsReply(std::span<const std::byte> bytes, VfsRequest& req, std::span<const UniqueFd> fds = {});

// A failed request's answer may carry the nodes it changed on its way (an overlay's
// copy-up before the last step failed), and nothing else. It is marked, so that a
// payload a port answers an error with by itself (a request whose server died keeps
// the request's bytes) is never read as one: a flat Cap'n Proto message starts with
// its segment count, which the mark does not.
void EncodeFailedVfsReply(const VfsRequest& req, std::vector<std::byte>& out);
// The nodes in a failed request's answer; none when `bytes` is not such an answer.
std::vector<uint64_t> DecodeFailedVfsReply(std::span<const std::byte> bytes);

}  // namespace ulsp::msgport

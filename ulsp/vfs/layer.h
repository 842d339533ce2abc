// Layer: one stage of a VFS stack. A request (msgport::VfsRequest, node-based like
// FUSE's low-level API) enters at the top layer; each layer answers it, changes it,
// logs it, refuses it, or passes it down to the layer below, which it owns. Layers
// stack inside one process, so a stack costs one kernel round trip, not one per layer.
//
// Thread-safety: Serve is called from many threads at once (one per request in
// flight); every layer must allow that. A layer lives as long as the stack.
#pragma once

#include <cerrno>
#include <climits>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

#include "kernel/msgport/vfs_message.h"

namespace ulsp::vfs {

using msgport::VfsOp;
using msgport::IsTmpfile;
using msgport::VfsRequest;

inline constexpr uint64_t kRootNode = FUSE_ROOT_ID;

class Layer {
 public:
  // `lower` is the layer below (nullptr for a bottom layer such as passthrough).
  explicit Layer(std::unique_ptr<Layer> lower) : lower_(std::move(lower)) {}
  virtual ~Layer() = default;
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  // Serves `req`: fills its results and returns 0, or returns a positive errno. Never
  // throws (a layer that fails to allocate answers ENOMEM).
  virtual int Serve(VfsRequest& req) noexcept = 0;

  // The path of `node` from the mount's root ("/" for the root) under the name the
  // kernel last looked it up by, or "" when the node is unknown. Layers that log or
  // filter by path ask this; a bottom layer answers from its node table.
  virtual std::string PathOf(uint64_t node) const { return lower_ ? lower_->PathOf(node) : ""; }

  // Nodes the kernel currently holds (lookup count above zero), for memory checks.
  virtual size_t NodeCount() const { return lower_ ? lower_->NodeCount() : 0; }

  // "passthrough", "trace", ...
  virtual std::string_view Name() const noexcept = 0;

  Layer* lower() const noexcept { return lower_.get(); }

 protected:
  // Passes `req` to the layer below. Unless this layer said it passes file data
  // unchanged, the kernel may not read and write the opened file by itself (it would
  // bypass this layer's Read and Write).
  int Down(VfsRequest& req) noexcept {
    if (!passes_file_data_) req.kernel_io_ok = false;
    if (!lists_through_) req.handleless_ok = false;
    return lower_->Serve(req);
  }
  // For a layer that neither sees nor changes what files contain once opened (a
  // view, a recorder of opens): the kernel may then read and write a file the layers
  // below opened straight on its descriptor (VfsOpenReply::backing_fd).
  void PassesFileData() noexcept { passes_file_data_ = true; }
  // For a layer that keeps nothing per directory handle (it passes opendir, readdir
  // and releasedir down, perhaps filtering names): the layers below may then list
  // without handles (VfsRequest::handleless_ok).
  void ListsThrough() noexcept { lists_through_ = true; }

 private:
  std::unique_ptr<Layer> lower_;
  bool passes_file_data_ = false;
  bool lists_through_ = false;
};

// What a file system answers for a name it is given to make, link or look up: 0 for a
// good one, ENAMETOOLONG past NAME_MAX (as ext4 says), EINVAL for an empty name or one
// holding '/' or NUL (which only a hostile peer sends; the kernel never does).
inline int NameError(std::string_view name) noexcept {
  if (name.size() > NAME_MAX) return ENAMETOOLONG;
  return name.empty() || name.find('/') != std::string_view::npos || name.find('\0') != std::string_view::npos ? EINVAL
                                                                                                                : 0;
}

// The path of `name` inside the directory whose path is `dir`.
inline std::string JoinPath(std::string_view dir, std::string_view name) {
  std::string p(dir);
  if (p.empty() || p.back() != '/') p += '/';
  p += name;
  return p;
}

}  // namespace ulsp::vfs

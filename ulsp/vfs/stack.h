// A layer stack from its SPEC, and the server that serves VFS messages with it.
//
// SPEC lists layers top first, comma-separated, each `name[:argument]`, for example
// `trace:/tmp/access.jsonl,view:/tmp/allow.txt,passthrough:/srv/src`. The last layer
// is a bottom layer (passthrough or memfs); the others sit on the one after them.
#pragma once

#include <expected>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kernel/msgport/port.h"
#include "ulsp/vfs/layer.h"

namespace ulsp::vfs {

struct LayerSpec {
  std::string name;
  std::string argument;
};

// Splits SPEC at its commas. A backslash takes the character after it as it is, so
// an argument may hold a comma (`passthrough:/srv/a\,b`) or a backslash (`\\`).
// Fails with a one-line message naming the bad part.
std::expected<std::vector<LayerSpec>, std::string> ParseStackSpec(std::string_view spec);

// The SPEC that ParseStackSpec splits into `layers`: each argument's commas and
// backslashes escaped.
std::string ComposeStackSpec(const std::vector<LayerSpec>& layers);

// PATH lexically normalised ("a/./b/.." is "a"), with no '/' at its end but the root's:
// "/src/.." is "/", "/src/dir/.." is "/src". What `mount` and `ulsp ps` show.
std::string NormalPath(const std::filesystem::path& path);

// SPEC with every path argument made absolute (against the current directory), so
// it means the same in a process that runs elsewhere.
std::expected<std::string, std::string> AbsoluteStackSpec(std::string_view spec);

// The directories a stack's layers serve, top first, resolved (symlinks followed; a
// directory not made yet is resolved as far as it exists): each passthrough DIR and
// each overlay UPPERDIR, as {layer name, path}. A mount point inside one would reach
// the mount through it.
std::vector<std::pair<std::string, std::string>> ServedDirectories(const std::vector<LayerSpec>& layers);

// True if A is B or lies inside it; both absolute and normal.
bool IsWithin(std::string_view a, std::string_view b);

// Fails, naming both, if a directory of a layer below an overlay is its UPPERDIR or
// lies inside it. BuildStack checks it too.
std::expected<void, std::string> CheckApart(const std::vector<LayerSpec>& layers);

// Builds the layers SPEC names, opening what they need (directories, logs, lists).
// Fails with a one-line message naming the layer and what was wrong.
std::expected<std::unique_ptr<Layer>, std::string> BuildStack(std::string_view spec);

// Serves VfsMessages with a stack: each message goes through the top layer and is
// replied with its result. Thread-safe as the layers are (they all are).
class StackServer final : public msgport::Server {
 public:
  explicit StackServer(std::unique_ptr<Layer> top) : top_(std::move(top)) {}
  void Serve(msgport::MessagePtr msg) noexcept override;
  Layer& top() const noexcept { return *top_; }

 private:
  std::unique_ptr<Layer> top_;
};

}  // namespace ulsp::vfs

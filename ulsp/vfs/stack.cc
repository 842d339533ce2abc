#include "ulsp/vfs/stack.h"

#include <filesystem>

#include "kernel/msgport/vfs_message.h"
#include "ulsp/vfs/memfs.h"
#include "ulsp/vfs/overlay.h"
#include "ulsp/vfs/passthrough.h"
#include "ulsp/vfs/trace.h"
#include "ulsp/vfs/view.h"

namespace ulsp::vfs {
namespace {

constexpr std::string_view kKnown = "passthrough:DIR, memfs:SIZE, overlay:UPPERDIR, trace:LOG, view:ALLOWLIST";

bool IsBottom(std::string_view name) { return name == "passthrough" || name == "memfs"; }

}  // namespace

std::expected<std::vector<LayerSpec>, std::string> ParseStackSpec(std::string_view spec) {
  std::vector<LayerSpec> layers;
  if (spec.empty()) return std::unexpected("empty stack: give layers, top first, e.g. trace:/tmp/t.jsonl,passthrough:/src");
  size_t start = 0;
  while (start <= spec.size()) {
    // One item, up to an unescaped comma, its escapes undone.
    std::string item;
    size_t end = start;
    for (; end < spec.size() && spec[end] != ','; ++end) {
      if (spec[end] == '\\') {
        if (++end == spec.size()) return std::unexpected("a '\\' at the end of the stack escapes nothing");
      }
      item += spec[end];
    }
    const size_t comma = end;
    if (item.empty()) return std::unexpected("empty layer at position " + std::to_string(layers.size() + 1) + " of the stack");
    const size_t colon = item.find(':');
    LayerSpec layer{item.substr(0, colon), colon == std::string::npos ? std::string() : item.substr(colon + 1)};
    if (layer.name != "passthrough" && layer.name != "memfs" && layer.name != "overlay" && layer.name != "trace" &&
        layer.name != "view")
      return std::unexpected("unknown layer '" + layer.name + "' (known: " + std::string(kKnown) + ")");
    if (layer.argument.empty()) return std::unexpected("layer '" + layer.name + "' needs an argument (" + std::string(kKnown) + ")");
    layers.push_back(std::move(layer));
    start = comma + 1;
  }
  for (size_t i = 0; i < layers.size(); ++i) {
    const bool last = i + 1 == layers.size();
    if (last && !IsBottom(layers[i].name))
      return std::unexpected("layer '" + layers[i].name +
                             "' needs a layer below it: end the stack with passthrough:DIR or memfs:SIZE");
    if (!last && IsBottom(layers[i].name))
      return std::unexpected("layer '" + layers[i].name + "' must be the last (bottom) layer of the stack");
  }
  return layers;
}

std::string ComposeStackSpec(const std::vector<LayerSpec>& layers) {
  std::string out;
  for (const LayerSpec& l : layers) {
    if (!out.empty()) out += ',';
    out += l.name;
    out += ':';
    for (char c : l.argument) {
      if (c == ',' || c == '\\') out += '\\';
      out += c;
    }
  }
  return out;
}

std::string NormalPath(const std::filesystem::path& path) {
  std::string s = path.lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

std::expected<std::string, std::string> AbsoluteStackSpec(std::string_view spec) {
  auto layers = ParseStackSpec(spec);
  if (!layers) return std::unexpected(layers.error());
  for (LayerSpec& l : *layers) {
    if (l.name == "memfs") continue;  // a size, not a path
    std::error_code ec;
    auto path = std::filesystem::absolute(l.argument, ec);
    if (ec) return std::unexpected(l.name + ":" + l.argument + ": " + ec.message());
    l.argument = NormalPath(path);
  }
  return ComposeStackSpec(*layers);
}

std::vector<std::pair<std::string, std::string>> ServedDirectories(const std::vector<LayerSpec>& layers) {
  std::vector<std::pair<std::string, std::string>> dirs;
  for (const LayerSpec& l : layers) {
    if (l.name != "passthrough" && l.name != "overlay") continue;
    std::error_code ec;
    auto path = std::filesystem::weakly_canonical(l.argument, ec);
    dirs.emplace_back(l.name, NormalPath(ec ? std::filesystem::path(l.argument) : path));
  }
  return dirs;
}

bool IsWithin(std::string_view a, std::string_view b) {
  if (!a.starts_with(b)) return false;
  return a.size() == b.size() || b == "/" || a[b.size()] == '/';
}

std::expected<void, std::string> CheckApart(const std::vector<LayerSpec>& layers) {
  // A directory below an overlay that lies inside its upper directory (or is it) is
  // written by the copy-ups and whiteouts that should keep it unchanged, and shows
  // them again through the mount. Kernel overlayfs refuses the same ("overlapping
  // lowerdir path"). An upper directory inside a lower one is allowed, as there: a
  // scratch layer over / is one.
  const auto dirs = ServedDirectories(layers);
  for (size_t i = 0; i < dirs.size(); ++i) {
    if (dirs[i].first != "overlay") continue;
    for (size_t j = i + 1; j < dirs.size(); ++j) {
      if (IsWithin(dirs[j].second, dirs[i].second))
        return std::unexpected(dirs[j].first + ":" + dirs[j].second + " lies inside overlay:" + dirs[i].second +
                               ", so the overlay's changes would land in the layer it keeps unchanged: put the upper "
                               "directory elsewhere");
    }
  }
  return {};
}

std::expected<std::unique_ptr<Layer>, std::string> BuildStack(std::string_view spec) {
  auto layers = ParseStackSpec(spec);
  if (!layers) return std::unexpected(layers.error());
  if (auto apart = CheckApart(*layers); !apart) return std::unexpected(apart.error());
  std::unique_ptr<Layer> below;
  for (auto it = layers->rbegin(); it != layers->rend(); ++it) {
    const LayerSpec& l = *it;
    if (l.name == "passthrough") {
      auto p = PassthroughLayer::Open(l.argument);
      if (!p) return std::unexpected("passthrough:" + l.argument + ": " + p.error().Describe());
      below = std::move(*p);
    } else if (l.name == "memfs") {
      auto m = MemfsLayer::Create(l.argument);
      if (!m) return std::unexpected(m.error());
      below = std::move(*m);
    } else if (l.name == "overlay") {
      auto o = OverlayLayer::Open(l.argument, std::move(below));
      if (!o) return std::unexpected(o.error());
      below = std::move(*o);
    } else if (l.name == "trace") {
      auto t = TraceLayer::Open(l.argument, std::move(below));
      if (!t) return std::unexpected("trace: cannot open the log " + t.error());
      below = std::move(*t);
    } else if (l.name == "view") {
      auto v = ViewLayer::Open(l.argument, std::move(below));
      if (!v) return std::unexpected("view:" + v.error());
      below = std::move(*v);
    }
  }
  return below;
}

void StackServer::Serve(msgport::MessagePtr msg) noexcept {
  auto* m = dynamic_cast<msgport::VfsMessage*>(msg.get());
  if (m == nullptr) {
    msgport::Reply(std::move(msg), EINVAL);
    return;
  }
  const int err = top_->Serve(m->req);
  msgport::Reply(std::move(msg), err);
}

}  // namespace ulsp::vfs

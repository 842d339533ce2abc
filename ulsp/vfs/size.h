// Sizes as people write them in stacks and policies: "64M", "2G", "4096".
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ulsp::vfs {

// A number of bytes, optionally with K, M, G or T (powers of 1024, either case).
// nullopt for anything else, zero, or more than 2^50 bytes.
inline std::optional<uint64_t> ParseSize(std::string_view text) {
  uint64_t value = 0;
  size_t used = 0;
  while (used < text.size() && text[used] >= '0' && text[used] <= '9') {
    if (value > (1ull << 50)) return std::nullopt;
    value = value * 10 + static_cast<uint64_t>(text[used++] - '0');
  }
  const std::string_view unit = text.substr(used);
  uint64_t scale = 0;
  if (unit.empty()) scale = 1;
  else if (unit == "K" || unit == "k") scale = 1ull << 10;
  else if (unit == "M" || unit == "m") scale = 1ull << 20;
  else if (unit == "G" || unit == "g") scale = 1ull << 30;
  else if (unit == "T" || unit == "t") scale = 1ull << 40;
  if (used == 0 || scale == 0 || value == 0 || value > (1ull << 50) / scale) return std::nullopt;
  return value * scale;
}

}  // namespace ulsp::vfs

// The text excerpt compiled into the binary (generated from launcher/demo/austen_excerpt.txt), so
// the embedded demo needs no file next to the binary.
#pragma once

#include <string_view>

namespace qlora {
std::string_view demo_text();
}

// Human-readable quantities for banners, tables and error messages, shared by every layer.
#pragma once

#include <string>

namespace qlora {

std::string format_bytes(double bytes);  // "12.34 MiB": binary units, two decimals above bytes

}  // namespace qlora

// Code point classes from the generated range table (scripts/make_unicode_tables.py), with a
// direct table for the first 256 code points where almost all text lives.
#include "data/unicode.h"

#include <algorithm>
#include <array>

namespace qlora::data::unicode {
namespace {

struct CodePointRange {
  uint32_t first;
  uint32_t last;
  CodePointClass kind;
};

constexpr CodePointRange kRanges[] = {
#include "data/unicode_categories.inc"
};

CodePointClass classify_by_search(uint32_t code_point) {
  const auto* end = std::end(kRanges);
  const auto* found = std::upper_bound(std::begin(kRanges), end, code_point,
                                       [](uint32_t value, const CodePointRange& range) { return value < range.first; });
  if (found == std::begin(kRanges)) return CodePointClass::other;
  --found;
  return code_point <= found->last ? found->kind : CodePointClass::other;
}

const std::array<CodePointClass, 256>& latin1_classes() {
  static const std::array<CodePointClass, 256> table = [] {
    std::array<CodePointClass, 256> classes{};
    for (uint32_t code_point = 0; code_point < 256; ++code_point) classes[code_point] = classify_by_search(code_point);
    return classes;
  }();
  return table;
}

}  // namespace

CodePointClass classify(uint32_t code_point) {
  if (code_point < 256) return latin1_classes()[code_point];
  return classify_by_search(code_point);
}

bool is_white_space(uint32_t code_point) {
  // The Unicode White_Space property (PropList.txt), which is what Oniguruma's \s matches.
  if (code_point <= 0x20) return code_point == 0x20 || (code_point >= 0x09 && code_point <= 0x0D);
  if (code_point < 0x85) return false;
  return code_point == 0x85 || code_point == 0xA0 || code_point == 0x1680 ||
         (code_point >= 0x2000 && code_point <= 0x200A) || code_point == 0x2028 || code_point == 0x2029 ||
         code_point == 0x202F || code_point == 0x205F || code_point == 0x3000;
}

size_t decode_utf8(std::string_view text, size_t position, uint32_t* code_point) {
  const auto byte = [&](size_t offset) { return static_cast<uint8_t>(text[position + offset]); };
  const uint8_t lead = byte(0);
  if (lead < 0x80) {
    *code_point = lead;
    return 1;
  }
  size_t length = 0;
  uint32_t value = 0;
  uint32_t minimum = 0;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2, value = lead & 0x1F, minimum = 0x80;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3, value = lead & 0x0F, minimum = 0x800;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4, value = lead & 0x07, minimum = 0x10000;
  }
  if (length == 0 || position + length > text.size()) {
    *code_point = 0xFFFD;
    return 1;
  }
  for (size_t i = 1; i < length; ++i) {
    const uint8_t continuation = byte(i);
    if ((continuation & 0xC0) != 0x80) {
      *code_point = 0xFFFD;
      return 1;
    }
    value = (value << 6) | (continuation & 0x3F);
  }
  if (value < minimum || value > 0x10FFFF || (value >= 0xD800 && value <= 0xDFFF)) {
    *code_point = 0xFFFD;
    return 1;
  }
  *code_point = value;
  return length;
}

void append_utf8(std::string& out, uint32_t code_point) {
  if (code_point < 0x80) {
    out += static_cast<char>(code_point);
  } else if (code_point < 0x800) {
    out += static_cast<char>(0xC0 | (code_point >> 6));
    out += static_cast<char>(0x80 | (code_point & 0x3F));
  } else if (code_point < 0x10000) {
    out += static_cast<char>(0xE0 | (code_point >> 12));
    out += static_cast<char>(0x80 | ((code_point >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code_point & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (code_point >> 18));
    out += static_cast<char>(0x80 | ((code_point >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((code_point >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code_point & 0x3F));
  }
}

}  // namespace qlora::data::unicode

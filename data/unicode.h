// The little Unicode the byte-level BPE pre-tokenizers need: UTF-8 decoding that never fails
// (training text may hold stray bytes), and the classes their regular expressions test: \p{L}
// (letters), \p{N} (numbers) and \s (the White_Space property, as Oniguruma reads \s).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace qlora::data::unicode {

enum class CodePointClass : uint8_t { other, letter, number };

CodePointClass classify(uint32_t code_point);
bool is_white_space(uint32_t code_point);

// Decodes the code point starting at text[position] and returns its length in bytes. A byte that
// does not begin a valid, shortest-form UTF-8 sequence decodes alone, as U+FFFD.
size_t decode_utf8(std::string_view text, size_t position, uint32_t* code_point);
void append_utf8(std::string& out, uint32_t code_point);

}  // namespace qlora::data::unicode

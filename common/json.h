// JSON for every layer: nlohmann-json's value type, plus the few checks its accessors leave out
// (untrusted text becomes a FormatError naming where it came from; integers must really be integers;
// output is valid UTF-8 even when a model file's strings are not).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/errors.h"

namespace qlora {

// Keys come out sorted, as every writer in this project has always produced them.
using Json = nlohmann::json;

// Parses untrusted text. Throws FormatError "<label>: invalid JSON: <reason at line L, column C>";
// beyond RFC 8259 it also refuses an object repeating a key and nesting deeper than 256 levels.
Json parse_json(std::string_view text, const std::string& label);

// Serialises compactly (indent < 0) or pretty-printed; bytes that are not UTF-8 become U+FFFD rather
// than producing a file other tools refuse.
std::string dump_json(const Json& value, int indent = -1);

// Typed reads of object fields that throw FormatError naming `label` and the key on a missing field
// or a wrong type; an integer field holding 3.5 is an error, not 3.
int64_t json_int(const Json& object, const std::string& key, const std::string& label);
double json_double(const Json& object, const std::string& key, const std::string& label);
std::string json_string(const Json& object, const std::string& key, const std::string& label);
bool json_bool(const Json& object, const std::string& key, const std::string& label);

// The same for optional fields: absent or null gives `fallback`; present with a wrong type throws.
int64_t json_int_or(const Json& object, const std::string& key, int64_t fallback, const std::string& label);
double json_double_or(const Json& object, const std::string& key, double fallback, const std::string& label);
std::string json_string_or(const Json& object, const std::string& key, const std::string& fallback,
                           const std::string& label);
bool json_bool_or(const Json& object, const std::string& key, bool fallback, const std::string& label);

// A value already in hand (an array element, say), checked the same way; `what` names it.
int64_t json_as_int(const Json& value, const std::string& what);

}  // namespace qlora

// Checked reads and safe writes on top of nlohmann-json.
#include "common/json.h"

#include <cmath>
#include <limits>
#include <vector>

namespace qlora {
namespace {

constexpr int kMaxNesting = 256;

[[noreturn]] void fail(const std::string& label, const std::string& what) { throw FormatError(label + ": " + what); }

const Json& field(const Json& object, const std::string& key, const std::string& label) {
  if (!object.is_object()) fail(label, "expected a JSON object holding \"" + key + "\"");
  const auto found = object.find(key);
  if (found == object.end()) fail(label, "missing field \"" + key + "\"");
  return *found;
}

const Json* optional_field(const Json& object, const std::string& key, const std::string& label) {
  if (!object.is_object()) fail(label, "expected a JSON object holding \"" + key + "\"");
  const auto found = object.find(key);
  if (found == object.end() || found->is_null()) return nullptr;
  return &*found;
}

std::string kind_of(const Json& value) {
  return std::string(value.type_name());
}

double as_double(const Json& value, const std::string& what) {
  if (!value.is_number()) throw FormatError(what + " must be a number, not " + kind_of(value));
  return value.get<double>();
}

std::string as_string(const Json& value, const std::string& what) {
  if (!value.is_string()) throw FormatError(what + " must be a string, not " + kind_of(value));
  return value.get<std::string>();
}

bool as_bool(const Json& value, const std::string& what) {
  if (!value.is_boolean()) throw FormatError(what + " must be true or false, not " + kind_of(value));
  return value.get<bool>();
}

std::string field_name(const std::string& label, const std::string& key) { return label + ": field \"" + key + "\""; }

}  // namespace

Json parse_json(std::string_view text, const std::string& label) {
  // nlohmann's parser keeps the last of repeated keys and nests without limit. Readers disagree on
  // which repeated key wins, which matters for headers describing byte ranges, so a repeat is an
  // error; and copying or dumping a value recurses, so untrusted nesting is capped before it can
  // exhaust the stack.
  std::vector<size_t> keys_of_open_objects;
  const Json::parser_callback_t check = [&](int depth, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        keys_of_open_objects.push_back(0);
        [[fallthrough]];
      case Json::parse_event_t::array_start:
        if (depth >= kMaxNesting)
          fail(label, "invalid JSON: nesting deeper than " + std::to_string(kMaxNesting) + " levels");
        break;
      case Json::parse_event_t::key:
        ++keys_of_open_objects.back();
        break;
      case Json::parse_event_t::object_end:
        if (parsed.size() != keys_of_open_objects.back()) fail(label, "invalid JSON: an object repeats a key");
        keys_of_open_objects.pop_back();
        break;
      default:
        break;
    }
    return true;
  };
  try {
    return Json::parse(text.begin(), text.end(), check);
  } catch (const Json::exception& error) {
    // nlohmann's message starts with "[json.exception.parse_error.101] parse error at line 1,
    // column 5: ..."; the part after the bracket is what a user can act on. Numbers too large for
    // a double arrive as out_of_range rather than parse_error, and are just as much bad input.
    std::string reason = error.what();
    const auto bracket = reason.find("] ");
    if (bracket != std::string::npos) reason = reason.substr(bracket + 2);
    fail(label, "invalid JSON: " + reason);
  }
}

std::string dump_json(const Json& value, int indent) {
  return value.dump(indent, ' ', /*ensure_ascii=*/false, Json::error_handler_t::replace);
}

int64_t json_as_int(const Json& value, const std::string& what) {
  if (value.is_number_unsigned()) {
    const auto unsigned_value = value.get<uint64_t>();
    if (unsigned_value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw FormatError(what + " is beyond the int64 range");
    return static_cast<int64_t>(unsigned_value);
  }
  if (value.is_number_integer()) return value.get<int64_t>();
  if (value.is_number_float()) {
    // Writers such as Python's json sometimes emit 4096.0 for an integer field; accept exact ones.
    constexpr double kTwoTo63 = 9223372036854775808.0;
    const double number = value.get<double>();
    if (std::trunc(number) == number && number >= -kTwoTo63 && number < kTwoTo63) return static_cast<int64_t>(number);
    throw FormatError(what + " must be an integer, not " + dump_json(value));
  }
  throw FormatError(what + " must be an integer, not " + kind_of(value));
}

int64_t json_int(const Json& object, const std::string& key, const std::string& label) {
  return json_as_int(field(object, key, label), field_name(label, key));
}
double json_double(const Json& object, const std::string& key, const std::string& label) {
  return as_double(field(object, key, label), field_name(label, key));
}
std::string json_string(const Json& object, const std::string& key, const std::string& label) {
  return as_string(field(object, key, label), field_name(label, key));
}
bool json_bool(const Json& object, const std::string& key, const std::string& label) {
  return as_bool(field(object, key, label), field_name(label, key));
}

int64_t json_int_or(const Json& object, const std::string& key, int64_t fallback, const std::string& label) {
  const Json* value = optional_field(object, key, label);
  return value ? json_as_int(*value, field_name(label, key)) : fallback;
}
double json_double_or(const Json& object, const std::string& key, double fallback, const std::string& label) {
  const Json* value = optional_field(object, key, label);
  return value ? as_double(*value, field_name(label, key)) : fallback;
}
std::string json_string_or(const Json& object, const std::string& key, const std::string& fallback,
                           const std::string& label) {
  const Json* value = optional_field(object, key, label);
  return value ? as_string(*value, field_name(label, key)) : fallback;
}
bool json_bool_or(const Json& object, const std::string& key, bool fallback, const std::string& label) {
  const Json* value = optional_field(object, key, label);
  return value ? as_bool(*value, field_name(label, key)) : fallback;
}

}  // namespace qlora

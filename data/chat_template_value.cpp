// Python's value semantics as chat templates see them through Jinja2: truthiness, str() and repr(),
// equality and ordering, len() and iteration, case mapping, and transformers' tojson (json.dumps).
// Byte equality with transformers depends on every one of these matching Python exactly.
#include <algorithm>
#include <charconv>
#include <clocale>
#include <cmath>
#include <cstdio>
#include <cwctype>
#include <locale.h>

#include "data/chat_template_internal.h"
#include "data/unicode.h"

namespace qlora::data::jinja {

const Value* Value::find(const std::string& key) const {
  if (!dict) return nullptr;
  for (const auto& [name, value] : *dict) {
    if (name == key) return &value;
  }
  return nullptr;
}

Value value_from_json(const Json& json) {
  switch (json.type()) {
    case Json::value_t::null: return Value::none();
    case Json::value_t::boolean: return Value::from_bool(json.get<bool>());
    case Json::value_t::number_integer: return Value::from_int(json.get<int64_t>());
    case Json::value_t::number_unsigned: {
      uint64_t u = json.get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) throw EvalError{"integer " + std::to_string(u) + " is too large"};
      return Value::from_int(static_cast<int64_t>(u));
    }
    case Json::value_t::number_float: return Value::from_double(json.get<double>());
    case Json::value_t::string: return Value::from_string(json.get<std::string>());
    case Json::value_t::array: {
      List items;
      items.reserve(json.size());
      for (const auto& item : json) items.push_back(value_from_json(item));
      return Value::from_list(std::move(items));
    }
    case Json::value_t::object: {
      Dict items;
      items.reserve(json.size());
      for (auto it = json.begin(); it != json.end(); ++it) items.emplace_back(it.key(), value_from_json(it.value()));
      return Value::from_dict(std::move(items));
    }
    default: throw EvalError{"binary JSON values cannot be passed to a chat template"};
  }
}

bool truthy(const Value& value) {
  switch (value.kind) {
    case Kind::Undefined:
    case Kind::None: return false;
    case Kind::Boolean: return value.boolean;
    case Kind::Integer: return value.integer != 0;
    case Kind::Float: return value.number != 0.0;
    case Kind::String: return !value.text.empty();
    case Kind::List:
    case Kind::Tuple: return !value.list->empty();
    case Kind::Dict: return !value.dict->empty();
    case Kind::Namespace:
    case Kind::Callable: return true;
  }
  return false;
}

std::string python_float_repr(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  if (value == 0) return std::signbit(value) ? "-0.0" : "0.0";
  // Shortest round-tripping digits, then Python's layout: scientific below 1e-4 and from 1e16 on.
  char buffer[64];
  auto result = std::to_chars(buffer, buffer + sizeof buffer, value, std::chars_format::scientific);
  std::string scientific(buffer, result.ptr);
  bool negative = scientific[0] == '-';
  if (negative) scientific.erase(0, 1);
  size_t e = scientific.find('e');
  std::string mantissa = scientific.substr(0, e);
  int exponent = std::stoi(scientific.substr(e + 1));
  std::string digits;
  for (char c : mantissa) {
    if (c != '.') digits += c;
  }
  std::string out;
  if (exponent < -4 || exponent >= 16) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char exponent_text[16];
    std::snprintf(exponent_text, sizeof exponent_text, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    out += exponent_text;
  } else if (exponent < 0) {
    out = "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
  } else if (static_cast<int>(digits.size()) <= exponent + 1) {
    out = digits + std::string(static_cast<size_t>(exponent + 1 - static_cast<int>(digits.size())), '0') + ".0";
  } else {
    out = digits.substr(0, static_cast<size_t>(exponent + 1)) + "." + digits.substr(static_cast<size_t>(exponent + 1));
  }
  return negative ? "-" + out : out;
}

namespace {

std::string repr_string(const std::string& text) {
  bool has_single = text.find('\'') != std::string::npos;
  bool has_double = text.find('"') != std::string::npos;
  char quote = (has_single && !has_double) ? '"' : '\'';
  std::string out(1, quote);
  for (unsigned char c : text) {
    if (c == '\\') out += "\\\\";
    else if (c == static_cast<unsigned char>(quote)) { out += '\\'; out += static_cast<char>(c); }
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) {
      char escape[8];
      std::snprintf(escape, sizeof escape, "\\x%02x", c);
      out += escape;
    } else {
      out += static_cast<char>(c);
    }
  }
  out += quote;
  return out;
}

}  // namespace

std::string to_repr(const Value& value) {
  switch (value.kind) {
    case Kind::String: return repr_string(value.text);
    case Kind::List:
    case Kind::Tuple: {
      std::string out = value.kind == Kind::List ? "[" : "(";
      for (size_t i = 0; i < value.list->size(); ++i) {
        if (i) out += ", ";
        out += to_repr((*value.list)[i]);
      }
      if (value.kind == Kind::Tuple && value.list->size() == 1) out += ",";
      out += value.kind == Kind::List ? "]" : ")";
      return out;
    }
    case Kind::Dict: {
      std::string out = "{";
      bool first = true;
      for (const auto& [key, item] : *value.dict) {
        if (!first) out += ", ";
        first = false;
        out += repr_string(key) + ": " + to_repr(item);
      }
      return out + "}";
    }
    case Kind::Namespace: return "<Namespace>";
    case Kind::Callable: return "<function " + value.text + ">";
    default: return to_str(value);
  }
}

std::string to_str(const Value& value) {
  switch (value.kind) {
    case Kind::Undefined: return "";
    case Kind::None: return "None";
    case Kind::Boolean: return value.boolean ? "True" : "False";
    case Kind::Integer: return std::to_string(value.integer);
    case Kind::Float: return python_float_repr(value.number);
    case Kind::String: return value.text;
    default: return to_repr(value);
  }
}

std::string type_name(const Value& value) {
  switch (value.kind) {
    case Kind::Undefined: return "Undefined";
    case Kind::None: return "NoneType";
    case Kind::Boolean: return "bool";
    case Kind::Integer: return "int";
    case Kind::Float: return "float";
    case Kind::String: return "str";
    case Kind::List: return "list";
    case Kind::Tuple: return "tuple";
    case Kind::Dict: return "dict";
    case Kind::Namespace: return "Namespace";
    case Kind::Callable: return "function";
  }
  return "object";
}

namespace {

// Decodes one code point at `pos` (advancing it); a malformed byte stands for itself as U+FFFD.
uint32_t next_code_point(const std::string& text, size_t& pos) {
  unsigned char lead = static_cast<unsigned char>(text[pos]);
  int length = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 0;
  if (length == 0 || pos + static_cast<size_t>(length) > text.size()) {
    ++pos;
    return 0xFFFD;
  }
  uint32_t code_point = length == 1 ? lead : lead & (0xFF >> (length + 1));
  for (int i = 1; i < length; ++i) code_point = (code_point << 6) | (static_cast<unsigned char>(text[pos + i]) & 0x3F);
  pos += static_cast<size_t>(length);
  return code_point;
}

locale_t unicode_locale() {
  static locale_t locale = newlocale(LC_CTYPE_MASK, "C.UTF-8", static_cast<locale_t>(nullptr));
  return locale;
}

std::string map_case(const std::string& text, bool upper) {
  std::string out;
  out.reserve(text.size());
  locale_t locale = unicode_locale();
  size_t pos = 0;
  while (pos < text.size()) {
    unsigned char byte = static_cast<unsigned char>(text[pos]);
    if (byte < 0x80) {
      out += static_cast<char>(upper ? (byte >= 'a' && byte <= 'z' ? byte - 32 : byte)
                                     : (byte >= 'A' && byte <= 'Z' ? byte + 32 : byte));
      ++pos;
      continue;
    }
    uint32_t code_point = next_code_point(text, pos);
    if (upper && code_point == 0xDF) {  // Python's full case mapping: "ß".upper() == "SS"
      out += "SS";
      continue;
    }
    if (locale != static_cast<locale_t>(nullptr)) {
      code_point = static_cast<uint32_t>(upper ? towupper_l(static_cast<wint_t>(code_point), locale)
                                               : towlower_l(static_cast<wint_t>(code_point), locale));
    }
    unicode::append_utf8(out, code_point);
  }
  return out;
}

}  // namespace

std::string utf8_upper(const std::string& text) { return map_case(text, true); }
std::string utf8_lower(const std::string& text) { return map_case(text, false); }

int64_t python_length(const Value& value) {
  switch (value.kind) {
    case Kind::Undefined: return 0;
    case Kind::String: {
      int64_t count = 0;
      for (unsigned char c : value.text) count += (c & 0xC0) != 0x80;
      return count;
    }
    case Kind::List:
    case Kind::Tuple: return static_cast<int64_t>(value.list->size());
    case Kind::Dict: return static_cast<int64_t>(value.dict->size());
    default: throw EvalError{"object of type '" + type_name(value) + "' has no len()"};
  }
}

List iterate(const Value& value) {
  switch (value.kind) {
    case Kind::Undefined: return {};
    case Kind::List:
    case Kind::Tuple: return *value.list;
    case Kind::Dict: {
      List keys;
      for (const auto& item : *value.dict) keys.push_back(Value::from_string(item.first));
      return keys;
    }
    case Kind::String: {
      List characters;
      size_t pos = 0;
      while (pos < value.text.size()) {
        size_t start = pos;
        next_code_point(value.text, pos);
        characters.push_back(Value::from_string(value.text.substr(start, pos - start)));
      }
      return characters;
    }
    default: throw EvalError{"'" + type_name(value) + "' object is not iterable"};
  }
}

bool python_equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.kind == Kind::Float || b.kind == Kind::Float) {
      double x = a.kind == Kind::Float ? a.number : static_cast<double>(a.kind == Kind::Boolean ? a.boolean : a.integer);
      double y = b.kind == Kind::Float ? b.number : static_cast<double>(b.kind == Kind::Boolean ? b.boolean : b.integer);
      return x == y;
    }
    int64_t x = a.kind == Kind::Boolean ? a.boolean : a.integer;
    int64_t y = b.kind == Kind::Boolean ? b.boolean : b.integer;
    return x == y;
  }
  if (a.kind != b.kind) {
    bool both_sequences = a.is_sequence() && b.is_sequence();
    if (!both_sequences || a.kind != b.kind) return false;
  }
  switch (a.kind) {
    case Kind::Undefined:
    case Kind::None: return true;
    case Kind::String: return a.text == b.text;
    case Kind::List:
    case Kind::Tuple: {
      if (a.list->size() != b.list->size()) return false;
      for (size_t i = 0; i < a.list->size(); ++i) {
        if (!python_equal((*a.list)[i], (*b.list)[i])) return false;
      }
      return true;
    }
    case Kind::Dict: {
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& [key, item] : *a.dict) {
        const Value* other = b.find(key);
        if (!other || !python_equal(item, *other)) return false;
      }
      return true;
    }
    case Kind::Namespace: return a.dict == b.dict;
    default: return false;
  }
}

bool python_less(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    auto as_double = [](const Value& v) {
      return v.kind == Kind::Float ? v.number : static_cast<double>(v.kind == Kind::Boolean ? v.boolean : v.integer);
    };
    if (a.kind != Kind::Float && b.kind != Kind::Float) {
      return (a.kind == Kind::Boolean ? a.boolean : a.integer) < (b.kind == Kind::Boolean ? b.boolean : b.integer);
    }
    return as_double(a) < as_double(b);
  }
  if (a.is_string() && b.is_string()) {
    // Python compares code points; UTF-8 byte order is the same order.
    return a.text < b.text;
  }
  if (a.kind == Kind::List && b.kind == Kind::List) {
    size_t n = std::min(a.list->size(), b.list->size());
    for (size_t i = 0; i < n; ++i) {
      if (!python_equal((*a.list)[i], (*b.list)[i])) return python_less((*a.list)[i], (*b.list)[i]);
    }
    return a.list->size() < b.list->size();
  }
  throw EvalError{"'<' not supported between instances of '" + type_name(a) + "' and '" + type_name(b) + "'"};
}

namespace {

void dump_json_string(std::string& out, const std::string& text, bool ensure_ascii) {
  out += '"';
  size_t pos = 0;
  while (pos < text.size()) {
    unsigned char c = static_cast<unsigned char>(text[pos]);
    if (c < 0x80) {
      ++pos;
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default:
          if (c < 0x20 || (ensure_ascii && c == 0x7f)) {
            char escape[8];
            std::snprintf(escape, sizeof escape, "\\u%04x", c);
            out += escape;
          } else {
            out += static_cast<char>(c);
          }
      }
      continue;
    }
    size_t start = pos;
    uint32_t code_point = next_code_point(text, pos);
    if (!ensure_ascii) {
      out.append(text, start, pos - start);
      continue;
    }
    char escape[16];
    if (code_point >= 0x10000) {
      uint32_t v = code_point - 0x10000;
      std::snprintf(escape, sizeof escape, "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
    } else {
      std::snprintf(escape, sizeof escape, "\\u%04x", code_point);
    }
    out += escape;
  }
  out += '"';
}

void dump_json_value(std::string& out, const Value& value, const JsonDumpOptions& options, int depth) {
  const std::string item_separator =
      options.custom_separators ? options.item_separator : (options.indent >= 0 ? "," : ", ");
  const std::string key_separator = options.custom_separators ? options.key_separator : ": ";
  auto newline = [&](int level) {
    if (options.indent < 0) return;
    out += '\n';
    out.append(static_cast<size_t>(options.indent * level), ' ');
  };
  switch (value.kind) {
    case Kind::None: out += "null"; return;
    case Kind::Boolean: out += value.boolean ? "true" : "false"; return;
    case Kind::Integer: out += std::to_string(value.integer); return;
    case Kind::Float:
      if (std::isnan(value.number)) out += "NaN";
      else if (std::isinf(value.number)) out += value.number > 0 ? "Infinity" : "-Infinity";
      else out += python_float_repr(value.number);
      return;
    case Kind::String: dump_json_string(out, value.text, options.ensure_ascii); return;
    case Kind::List:
    case Kind::Tuple: {
      if (value.list->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < value.list->size(); ++i) {
        if (i) out += item_separator;
        newline(depth + 1);
        dump_json_value(out, (*value.list)[i], options, depth + 1);
      }
      newline(depth);
      out += ']';
      return;
    }
    case Kind::Dict: {
      if (value.dict->empty()) {
        out += "{}";
        return;
      }
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& item : *value.dict) items.push_back(&item);
      if (options.sort_keys) {
        std::stable_sort(items.begin(), items.end(), [](auto* x, auto* y) { return x->first < y->first; });
      }
      out += '{';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += item_separator;
        newline(depth + 1);
        dump_json_string(out, items[i]->first, options.ensure_ascii);
        out += key_separator;
        dump_json_value(out, items[i]->second, options, depth + 1);
      }
      newline(depth);
      out += '}';
      return;
    }
    default: throw EvalError{"Object of type " + type_name(value) + " is not JSON serializable"};
  }
}

}  // namespace

std::string python_json_dumps(const Value& value, const JsonDumpOptions& options) {
  std::string out;
  dump_json_value(out, value, options, 0);
  return out;
}

}  // namespace qlora::data::jinja

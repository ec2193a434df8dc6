// Json value type: a strict recursive-descent parser (RFC 8259, no extensions) and a writer whose
// output parses back to an equal value. Inputs are untrusted checkpoint headers, so every malformed
// byte is an error naming its offset rather than something to be repaired.
#include "shard/json.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <system_error>
#include <utility>

namespace qlora::shard {

namespace {

constexpr int kMaxDepth = 256;

const char* kind_name(Json::Kind kind) {
  switch (kind) {
    case Json::Kind::null: return "null";
    case Json::Kind::boolean: return "a boolean";
    case Json::Kind::number: return "a number";
    case Json::Kind::string: return "a string";
    case Json::Kind::array: return "an array";
    case Json::Kind::object: return "an object";
  }
  return "unknown";
}

[[noreturn]] void kind_mismatch(const char* wanted, Json::Kind actual) {
  throw JsonError(std::string("JSON value is ") + kind_name(actual) + ", expected " + wanted);
}

// Describes the byte at an error position so messages stay printable for binary garbage.
std::string describe_byte(const char* data, size_t size, size_t offset) {
  if (offset >= size) return "end of input";
  const unsigned char byte = static_cast<unsigned char>(data[offset]);
  if (byte >= 0x20 && byte < 0x7f) return std::string("'") + static_cast<char>(byte) + "'";
  char buffer[16];
  std::snprintf(buffer, sizeof buffer, "byte 0x%02x", byte);
  return buffer;
}

void append_utf8(std::string& out, uint32_t code_point) {
  if (code_point < 0x80) {
    out.push_back(static_cast<char>(code_point));
  } else if (code_point < 0x800) {
    out.push_back(static_cast<char>(0xc0 | (code_point >> 6)));
    out.push_back(static_cast<char>(0x80 | (code_point & 0x3f)));
  } else if (code_point < 0x10000) {
    out.push_back(static_cast<char>(0xe0 | (code_point >> 12)));
    out.push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | (code_point & 0x3f)));
  } else {
    out.push_back(static_cast<char>(0xf0 | (code_point >> 18)));
    out.push_back(static_cast<char>(0x80 | ((code_point >> 12) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | (code_point & 0x3f)));
  }
}

class Parser {
 public:
  Parser(const char* data, size_t size) : data_(data), size_(size) {}

  Json parse_document() {
    skip_whitespace();
    Json value = parse_value(0);
    skip_whitespace();
    if (pos_ != size_) fail(pos_, "unexpected " + describe_byte(data_, size_, pos_) + " after the JSON value");
    return value;
  }

 private:
  [[noreturn]] void fail(size_t offset, const std::string& what) const {
    throw JsonError("JSON parse error at byte offset " + std::to_string(offset) + ": " + what);
  }

  [[noreturn]] void expected(const char* what) const {
    fail(pos_, std::string("expected ") + what + ", found " + describe_byte(data_, size_, pos_));
  }

  void skip_whitespace() {
    while (pos_ < size_) {
      const char c = data_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }

  bool consume_literal(const char* literal) {
    const size_t length = std::strlen(literal);
    if (size_ - pos_ < length || std::memcmp(data_ + pos_, literal, length) != 0) return false;
    pos_ += length;
    return true;
  }

  Json parse_value(int depth) {
    if (pos_ >= size_) expected("a JSON value");
    switch (data_[pos_]) {
      case '{': return parse_object(depth + 1);
      case '[': return parse_array(depth + 1);
      case '"': return Json(parse_string());
      case 't':
        if (consume_literal("true")) return Json(true);
        break;
      case 'f':
        if (consume_literal("false")) return Json(false);
        break;
      case 'n':
        if (consume_literal("null")) return Json();
        break;
      default:
        if (data_[pos_] == '-' || (data_[pos_] >= '0' && data_[pos_] <= '9')) return parse_number();
        break;
    }
    expected("a JSON value");
  }

  void check_depth(int depth) const {
    if (depth > kMaxDepth) fail(pos_, "nesting deeper than " + std::to_string(kMaxDepth) + " levels");
  }

  Json parse_object(int depth) {
    check_depth(depth);
    ++pos_;  // '{'
    Json::Object members;
    skip_whitespace();
    if (pos_ < size_ && data_[pos_] == '}') {
      ++pos_;
      return Json(std::move(members));
    }
    while (true) {
      skip_whitespace();
      if (pos_ >= size_ || data_[pos_] != '"') expected("a string key");
      const size_t key_offset = pos_;
      std::string key = parse_string();
      skip_whitespace();
      if (pos_ >= size_ || data_[pos_] != ':') expected("':' after an object key");
      ++pos_;
      skip_whitespace();
      Json value = parse_value(depth);
      // Duplicate keys are ambiguous (readers disagree on which wins), which matters for headers
      // that describe byte ranges; refuse them.
      if (!members.emplace(std::move(key), std::move(value)).second) {
        fail(key_offset, "duplicate object key");
      }
      skip_whitespace();
      if (pos_ < size_ && data_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < size_ && data_[pos_] == '}') {
        ++pos_;
        return Json(std::move(members));
      }
      expected("',' or '}' in an object");
    }
  }

  Json parse_array(int depth) {
    check_depth(depth);
    ++pos_;  // '['
    Json::Array elements;
    skip_whitespace();
    if (pos_ < size_ && data_[pos_] == ']') {
      ++pos_;
      return Json(std::move(elements));
    }
    while (true) {
      skip_whitespace();
      elements.push_back(parse_value(depth));
      skip_whitespace();
      if (pos_ < size_ && data_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < size_ && data_[pos_] == ']') {
        ++pos_;
        return Json(std::move(elements));
      }
      expected("',' or ']' in an array");
    }
  }

  uint32_t parse_hex4() {
    if (size_ - pos_ < 4) fail(pos_, "truncated \\u escape");
    uint32_t value = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = data_[pos_];
      uint32_t digit;
      if (c >= '0' && c <= '9') digit = c - '0';
      else if (c >= 'a' && c <= 'f') digit = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') digit = c - 'A' + 10;
      else fail(pos_, "invalid hex digit " + describe_byte(data_, size_, pos_) + " in \\u escape");
      value = value * 16 + digit;
      ++pos_;
    }
    return value;
  }

  // Validates one raw (unescaped) UTF-8 sequence starting at pos_ and copies it, rejecting
  // overlong forms, surrogates and code points past U+10FFFF.
  void copy_utf8_sequence(std::string& out) {
    const size_t start = pos_;
    const unsigned char lead = static_cast<unsigned char>(data_[pos_]);
    int continuation;
    uint32_t code_point;
    uint32_t minimum;
    if (lead >= 0xc2 && lead <= 0xdf) {
      continuation = 1, code_point = lead & 0x1f, minimum = 0x80;
    } else if (lead >= 0xe0 && lead <= 0xef) {
      continuation = 2, code_point = lead & 0x0f, minimum = 0x800;
    } else if (lead >= 0xf0 && lead <= 0xf4) {
      continuation = 3, code_point = lead & 0x07, minimum = 0x10000;
    } else {
      fail(start, "invalid UTF-8 lead byte in string");
    }
    if (size_ - pos_ - 1 < static_cast<size_t>(continuation)) fail(start, "truncated UTF-8 sequence in string");
    for (int i = 1; i <= continuation; ++i) {
      const unsigned char byte = static_cast<unsigned char>(data_[pos_ + i]);
      if ((byte & 0xc0) != 0x80) fail(start, "invalid UTF-8 continuation byte in string");
      code_point = (code_point << 6) | (byte & 0x3f);
    }
    if (code_point < minimum || code_point > 0x10ffff || (code_point >= 0xd800 && code_point <= 0xdfff)) {
      fail(start, "invalid UTF-8 sequence in string");
    }
    out.append(data_ + pos_, continuation + 1);
    pos_ += continuation + 1;
  }

  std::string parse_string() {
    const size_t open = pos_;
    ++pos_;  // '"'
    std::string out;
    while (true) {
      // Copy the run of plain ASCII in one go; headers are mostly long ASCII names.
      const size_t run_start = pos_;
      while (pos_ < size_) {
        const unsigned char c = static_cast<unsigned char>(data_[pos_]);
        if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80) break;
        ++pos_;
      }
      out.append(data_ + run_start, pos_ - run_start);
      if (pos_ >= size_) fail(open, "unterminated string");
      const unsigned char c = static_cast<unsigned char>(data_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) fail(pos_, "unescaped control character in string");
      if (c >= 0x80) {
        copy_utf8_sequence(out);
        continue;
      }
      // Backslash escape.
      const size_t escape_offset = pos_;
      ++pos_;
      if (pos_ >= size_) fail(open, "unterminated string");
      const char e = data_[pos_++];
      switch (e) {
        case '"': out.push_back('"'); break;
        case '\\': out.push_back('\\'); break;
        case '/': out.push_back('/'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'u': {
          uint32_t code_point = parse_hex4();
          if (code_point >= 0xdc00 && code_point <= 0xdfff) {
            fail(escape_offset, "\\u escape is a lone low surrogate");
          }
          if (code_point >= 0xd800 && code_point <= 0xdbff) {
            if (size_ - pos_ < 2 || data_[pos_] != '\\' || data_[pos_ + 1] != 'u') {
              fail(escape_offset, "\\u escape is a high surrogate without a following low surrogate");
            }
            pos_ += 2;
            const uint32_t low = parse_hex4();
            if (low < 0xdc00 || low > 0xdfff) {
              fail(escape_offset, "\\u escape is a high surrogate without a following low surrogate");
            }
            code_point = 0x10000 + ((code_point - 0xd800) << 10) + (low - 0xdc00);
          }
          append_utf8(out, code_point);
          break;
        }
        default:
          fail(escape_offset, "invalid escape sequence in string");
      }
    }
  }

  Json parse_number() {
    const size_t start = pos_;
    bool negative = false;
    if (data_[pos_] == '-') {
      negative = true;
      ++pos_;
    }
    auto is_digit = [&](size_t at) { return at < size_ && data_[at] >= '0' && data_[at] <= '9'; };
    if (!is_digit(pos_)) expected("a digit");
    if (data_[pos_] == '0') {
      ++pos_;
      if (is_digit(pos_)) fail(start, "leading zeros are not allowed in numbers");
    } else {
      while (is_digit(pos_)) ++pos_;
    }
    bool integral = true;
    if (pos_ < size_ && data_[pos_] == '.') {
      integral = false;
      ++pos_;
      if (!is_digit(pos_)) expected("a digit after the decimal point");
      while (is_digit(pos_)) ++pos_;
    }
    if (pos_ < size_ && (data_[pos_] == 'e' || data_[pos_] == 'E')) {
      integral = false;
      ++pos_;
      if (pos_ < size_ && (data_[pos_] == '+' || data_[pos_] == '-')) ++pos_;
      if (!is_digit(pos_)) expected("a digit in the exponent");
      while (is_digit(pos_)) ++pos_;
    }
    const char* first = data_ + start;
    const char* last = data_ + pos_;
    if (integral) {
      // "-0" stays a double so that its sign survives a round trip.
      if (!(negative && pos_ - start == 2)) {
        int64_t value = 0;
        const auto result = std::from_chars(first, last, value);
        if (result.ec == std::errc() && result.ptr == last) return Json(value);
      }
      // Integers past int64 fall through to the nearest double, as other JSON readers do.
    }
    double value = 0.0;
    const auto result = std::from_chars(first, last, value);
    if (result.ec == std::errc::result_out_of_range) {
      // from_chars reports underflow and overflow alike; only overflow is an error.
      const std::string text(first, last);
      value = std::strtod(text.c_str(), nullptr);
    } else if (result.ec != std::errc() || result.ptr != last) {
      fail(start, "malformed number");
    }
    if (!std::isfinite(value)) fail(start, "number is out of the range of a double");
    return Json(value);
  }

  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};

void append_escaped(std::string& out, const std::string& text) {
  out.push_back('"');
  for (const char raw : text) {
    const unsigned char c = static_cast<unsigned char>(raw);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buffer[8];
          std::snprintf(buffer, sizeof buffer, "\\u%04x", c);
          out += buffer;
        } else {
          out.push_back(raw);  // UTF-8 passes through unchanged
        }
    }
  }
  out.push_back('"');
}

void append_double(std::string& out, double value) {
  if (!std::isfinite(value)) throw JsonError("JSON cannot represent a non-finite number");
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
  std::string text(buffer, result.ptr);
  // Keep a fraction marker so that a double reads back as a double, not an integer.
  if (text.find_first_of(".eE") == std::string::npos) text += ".0";
  out += text;
}

void newline_and_indent(std::string& out, int indent, int level) {
  out.push_back('\n');
  out.append(static_cast<size_t>(indent) * level, ' ');
}

}  // namespace

Json::Json(bool value) : kind_(Kind::boolean), bool_(value) {}

Json::Json(double value) : kind_(Kind::number), number_(value) {}

Json::Json(int64_t value)
    : kind_(Kind::number), number_(static_cast<double>(value)), number_is_integer_(true), integer_(value) {}

Json::Json(std::string value) : kind_(Kind::string), string_(std::move(value)) {}

Json::Json(Array value) : kind_(Kind::array), array_(std::make_shared<Array>(std::move(value))) {}

Json::Json(Object value) : kind_(Kind::object), object_(std::make_shared<Object>(std::move(value))) {}

Json Json::parse(const std::string& text) { return parse(text.data(), text.size()); }

Json Json::parse(const char* data, size_t size) {
  Parser parser(data, size);
  return parser.parse_document();
}

bool Json::as_bool() const {
  if (kind_ != Kind::boolean) kind_mismatch("a boolean", kind_);
  return bool_;
}

double Json::as_double() const {
  if (kind_ != Kind::number) kind_mismatch("a number", kind_);
  return number_is_integer_ ? static_cast<double>(integer_) : number_;
}

int64_t Json::as_int() const {
  if (kind_ != Kind::number) kind_mismatch("an integer", kind_);
  if (number_is_integer_) return integer_;
  // 2^63 is exactly representable, so these bounds are exact.
  constexpr double kTwoTo63 = 9223372036854775808.0;
  if (std::trunc(number_) != number_ || number_ < -kTwoTo63 || number_ >= kTwoTo63) {
    char buffer[64];
    std::snprintf(buffer, sizeof buffer, "%.17g", number_);
    throw JsonError(std::string("JSON number ") + buffer + " is not an integer in the int64 range");
  }
  return static_cast<int64_t>(number_);
}

const std::string& Json::as_string() const {
  if (kind_ != Kind::string) kind_mismatch("a string", kind_);
  return string_;
}

const Json::Array& Json::as_array() const {
  if (kind_ != Kind::array) kind_mismatch("an array", kind_);
  return *array_;
}

const Json::Object& Json::as_object() const {
  if (kind_ != Kind::object) kind_mismatch("an object", kind_);
  return *object_;
}

// Copies share containers; a mutable access detaches first so that Json keeps value semantics.
Json::Array& Json::as_array() {
  if (kind_ != Kind::array) kind_mismatch("an array", kind_);
  if (array_.use_count() > 1) array_ = std::make_shared<Array>(*array_);
  return *array_;
}

Json::Object& Json::as_object() {
  if (kind_ != Kind::object) kind_mismatch("an object", kind_);
  if (object_.use_count() > 1) object_ = std::make_shared<Object>(*object_);
  return *object_;
}

bool Json::contains(const std::string& key) const {
  return kind_ == Kind::object && object_->count(key) != 0;
}

const Json& Json::at(const std::string& key) const {
  const Object& members = as_object();
  const auto found = members.find(key);
  if (found == members.end()) throw JsonError("JSON object has no key '" + key + "'");
  return found->second;
}

const Json& Json::at(size_t index) const {
  const Array& elements = as_array();
  if (index >= elements.size()) {
    throw JsonError("JSON array index " + std::to_string(index) + " is out of range (size " +
                    std::to_string(elements.size()) + ")");
  }
  return elements[index];
}

Json& Json::operator[](const std::string& key) {
  if (kind_ == Kind::null) *this = Json(Object{});
  return as_object()[key];
}

size_t Json::size() const {
  if (kind_ == Kind::array) return array_->size();
  if (kind_ == Kind::object) return object_->size();
  kind_mismatch("an array or an object", kind_);
}

namespace {

// Optional fields: absent or JSON null means "use the default" (configs write null for unset
// fields), but a present value of the wrong kind is a real error and still throws.
const Json* optional_member(const Json& json, const std::string& key) {
  if (json.is_null()) return nullptr;
  const Json::Object& members = json.as_object();
  const auto found = members.find(key);
  if (found == members.end() || found->second.is_null()) return nullptr;
  return &found->second;
}

}  // namespace

int64_t Json::get_int(const std::string& key, int64_t fallback) const {
  const Json* member = optional_member(*this, key);
  return member ? member->as_int() : fallback;
}

double Json::get_double(const std::string& key, double fallback) const {
  const Json* member = optional_member(*this, key);
  return member ? member->as_double() : fallback;
}

std::string Json::get_string(const std::string& key, const std::string& fallback) const {
  const Json* member = optional_member(*this, key);
  return member ? member->as_string() : fallback;
}

bool Json::get_bool(const std::string& key, bool fallback) const {
  const Json* member = optional_member(*this, key);
  return member ? member->as_bool() : fallback;
}

std::string Json::dump(int indent) const {
  std::string out;
  // A lambda defined here shares the member function's access to the stored number form, which
  // decides between integer and double output.
  auto write = [&out, indent](const Json& value, int level, auto& self) -> void {
    switch (value.kind_) {
      case Kind::null: out += "null"; return;
      case Kind::boolean: out += value.bool_ ? "true" : "false"; return;
      case Kind::number:
        if (value.number_is_integer_) out += std::to_string(value.integer_);
        else append_double(out, value.number_);
        return;
      case Kind::string: append_escaped(out, value.string_); return;
      case Kind::array: {
        if (value.array_->empty()) {
          out += "[]";
          return;
        }
        out.push_back('[');
        bool first = true;
        for (const Json& element : *value.array_) {
          if (!first) out.push_back(',');
          first = false;
          if (indent > 0) newline_and_indent(out, indent, level + 1);
          self(element, level + 1, self);
        }
        if (indent > 0) newline_and_indent(out, indent, level);
        out.push_back(']');
        return;
      }
      case Kind::object: {
        if (value.object_->empty()) {
          out += "{}";
          return;
        }
        out.push_back('{');
        bool first = true;
        for (const auto& [key, member] : *value.object_) {
          if (!first) out.push_back(',');
          first = false;
          if (indent > 0) newline_and_indent(out, indent, level + 1);
          append_escaped(out, key);
          out += indent > 0 ? ": " : ":";
          self(member, level + 1, self);
        }
        if (indent > 0) newline_and_indent(out, indent, level);
        out.push_back('}');
        return;
      }
    }
  };
  write(*this, 0, write);
  return out;
}

}  // namespace qlora::shard

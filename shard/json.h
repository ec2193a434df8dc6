// A small JSON value type with a strict parser and a writer: config.json, safetensors and GGUF
// headers, adapter_config.json and the store's attributes all need one, and the project's fixed
// dependencies include no JSON library.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/json.h"

namespace qlora::shard {

struct JsonError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Json {
 public:
  enum class Kind { null, boolean, number, string, array, object };
  using Array = std::vector<Json>;
  using Object = std::map<std::string, Json>;

  Json() = default;                                   // null
  Json(std::nullptr_t) {}
  Json(bool value);
  Json(double value);
  Json(int value) : Json(static_cast<int64_t>(value)) {}
  Json(int64_t value);                                // kept exact up to 2^63
  Json(uint64_t value) : Json(static_cast<int64_t>(value)) {}
  Json(const char* value) : Json(std::string(value)) {}
  Json(std::string value);
  Json(Array value);
  Json(Object value);

  // Bridge to common/json.h while the last users of this type move over; it goes with this file.
  Json(const qlora::Json& value) : Json(parse(qlora::dump_json(value))) {}
  operator qlora::Json() const { return qlora::parse_json(dump(), "JSON value"); }

  // Throws JsonError naming the byte offset and what was expected. Rejects trailing garbage,
  // depth over 256, invalid UTF-8 escapes and non-finite numbers.
  static Json parse(const std::string& text);
  static Json parse(const char* data, size_t size);

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::null; }
  bool is_number() const { return kind_ == Kind::number; }
  bool is_string() const { return kind_ == Kind::string; }
  bool is_array() const { return kind_ == Kind::array; }
  bool is_object() const { return kind_ == Kind::object; }
  bool is_bool() const { return kind_ == Kind::boolean; }

  // Accessors throw JsonError on a kind mismatch (or a non-integral number for as_int).
  bool as_bool() const;
  double as_double() const;
  int64_t as_int() const;
  const std::string& as_string() const;
  const Array& as_array() const;
  const Object& as_object() const;
  Array& as_array();
  Object& as_object();

  bool contains(const std::string& key) const;      // false unless an object holding key
  const Json& at(const std::string& key) const;     // throws JsonError naming the missing key
  const Json& at(size_t index) const;
  Json& operator[](const std::string& key);         // makes this an object if null
  size_t size() const;                              // array or object element count

  // Typed lookups with a default, for optional config fields.
  int64_t get_int(const std::string& key, int64_t fallback) const;
  double get_double(const std::string& key, double fallback) const;
  std::string get_string(const std::string& key, const std::string& fallback) const;
  bool get_bool(const std::string& key, bool fallback) const;

  // Compact by default; indent > 0 pretty-prints. Object keys come out sorted.
  std::string dump(int indent = 0) const;

 private:
  Kind kind_ = Kind::null;
  bool bool_ = false;
  double number_ = 0.0;
  bool number_is_integer_ = false;
  int64_t integer_ = 0;
  std::string string_;
  std::shared_ptr<Array> array_;
  std::shared_ptr<Object> object_;
};

}  // namespace qlora::shard

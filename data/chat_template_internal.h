// Internals of the chat template interpreter (data/chat_template.h): the value model (Python's
// semantics as Jinja2 exposes them to templates), the lexer's tokens and the syntax tree the parser
// builds and the renderer walks. Used by data/chat_template*.cpp only.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/json.h"
#include "data/chat_template.h"

namespace qlora::data::jinja {

struct Value;
using List = std::vector<Value>;
// Python dicts keep insertion order; keys here are always strings (all chat templates need).
using Dict = std::vector<std::pair<std::string, Value>>;

// Callable: a global function or macro, named by `text`.
enum class Kind { Undefined, None, Boolean, Integer, Float, String, List, Tuple, Dict, Namespace, Callable };

struct Value {
  Kind kind = Kind::Undefined;
  bool boolean = false;
  int64_t integer = 0;
  double number = 0;
  // String: the text. Undefined: what Jinja's UndefinedError would say when it is used.
  std::string text;
  std::shared_ptr<List> list;  // List and Tuple
  std::shared_ptr<Dict> dict;  // Dict and Namespace (a namespace is shared and mutable by identity)

  static Value undefined(std::string reason) {
    Value value;
    value.text = std::move(reason);
    return value;
  }
  static Value none() {
    Value value;
    value.kind = Kind::None;
    return value;
  }
  static Value from_bool(bool b) {
    Value value;
    value.kind = Kind::Boolean;
    value.boolean = b;
    return value;
  }
  static Value from_int(int64_t i) {
    Value value;
    value.kind = Kind::Integer;
    value.integer = i;
    return value;
  }
  static Value from_double(double d) {
    Value value;
    value.kind = Kind::Float;
    value.number = d;
    return value;
  }
  static Value from_string(std::string s) {
    Value value;
    value.kind = Kind::String;
    value.text = std::move(s);
    return value;
  }
  static Value from_list(List items, bool tuple = false) {
    Value value;
    value.kind = tuple ? Kind::Tuple : Kind::List;
    value.list = std::make_shared<List>(std::move(items));
    return value;
  }
  static Value from_dict(Dict items, bool is_namespace = false) {
    Value value;
    value.kind = is_namespace ? Kind::Namespace : Kind::Dict;
    value.dict = std::make_shared<Dict>(std::move(items));
    return value;
  }

  bool is_undefined() const { return kind == Kind::Undefined; }
  bool is_string() const { return kind == Kind::String; }
  bool is_sequence() const { return kind == Kind::List || kind == Kind::Tuple; }
  bool is_number() const { return kind == Kind::Integer || kind == Kind::Float || kind == Kind::Boolean; }
  const Value* find(const std::string& key) const;  // dict/namespace member or nullptr
};

// Errors carry no line; the renderer adds the template line where it catches them.
struct EvalError {
  std::string message;
};
// raise_exception(message) called by the template.
struct RaisedError {
  std::string message;
};

Value value_from_json(const Json& json);
bool truthy(const Value& value);
// Python's str(): what {{ }} prints.
std::string to_str(const Value& value);
// Python's repr() (strings quoted as Python quotes them).
std::string to_repr(const Value& value);
std::string python_float_repr(double value);
// transformers' tojson: json.dumps(value, ensure_ascii, indent, separators, sort_keys).
struct JsonDumpOptions {
  bool ensure_ascii = false;
  int indent = -1;  // < 0: none
  std::string item_separator;  // empty: Python's default for the indent
  std::string key_separator;
  bool custom_separators = false;
  bool sort_keys = false;
};
std::string python_json_dumps(const Value& value, const JsonDumpOptions& options);
bool python_equal(const Value& a, const Value& b);
// Python's a < b for numbers and strings; anything else throws EvalError.
bool python_less(const Value& a, const Value& b);
std::string type_name(const Value& value);  // "str", "int", "dict", ... as Python names them
std::string utf8_upper(const std::string& text);
std::string utf8_lower(const std::string& text);
// Python's len(): code points for strings.
int64_t python_length(const Value& value);
// Iterating like Python: list items, dict keys, string characters; Undefined is empty.
List iterate(const Value& value);

// ---- syntax tree --------------------------------------------------------------------------------

struct Expr;
using ExprPtr = std::shared_ptr<const Expr>;

enum class ExprType {
  Literal, Name, ListLiteral, TupleLiteral, DictLiteral, Attribute, Subscript, Slice, Unary, Binary,
  Compare, And, Or, Not, Conditional, Filter, Test, Call
};

struct Expr {
  ExprType type;
  int line = 0;
  Value literal;                          // Literal
  std::string name;                       // Name, Attribute, Filter, Test, operator of Unary/Binary
  std::vector<ExprPtr> children;          // operands, arguments (the subject first for Filter/Test)
  std::vector<std::string> operators;     // Compare: one per comparison
  std::vector<std::pair<std::string, ExprPtr>> keyword_arguments;
  bool negated = false;                   // Test: `is not`
  bool has_else = false;                  // Conditional
};

struct Node;
using NodePtr = std::shared_ptr<const Node>;
using Body = std::vector<NodePtr>;

enum class NodeType { Text, Output, If, For, Set, SetBlock, Macro, Break, Continue, Generation };

struct Node {
  NodeType type;
  int line = 0;
  std::string text;                                  // Text
  ExprPtr expression;                                // Output, Set value, For iterable
  std::vector<std::pair<ExprPtr, Body>> branches;    // If: conditions (null for else) and bodies
  std::vector<std::string> targets;                  // For / Set names; Set "ns.attr" as {ns, attr}
  bool attribute_target = false;                     // Set ns.attr = ...
  ExprPtr filter;                                    // For ... if filter
  Body body;                                         // For, SetBlock, Macro, Generation
  Body else_body;                                    // For
  std::string macro_name;
  std::vector<std::pair<std::string, ExprPtr>> macro_parameters;  // defaults may be null
};

struct Program {
  Body body;
};

// Throws ChatTemplateError naming `origin`, the line and the construct.
std::shared_ptr<const Program> parse_template(const std::string& source, const std::string& origin);
std::string render_program(const Program& program, const std::string& origin, const Value& context);

}  // namespace qlora::data::jinja

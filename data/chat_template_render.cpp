// The renderer of the chat template interpreter: walks the syntax tree with Jinja2's scoping (a for
// loop's body gets a fresh scope each iteration, `if` gets none, namespaces are shared by identity),
// Jinja's Undefined (prints as "", fails when used in arithmetic or attribute access) and the
// globals, filters, tests and methods transformers' sandbox lets chat templates use.
#include <algorithm>
#include <cmath>
#include <ctime>
#include <cwctype>
#include <locale.h>
#include <map>
#include <unordered_map>

#include "data/chat_template_internal.h"

namespace qlora::data::jinja {
namespace {

enum class Flow { Normal, Break, Continue };

[[noreturn]] void undefined_error(const Value& value) { throw EvalError{value.text}; }

const std::vector<uint32_t>& python_whitespace() {
  static const std::vector<uint32_t> whitespace = {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20,
                                                   0x85, 0xA0, 0x1680, 0x2000, 0x2001, 0x2002, 0x2003, 0x2004,
                                                   0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200A, 0x2028, 0x2029,
                                                   0x202F, 0x205F, 0x3000};
  return whitespace;
}

std::vector<uint32_t> decode(const std::string& text) {
  std::vector<uint32_t> code_points;
  List characters = iterate(Value::from_string(text));
  code_points.reserve(characters.size());
  for (const auto& character : characters) {
    const std::string& c = character.text;
    unsigned char lead = static_cast<unsigned char>(c[0]);
    uint32_t cp = c.size() == 1 ? lead : lead & (0xFF >> (c.size() + 1));
    for (size_t i = 1; i < c.size(); ++i) cp = (cp << 6) | (static_cast<unsigned char>(c[i]) & 0x3F);
    code_points.push_back(cp);
  }
  return code_points;
}

// The code point starting at byte `pos` and its length in bytes (a stray byte counts as one).
uint32_t code_point_at(const std::string& text, size_t pos, size_t* length) {
  unsigned char lead = static_cast<unsigned char>(text[pos]);
  size_t n = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 1;
  if (pos + n > text.size()) n = 1;
  uint32_t cp = n == 1 ? lead : lead & (0xFF >> (n + 1));
  for (size_t i = 1; i < n; ++i) cp = (cp << 6) | (static_cast<unsigned char>(text[pos + i]) & 0x3F);
  *length = n;
  return cp;
}

// Python's str.strip / lstrip / rstrip, with `chars` (None: Unicode whitespace).
std::string python_strip(const std::string& text, const Value& chars, bool left, bool right) {
  std::vector<uint32_t> strip_set;
  if (chars.kind == Kind::String) strip_set = decode(chars.text);
  else if (chars.kind != Kind::None && !chars.is_undefined()) throw EvalError{"strip arg must be None or str"};
  const std::vector<uint32_t>& set = chars.kind == Kind::String ? strip_set : python_whitespace();
  auto stripped = [&](uint32_t cp) { return std::find(set.begin(), set.end(), cp) != set.end(); };
  size_t begin = 0, end = text.size();
  if (left) {
    while (begin < end) {
      size_t length = 0;
      if (!stripped(code_point_at(text, begin, &length))) break;
      begin += length;
    }
  }
  if (right) {
    while (end > begin) {
      size_t start = end - 1;
      while (start > begin && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
      size_t length = 0;
      uint32_t cp = code_point_at(text, start, &length);
      if (start + length != end || !stripped(cp)) break;
      end = start;
    }
  }
  return text.substr(begin, end - begin);
}

locale_t unicode_ctype() {
  static locale_t locale = newlocale(LC_CTYPE_MASK, "C.UTF-8", static_cast<locale_t>(nullptr));
  return locale;
}

bool is_cased_letter(const std::string& character) {
  if (character.size() == 1) return std::isalpha(static_cast<unsigned char>(character[0])) != 0;
  uint32_t cp = decode(character)[0];
  return unicode_ctype() != static_cast<locale_t>(nullptr) && iswalpha_l(static_cast<wint_t>(cp), unicode_ctype());
}

// Python's str.title(): a letter after a non-letter is upper-cased, every other letter lower-cased.
std::string python_title(const std::string& text) {
  std::string out;
  bool previous_cased = false;
  for (const auto& character : iterate(Value::from_string(text))) {
    bool cased = is_cased_letter(character.text);
    out += cased ? (previous_cased ? utf8_lower(character.text) : utf8_upper(character.text)) : character.text;
    previous_cased = cased;
  }
  return out;
}

std::string python_capitalize(const std::string& text) {
  List characters = iterate(Value::from_string(text));
  if (characters.empty()) return "";
  std::string rest;
  for (size_t i = 1; i < characters.size(); ++i) rest += characters[i].text;
  return utf8_upper(characters[0].text) + utf8_lower(rest);
}

// Jinja's title filter: words split at runs of whitespace, '-', '(', '{', '[' and '<'.
std::string jinja_title(const std::string& text) {
  std::string out;
  List characters = iterate(Value::from_string(text));
  bool word_start = true;
  for (const auto& character : characters) {
    const std::string& c = character.text;
    bool separator = c.size() == 1 && (c[0] == '-' || c[0] == '(' || c[0] == '{' || c[0] == '[' || c[0] == '<' ||
                                        c[0] == ' ' || c[0] == '\t' || c[0] == '\n' || c[0] == '\r' || c[0] == '\v' ||
                                        c[0] == '\f');
    if (!separator && c.size() > 1) {
      uint32_t cp = decode(c)[0];
      const auto& whitespace = python_whitespace();
      separator = std::find(whitespace.begin(), whitespace.end(), cp) != whitespace.end();
    }
    if (separator) {
      out += c;
      word_start = true;
    } else {
      out += word_start ? utf8_upper(c) : utf8_lower(c);
      word_start = false;
    }
  }
  return out;
}

std::string python_replace(const std::string& text, const std::string& old_text, const std::string& new_text,
                           int64_t count) {
  if (old_text.empty()) {
    // Python inserts `new` between every character (and at both ends).
    std::string out;
    int64_t done = 0;
    List characters = iterate(Value::from_string(text));
    for (const auto& character : characters) {
      if (count < 0 || done < count) {
        out += new_text;
        ++done;
      }
      out += character.text;
    }
    if (count < 0 || done < count) out += new_text;
    return out;
  }
  std::string out;
  size_t pos = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    size_t found = text.find(old_text, pos);
    if (found == std::string::npos) break;
    out.append(text, pos, found - pos);
    out += new_text;
    pos = found + old_text.size();
    ++done;
  }
  out.append(text, pos, std::string::npos);
  return out;
}

Value python_split(const std::string& text, const Value& separator, int64_t max_split) {
  List parts;
  if (separator.kind == Kind::None || separator.is_undefined()) {
    std::vector<uint32_t> code_points = decode(text);
    List characters = iterate(Value::from_string(text));
    const auto& whitespace = python_whitespace();
    auto is_ws = [&](size_t i) { return std::find(whitespace.begin(), whitespace.end(), code_points[i]) != whitespace.end(); };
    size_t i = 0, n = characters.size();
    while (i < n) {
      while (i < n && is_ws(i)) ++i;
      if (i >= n) break;
      std::string part;
      if (max_split >= 0 && static_cast<int64_t>(parts.size()) == max_split) {
        size_t end = n;
        while (end > i && is_ws(end - 1)) --end;
        for (size_t k = i; k < end; ++k) part += characters[k].text;
        parts.push_back(Value::from_string(part));
        break;
      }
      while (i < n && !is_ws(i)) part += characters[i++].text;
      parts.push_back(Value::from_string(part));
    }
    return Value::from_list(std::move(parts));
  }
  if (separator.kind != Kind::String) throw EvalError{"must be str or None, not " + type_name(separator)};
  if (separator.text.empty()) throw EvalError{"empty separator"};
  size_t pos = 0;
  while (max_split < 0 || static_cast<int64_t>(parts.size()) < max_split) {
    size_t found = text.find(separator.text, pos);
    if (found == std::string::npos) break;
    parts.push_back(Value::from_string(text.substr(pos, found - pos)));
    pos = found + separator.text.size();
  }
  parts.push_back(Value::from_string(text.substr(pos)));
  return Value::from_list(std::move(parts));
}

int64_t as_int(const Value& value, const char* what) {
  if (value.kind == Kind::Integer) return value.integer;
  if (value.kind == Kind::Boolean) return value.boolean;
  throw EvalError{std::string(what) + " must be an integer, not " + type_name(value)};
}

double as_double(const Value& value) {
  if (value.kind == Kind::Float) return value.number;
  return static_cast<double>(value.kind == Kind::Boolean ? value.boolean : value.integer);
}

// Python's slice index adjustment for a sequence of `length` items.
List slice_items(const List& items, const Value& start_value, const Value& stop_value, const Value& step_value) {
  int64_t length = static_cast<int64_t>(items.size());
  int64_t step = step_value.kind == Kind::None || step_value.is_undefined() ? 1 : as_int(step_value, "slice step");
  if (step == 0) throw EvalError{"slice step cannot be zero"};
  auto adjust = [&](const Value& bound, int64_t fallback) {
    if (bound.kind == Kind::None || bound.is_undefined()) return fallback;
    int64_t index = as_int(bound, "slice index");
    if (index < 0) {
      index += length;
      if (index < 0) index = step < 0 ? -1 : 0;
    } else if (index >= length) {
      index = step < 0 ? length - 1 : length;
    }
    return index;
  };
  int64_t start = adjust(start_value, step < 0 ? length - 1 : 0);
  int64_t stop = adjust(stop_value, step < 0 ? -1 : length);
  List out;
  if (step > 0) {
    for (int64_t i = start; i < stop; i += step) out.push_back(items[static_cast<size_t>(i)]);
  } else {
    for (int64_t i = start; i > stop; i += step) out.push_back(items[static_cast<size_t>(i)]);
  }
  return out;
}

bool is_dict_method(const std::string& name) {
  static const char* const methods[] = {"items", "keys", "values", "get", "pop", "update", "copy", "clear",
                                        "setdefault", "popitem", "fromkeys"};
  return std::any_of(std::begin(methods), std::end(methods), [&](const char* m) { return name == m; });
}

// Jinja's getattr for `object.name` (and the attribute-based filters).
Value get_attribute(const Value& object, const std::string& name) {
  switch (object.kind) {
    case Kind::Undefined: undefined_error(object);
    case Kind::Dict:
      if (is_dict_method(name)) throw EvalError{"dict method '" + name + "' is only supported when called"};
      [[fallthrough]];
    case Kind::Namespace: {
      if (const Value* found = object.find(name)) return *found;
      return Value::undefined("'" + std::string(object.kind == Kind::Dict ? "dict object" : "Namespace") +
                              "' has no attribute '" + name + "'");
    }
    default: return Value::undefined("'" + type_name(object) + " object' has no attribute '" + name + "'");
  }
}

Value get_item(const Value& object, const Value& key) {
  switch (object.kind) {
    case Kind::Undefined: undefined_error(object);
    case Kind::Dict:
    case Kind::Namespace:
      if (key.kind == Kind::String) {
        if (const Value* found = object.find(key.text)) return *found;
        return Value::undefined("'dict object' has no attribute '" + key.text + "'");
      }
      return Value::undefined("'dict object' has no attribute " + to_repr(key));
    case Kind::List:
    case Kind::Tuple:
    case Kind::String: {
      if (key.kind == Kind::String) return Value::undefined("'" + type_name(object) + " object' has no attribute '" + key.text + "'");
      if (key.kind != Kind::Integer && key.kind != Kind::Boolean) {
        throw EvalError{type_name(object) + " indices must be integers or slices, not " + type_name(key)};
      }
      List items = object.kind == Kind::String ? iterate(object) : List();
      const List& sequence = object.kind == Kind::String ? items : *object.list;
      int64_t index = as_int(key, "index");
      int64_t length = static_cast<int64_t>(sequence.size());
      if (index < 0) index += length;
      if (index < 0 || index >= length) {
        return Value::undefined("'" + type_name(object) + " object' has no attribute " + to_repr(key));
      }
      return sequence[static_cast<size_t>(index)];
    }
    default: return Value::undefined("'" + type_name(object) + " object' has no attribute " + to_repr(key));
  }
}

std::string require_string(const Value& value, const std::string& what) {
  if (value.is_undefined()) undefined_error(value);
  if (value.kind != Kind::String) throw EvalError{what + " expects a string, got " + type_name(value)};
  return value.text;
}

struct Arguments {
  List positional;
  std::vector<std::pair<std::string, Value>> keyword;

  // The argument at `index` or named `name`, else `fallback`.
  Value get(size_t index, const std::string& name, Value fallback = Value::none()) const {
    if (index < positional.size()) return positional[index];
    for (const auto& [key, value] : keyword) {
      if (key == name) return value;
    }
    return fallback;
  }
  bool has(size_t index, const std::string& name) const {
    if (index < positional.size()) return true;
    return std::any_of(keyword.begin(), keyword.end(), [&](const auto& kv) { return kv.first == name; });
  }
  void limit(size_t count, const std::string& what) const {
    if (positional.size() > count) throw EvalError{what + " takes at most " + std::to_string(count) + " arguments"};
  }
};

Value call_method(const Value& object, const std::string& name, const Arguments& args) {
  if (object.is_undefined()) undefined_error(object);
  if (object.kind == Kind::String) {
    const std::string& text = object.text;
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      return Value::from_string(python_strip(text, args.get(0, "chars"), name != "rstrip", name != "lstrip"));
    }
    if (name == "upper") return Value::from_string(utf8_upper(text));
    if (name == "lower") return Value::from_string(utf8_lower(text));
    if (name == "title") return Value::from_string(python_title(text));
    if (name == "capitalize") return Value::from_string(python_capitalize(text));
    if (name == "startswith" || name == "endswith") {
      Value affix = args.get(0, "prefix");
      List candidates = affix.kind == Kind::Tuple ? *affix.list : List{affix};
      for (const auto& candidate : candidates) {
        std::string piece = require_string(candidate, name);
        bool match = name == "startswith" ? text.compare(0, piece.size(), piece) == 0 && text.size() >= piece.size()
                                          : text.size() >= piece.size() &&
                                                text.compare(text.size() - piece.size(), piece.size(), piece) == 0;
        if (match) return Value::from_bool(true);
      }
      return Value::from_bool(false);
    }
    if (name == "split") {
      Value max_split = args.get(1, "maxsplit", Value::from_int(-1));
      return python_split(text, args.get(0, "sep"), as_int(max_split, "maxsplit"));
    }
    if (name == "replace") {
      Value count = args.get(2, "count", Value::from_int(-1));
      return Value::from_string(python_replace(text, require_string(args.get(0, "old"), "replace"),
                                               require_string(args.get(1, "new"), "replace"), as_int(count, "count")));
    }
    if (name == "join") {
      std::string out;
      bool first = true;
      for (const auto& item : iterate(args.get(0, "iterable"))) {
        if (!first) out += text;
        first = false;
        out += require_string(item, "str.join");
      }
      return Value::from_string(out);
    }
    throw EvalError{"unsupported string method '" + name + "'"};
  }
  if (object.kind == Kind::Dict) {
    if (name == "get") {
      Value key = args.get(0, "key");
      if (key.kind == Kind::String) {
        if (const Value* found = object.find(key.text)) return *found;
      }
      return args.get(1, "default");
    }
    if (name == "items" || name == "keys" || name == "values") {
      List out;
      for (const auto& [key, value] : *object.dict) {
        if (name == "items") out.push_back(Value::from_list({Value::from_string(key), value}, true));
        else if (name == "keys") out.push_back(Value::from_string(key));
        else out.push_back(value);
      }
      return Value::from_list(std::move(out));
    }
    throw EvalError{"unsupported dict method '" + name + "'"};
  }
  throw EvalError{"unsupported method '" + name + "' of " + type_name(object) + " (transformers' sandbox forbids "
                  "changing values in place)"};
}

class Renderer {
 public:
  Renderer(const std::string& origin, const Value& context) : origin_(origin) {
    scopes_.emplace_back();
    for (const auto& [key, value] : *context.dict) scopes_.back()[key] = value;
  }

  std::string run(const Body& body) {
    std::string out;
    out.reserve(4096);
    execute(body, out);
    return out;
  }

 private:
  [[noreturn]] void fail_at(int line, const std::string& message) const {
    throw ChatTemplateError(origin_ + ": chat template line " + std::to_string(line) + ": " + message,
                            "the template could not be rendered for this conversation");
  }

  Flow execute(const Body& body, std::string& out) {
    for (const auto& node : body) {
      Flow flow = Flow::Normal;
      try {
        flow = execute_node(*node, out);
      } catch (const EvalError& error) {
        fail_at(node->line, error.message);
      } catch (const RaisedError& raised) {
        throw ChatTemplateError(origin_ + ": the chat template raised an exception (line " +
                                    std::to_string(node->line) + "): " + raised.message,
                                "the conversation does not fit what this model's template accepts");
      }
      if (flow != Flow::Normal) return flow;
    }
    return Flow::Normal;
  }

  Flow execute_node(const Node& node, std::string& out) {
    switch (node.type) {
      case NodeType::Text: out += node.text; return Flow::Normal;
      case NodeType::Output: out += to_str(evaluate(*node.expression)); return Flow::Normal;
      case NodeType::If:
        for (const auto& [condition, branch] : node.branches) {
          if (!condition || truthy(evaluate(*condition))) return execute(branch, out);
        }
        return Flow::Normal;
      case NodeType::For: return execute_for(node, out);
      case NodeType::Set: {
        Value value = evaluate(*node.expression);
        if (node.attribute_target) {
          Value target = lookup(node.targets[0]);
          if (target.kind != Kind::Namespace) throw EvalError{"cannot assign attribute on non-namespace object"};
          if (!node.targets[1].empty() && node.targets[1][0] == '_') {
            throw EvalError{"Chat templates cannot store underscore-prefixed attributes on a namespace"};
          }
          for (auto& item : *target.dict) {
            if (item.first == node.targets[1]) {
              item.second = value;
              return Flow::Normal;
            }
          }
          target.dict->emplace_back(node.targets[1], value);
          return Flow::Normal;
        }
        assign(node.targets, value);
        return Flow::Normal;
      }
      case NodeType::SetBlock: {
        std::string captured;
        execute(node.body, captured);
        scopes_.back()[node.targets[0]] = Value::from_string(captured);
        return Flow::Normal;
      }
      case NodeType::Macro: {
        macros_[node.macro_name] = &node;
        Value callable;
        callable.kind = Kind::Callable;
        callable.text = node.macro_name;
        scopes_.back()[node.macro_name] = callable;
        return Flow::Normal;
      }
      case NodeType::Break: return Flow::Break;
      case NodeType::Continue: return Flow::Continue;
      case NodeType::Generation: return execute(node.body, out);
    }
    return Flow::Normal;
  }

  void assign(const std::vector<std::string>& targets, const Value& value) {
    if (targets.size() == 1) {
      scopes_.back()[targets[0]] = value;
      return;
    }
    List items = iterate(value);
    if (items.size() != targets.size()) {
      throw EvalError{"cannot unpack " + std::to_string(items.size()) + " values into " + std::to_string(targets.size()) + " names"};
    }
    for (size_t i = 0; i < targets.size(); ++i) scopes_.back()[targets[i]] = items[i];
  }

  Flow execute_for(const Node& node, std::string& out) {
    Value iterable = evaluate(*node.expression);
    if (iterable.is_undefined() && !iterable.text.empty() && false) undefined_error(iterable);
    List items = iterate(iterable);
    if (node.filter) {
      List kept;
      for (const auto& item : items) {
        scopes_.emplace_back();
        assign(node.targets, item);
        bool keep = truthy(evaluate(*node.filter));
        scopes_.pop_back();
        if (keep) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const int64_t length = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < length; ++i) {
      scopes_.emplace_back();
      assign(node.targets, items[static_cast<size_t>(i)]);
      Dict loop = {
          {"index", Value::from_int(i + 1)},
          {"index0", Value::from_int(i)},
          {"revindex", Value::from_int(length - i)},
          {"revindex0", Value::from_int(length - i - 1)},
          {"first", Value::from_bool(i == 0)},
          {"last", Value::from_bool(i == length - 1)},
          {"length", Value::from_int(length)},
          {"depth", Value::from_int(1)},
          {"depth0", Value::from_int(0)},
          {"previtem", i > 0 ? items[static_cast<size_t>(i - 1)] : Value::undefined("there is no previous item")},
          {"nextitem", i + 1 < length ? items[static_cast<size_t>(i + 1)] : Value::undefined("there is no next item")},
      };
      scopes_.back()["loop"] = Value::from_dict(std::move(loop));
      Flow flow;
      try {
        flow = execute(node.body, out);
      } catch (...) {
        scopes_.pop_back();
        throw;
      }
      scopes_.pop_back();
      if (flow == Flow::Break) break;
    }
    if (length == 0) return execute(node.else_body, out);
    return Flow::Normal;
  }

  Value lookup(const std::string& name) const {
    for (auto scope = scopes_.rbegin(); scope != scopes_.rend(); ++scope) {
      auto found = scope->find(name);
      if (found != scope->end()) return found->second;
    }
    static const char* const globals[] = {"raise_exception", "strftime_now", "range", "namespace", "dict"};
    for (const char* global : globals) {
      if (name == global) {
        Value callable;
        callable.kind = Kind::Callable;
        callable.text = name;
        return callable;
      }
    }
    return Value::undefined("'" + name + "' is undefined");
  }

  Arguments evaluate_arguments(const Expr& expr, size_t first) {
    Arguments args;
    for (size_t i = first; i < expr.children.size(); ++i) args.positional.push_back(evaluate(*expr.children[i]));
    for (const auto& [key, value] : expr.keyword_arguments) args.keyword.emplace_back(key, evaluate(*value));
    return args;
  }

  Value evaluate(const Expr& expr) {
    switch (expr.type) {
      case ExprType::Literal: return expr.literal;
      case ExprType::Name: return lookup(expr.name);
      case ExprType::ListLiteral:
      case ExprType::TupleLiteral: {
        List items;
        for (const auto& child : expr.children) items.push_back(evaluate(*child));
        return Value::from_list(std::move(items), expr.type == ExprType::TupleLiteral);
      }
      case ExprType::DictLiteral: {
        Dict items;
        for (size_t i = 0; i + 1 < expr.children.size(); i += 2) {
          Value key = evaluate(*expr.children[i]);
          if (key.kind != Kind::String) throw EvalError{"dict literal keys must be strings here"};
          Value value = evaluate(*expr.children[i + 1]);
          auto existing = std::find_if(items.begin(), items.end(), [&](const auto& kv) { return kv.first == key.text; });
          if (existing != items.end()) existing->second = value;
          else items.emplace_back(key.text, value);
        }
        return Value::from_dict(std::move(items));
      }
      case ExprType::Attribute: return get_attribute(evaluate(*expr.children[0]), expr.name);
      case ExprType::Subscript: return get_item(evaluate(*expr.children[0]), evaluate(*expr.children[1]));
      case ExprType::Slice: {
        Value subject = evaluate(*expr.children[0]);
        if (subject.is_undefined()) undefined_error(subject);
        auto bound = [&](size_t i) { return expr.children[i] ? evaluate(*expr.children[i]) : Value::none(); };
        Value start = bound(1), stop = bound(2), step = bound(3);
        if (subject.kind == Kind::String) {
          std::string out;
          for (const auto& c : slice_items(iterate(subject), start, stop, step)) out += c.text;
          return Value::from_string(out);
        }
        if (!subject.is_sequence()) throw EvalError{"'" + type_name(subject) + "' object is not subscriptable"};
        return Value::from_list(slice_items(*subject.list, start, stop, step), subject.kind == Kind::Tuple);
      }
      case ExprType::Unary: {
        Value operand = evaluate(*expr.children[0]);
        if (operand.is_undefined()) undefined_error(operand);
        if (!operand.is_number()) throw EvalError{"bad operand type for unary " + expr.name + ": '" + type_name(operand) + "'"};
        if (expr.name == "+") return operand.kind == Kind::Boolean ? Value::from_int(operand.boolean) : operand;
        if (operand.kind == Kind::Float) return Value::from_double(-operand.number);
        return Value::from_int(-as_int(operand, "operand"));
      }
      case ExprType::Binary: return binary(expr.name, evaluate(*expr.children[0]), evaluate(*expr.children[1]));
      case ExprType::Compare: {
        Value left = evaluate(*expr.children[0]);
        for (size_t i = 0; i < expr.operators.size(); ++i) {
          Value right = evaluate(*expr.children[i + 1]);
          if (!compare(expr.operators[i], left, right)) return Value::from_bool(false);
          left = right;
        }
        return Value::from_bool(true);
      }
      case ExprType::And: {
        Value left = evaluate(*expr.children[0]);
        return truthy(left) ? evaluate(*expr.children[1]) : left;
      }
      case ExprType::Or: {
        Value left = evaluate(*expr.children[0]);
        return truthy(left) ? left : evaluate(*expr.children[1]);
      }
      case ExprType::Not: return Value::from_bool(!truthy(evaluate(*expr.children[0])));
      case ExprType::Conditional: {
        if (truthy(evaluate(*expr.children[0]))) return evaluate(*expr.children[1]);
        if (expr.has_else) return evaluate(*expr.children[2]);
        return Value::undefined("the inline if expression's condition was false and it has no else");
      }
      case ExprType::Filter: {
        Value subject = evaluate(*expr.children[0]);
        return apply_filter(expr.name, subject, evaluate_arguments(expr, 1));
      }
      case ExprType::Test: {
        Value subject = evaluate(*expr.children[0]);
        bool result = apply_test(expr.name, subject, evaluate_arguments(expr, 1));
        return Value::from_bool(expr.negated ? !result : result);
      }
      case ExprType::Call: return call(expr);
    }
    throw EvalError{"unknown expression"};
  }

  Value binary(const std::string& op, const Value& a, const Value& b) {
    if (op == "~") return Value::from_string(to_str(a) + to_str(b));
    if (a.is_undefined()) undefined_error(a);
    if (b.is_undefined()) undefined_error(b);
    auto type_error = [&]() -> EvalError {
      return EvalError{"unsupported operand type(s) for " + op + ": '" + type_name(a) + "' and '" + type_name(b) + "'"};
    };
    if (a.is_number() && b.is_number()) {
      bool floating = a.kind == Kind::Float || b.kind == Kind::Float;
      if (op == "/") {
        if (as_double(b) == 0) throw EvalError{"division by zero"};
        return Value::from_double(as_double(a) / as_double(b));
      }
      if (floating) {
        double x = as_double(a), y = as_double(b);
        if (op == "+") return Value::from_double(x + y);
        if (op == "-") return Value::from_double(x - y);
        if (op == "*") return Value::from_double(x * y);
        if (op == "**") return Value::from_double(std::pow(x, y));
        if (y == 0) throw EvalError{"float division by zero"};
        if (op == "//") return Value::from_double(std::floor(x / y));
        if (op == "%") {
          double r = std::fmod(x, y);
          if (r != 0 && ((r < 0) != (y < 0))) r += y;
          return Value::from_double(r);
        }
      } else {
        int64_t x = as_int(a, "operand"), y = as_int(b, "operand");
        if (op == "+") return Value::from_int(x + y);
        if (op == "-") return Value::from_int(x - y);
        if (op == "*") return Value::from_int(x * y);
        if (op == "**") {
          if (y < 0) return Value::from_double(std::pow(static_cast<double>(x), static_cast<double>(y)));
          int64_t result = 1;
          for (int64_t i = 0; i < y; ++i) result *= x;
          return Value::from_int(result);
        }
        if (y == 0) throw EvalError{"integer division or modulo by zero"};
        int64_t quotient = x / y, remainder = x % y;
        if (remainder != 0 && ((remainder < 0) != (y < 0))) {
          quotient -= 1;
          remainder += y;
        }
        if (op == "//") return Value::from_int(quotient);
        if (op == "%") return Value::from_int(remainder);
      }
      throw type_error();
    }
    if (op == "+") {
      if (a.kind == Kind::String && b.kind == Kind::String) return Value::from_string(a.text + b.text);
      if (a.kind == b.kind && a.is_sequence()) {
        List items = *a.list;
        items.insert(items.end(), b.list->begin(), b.list->end());
        return Value::from_list(std::move(items), a.kind == Kind::Tuple);
      }
    }
    if (op == "*") {
      const Value& sequence = a.is_number() ? b : a;
      const Value& count = a.is_number() ? a : b;
      if (count.kind == Kind::Integer || count.kind == Kind::Boolean) {
        int64_t n = std::max<int64_t>(0, as_int(count, "count"));
        if (sequence.kind == Kind::String) {
          std::string out;
          for (int64_t i = 0; i < n; ++i) out += sequence.text;
          return Value::from_string(out);
        }
        if (sequence.is_sequence()) {
          List out;
          for (int64_t i = 0; i < n; ++i) out.insert(out.end(), sequence.list->begin(), sequence.list->end());
          return Value::from_list(std::move(out), sequence.kind == Kind::Tuple);
        }
      }
    }
    if (op == "%" && a.kind == Kind::String) throw EvalError{"printf-style string formatting ('%') is not supported"};
    throw type_error();
  }

  bool contains(const Value& container, const Value& item) {
    switch (container.kind) {
      case Kind::Undefined: return false;
      case Kind::String:
        if (item.kind != Kind::String) {
          if (item.is_undefined()) undefined_error(item);
          throw EvalError{"'in <string>' requires string as left operand, not " + type_name(item)};
        }
        return container.text.find(item.text) != std::string::npos;
      case Kind::List:
      case Kind::Tuple:
        return std::any_of(container.list->begin(), container.list->end(),
                           [&](const Value& element) { return python_equal(element, item); });
      case Kind::Dict:
      case Kind::Namespace: return item.kind == Kind::String && container.find(item.text) != nullptr;
      default: throw EvalError{"argument of type '" + type_name(container) + "' is not iterable"};
    }
  }

  bool compare(const std::string& op, const Value& a, const Value& b) {
    if (op == "==") return python_equal(a, b);
    if (op == "!=") return !python_equal(a, b);
    if (op == "in") return contains(b, a);
    if (op == "not in") return !contains(b, a);
    if (a.is_undefined()) undefined_error(a);
    if (b.is_undefined()) undefined_error(b);
    if (op == "<") return python_less(a, b);
    if (op == ">") return python_less(b, a);
    if (op == "<=") return !python_less(b, a);
    if (op == ">=") return !python_less(a, b);
    throw EvalError{"unknown comparison " + op};
  }

  Value call(const Expr& expr) {
    const Expr& callee = *expr.children[0];
    Arguments args = evaluate_arguments(expr, 1);
    if (callee.type == ExprType::Attribute) {
      Value object = evaluate(*callee.children[0]);
      if (object.kind == Kind::Dict || object.kind == Kind::Namespace) {
        if (!is_dict_method(callee.name) || object.kind == Kind::Namespace) {
          Value member = get_attribute(object, callee.name);
          if (member.is_undefined()) undefined_error(member);
          throw EvalError{"'" + type_name(member) + "' object is not callable"};
        }
      }
      return call_method(object, callee.name, args);
    }
    Value function = evaluate(callee);
    if (function.is_undefined()) undefined_error(function);
    if (function.kind != Kind::Callable) throw EvalError{"'" + type_name(function) + "' object is not callable"};
    const std::string& name = function.text;
    if (name == "raise_exception") throw RaisedError{to_str(args.get(0, "message"))};
    if (name == "strftime_now") return Value::from_string(strftime_now(require_string(args.get(0, "format"), "strftime_now")));
    if (name == "range") {
      int64_t start = 0, stop = 0, step = 1;
      if (args.positional.size() == 1) {
        stop = as_int(args.positional[0], "range argument");
      } else if (args.positional.size() >= 2) {
        start = as_int(args.positional[0], "range argument");
        stop = as_int(args.positional[1], "range argument");
        if (args.positional.size() >= 3) step = as_int(args.positional[2], "range argument");
      } else {
        throw EvalError{"range expected at least 1 argument"};
      }
      if (step == 0) throw EvalError{"range() arg 3 must not be zero"};
      List items;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) items.push_back(Value::from_int(i));
      return Value::from_list(std::move(items));
    }
    if (name == "namespace" || name == "dict") {
      Dict items;
      for (const auto& positional : args.positional) {
        if (positional.kind != Kind::Dict) throw EvalError{name + "() takes keyword arguments or one dict"};
        items.insert(items.end(), positional.dict->begin(), positional.dict->end());
      }
      for (const auto& [key, value] : args.keyword) {
        if (name == "namespace" && !key.empty() && key[0] == '_') {
          throw EvalError{"Chat templates cannot store underscore-prefixed attributes on a namespace"};
        }
        auto existing = std::find_if(items.begin(), items.end(), [&](const auto& kv) { return kv.first == key; });
        if (existing != items.end()) existing->second = value;
        else items.emplace_back(key, value);
      }
      return Value::from_dict(std::move(items), name == "namespace");
    }
    auto macro = macros_.find(name);
    if (macro == macros_.end()) throw EvalError{"'" + name + "' is not callable"};
    return call_macro(*macro->second, args);
  }

  Value call_macro(const Node& macro, const Arguments& args) {
    if (args.positional.size() > macro.macro_parameters.size()) {
      throw EvalError{"macro '" + macro.macro_name + "' takes not more than " +
                      std::to_string(macro.macro_parameters.size()) + " argument(s)"};
    }
    std::unordered_map<std::string, Value> frame;
    for (size_t i = 0; i < macro.macro_parameters.size(); ++i) {
      const auto& [parameter, fallback] = macro.macro_parameters[i];
      if (args.has(i, parameter)) frame[parameter] = args.get(i, parameter);
      else if (fallback) frame[parameter] = evaluate(*fallback);
      else frame[parameter] = Value::undefined("'" + parameter + "' is undefined");
    }
    for (const auto& [key, value] : args.keyword) {
      bool known = std::any_of(macro.macro_parameters.begin(), macro.macro_parameters.end(),
                               [&](const auto& p) { return p.first == key; });
      if (!known) throw EvalError{"macro '" + macro.macro_name + "' takes no keyword argument '" + key + "'"};
    }
    // A macro sees the template's top-level names and its own parameters, not the caller's locals.
    std::vector<std::unordered_map<std::string, Value>> saved;
    saved.swap(scopes_);
    scopes_.push_back(saved.front());
    scopes_.push_back(std::move(frame));
    std::string out;
    try {
      execute(macro.body, out);
    } catch (...) {
      saved.front() = scopes_.front();
      scopes_.swap(saved);
      throw;
    }
    saved.front() = scopes_.front();
    scopes_.swap(saved);
    return Value::from_string(out);
  }

  static std::string strftime_now(const std::string& format) {
    std::time_t now = std::time(nullptr);
    std::tm local{};
    localtime_r(&now, &local);
    std::vector<char> buffer(format.size() * 4 + 64);
    while (true) {
      size_t written = std::strftime(buffer.data(), buffer.size(), format.c_str(), &local);
      if (written > 0 || format.empty()) return std::string(buffer.data(), written);
      if (buffer.size() > 65536) return "";
      buffer.resize(buffer.size() * 2);
    }
  }

  Value apply_filter(const std::string& name, const Value& subject, const Arguments& args) {
    if (name == "default" || name == "d") {
      bool boolean = truthy(args.get(1, "boolean", Value::from_bool(false)));
      if (subject.is_undefined() || (boolean && !truthy(subject))) return args.get(0, "default_value", Value::from_string(""));
      return subject;
    }
    if (name == "length" || name == "count") return Value::from_int(python_length(subject));
    if (name == "string") return Value::from_string(to_str(subject));
    if (name == "safe") return Value::from_string(to_str(subject));
    if (name == "list") return Value::from_list(iterate(subject));
    if (name == "items") {
      if (subject.is_undefined()) return Value::from_list({});
      if (subject.kind != Kind::Dict) throw EvalError{"Can only get item pairs from a mapping."};
      List out;
      for (const auto& [key, value] : *subject.dict) out.push_back(Value::from_list({Value::from_string(key), value}, true));
      return Value::from_list(std::move(out));
    }
    if (name == "tojson") {
      JsonDumpOptions options;
      options.ensure_ascii = truthy(args.get(0, "ensure_ascii", Value::from_bool(false)));
      Value indent = args.get(1, "indent");
      if (indent.kind != Kind::None) {
        if (indent.kind == Kind::String) throw EvalError{"tojson: a string indent is not supported"};
        options.indent = static_cast<int>(as_int(indent, "indent"));
      }
      Value separators = args.get(2, "separators");
      if (separators.kind != Kind::None) {
        if (!separators.is_sequence() || separators.list->size() != 2) throw EvalError{"tojson: separators must be a pair"};
        options.custom_separators = true;
        options.item_separator = require_string((*separators.list)[0], "separators");
        options.key_separator = require_string((*separators.list)[1], "separators");
      }
      options.sort_keys = truthy(args.get(3, "sort_keys", Value::from_bool(false)));
      return Value::from_string(python_json_dumps(subject, options));
    }
    if (name == "first" || name == "last") {
      if (subject.is_undefined()) undefined_error(subject);
      List items = iterate(subject);
      if (items.empty()) return Value::undefined(name == "first" ? "No first item, sequence was empty." : "No last item, sequence was empty.");
      return name == "first" ? items.front() : items.back();
    }
    if (name == "reverse") {
      if (subject.kind == Kind::String) {
        List characters = iterate(subject);
        std::string out;
        for (auto it = characters.rbegin(); it != characters.rend(); ++it) out += it->text;
        return Value::from_string(out);
      }
      List items = iterate(subject);
      std::reverse(items.begin(), items.end());
      return Value::from_list(std::move(items));
    }
    if (name == "join") {
      Value attribute = args.get(1, "attribute");
      std::string separator = to_str(args.get(0, "d", Value::from_string("")));
      std::string out;
      bool first = true;
      for (const auto& item : iterate(subject)) {
        if (!first) out += separator;
        first = false;
        out += to_str(attribute.kind == Kind::None ? item : get_attribute_path(item, attribute));
      }
      return Value::from_string(out);
    }
    if (name == "abs") {
      if (subject.kind == Kind::Float) return Value::from_double(std::fabs(subject.number));
      return Value::from_int(std::llabs(as_int(subject, "abs operand")));
    }
    if (name == "int") {
      Value fallback = args.get(0, "default", Value::from_int(0));
      switch (subject.kind) {
        case Kind::Integer: return subject;
        case Kind::Boolean: return Value::from_int(subject.boolean);
        case Kind::Float: return Value::from_int(static_cast<int64_t>(std::trunc(subject.number)));
        case Kind::String: {
          std::string text = python_strip(subject.text, Value::none(), true, true);
          int64_t base = as_int(args.get(1, "base", Value::from_int(10)), "base");
          try {
            size_t used = 0;
            long long parsed = std::stoll(text, &used, static_cast<int>(base));
            if (used == text.size()) return Value::from_int(parsed);
          } catch (...) {
          }
          try {
            size_t used = 0;
            double parsed = std::stod(text, &used);
            if (used == text.size() && std::isfinite(parsed)) return Value::from_int(static_cast<int64_t>(std::trunc(parsed)));
          } catch (...) {
          }
          return fallback;
        }
        default: return fallback;
      }
    }
    if (name == "float") {
      Value fallback = args.get(0, "default", Value::from_double(0.0));
      if (subject.is_number()) return Value::from_double(as_double(subject));
      if (subject.kind == Kind::String) {
        try {
          std::string text = python_strip(subject.text, Value::none(), true, true);
          size_t used = 0;
          double parsed = std::stod(text, &used);
          if (used == text.size()) return Value::from_double(parsed);
        } catch (...) {
        }
      }
      return fallback;
    }
    if (name == "selectattr" || name == "rejectattr") {
      if (args.positional.empty()) throw EvalError{name + " needs an attribute name"};
      bool select = name == "selectattr";
      List out;
      Arguments test_args;
      test_args.positional.assign(args.positional.size() > 2 ? args.positional.begin() + 2 : args.positional.end(),
                                  args.positional.end());
      for (const auto& item : iterate(subject)) {
        Value attribute = get_attribute_path(item, args.positional[0]);
        bool passed = args.positional.size() > 1
                          ? apply_test(require_string(args.positional[1], name + " test"), attribute, test_args)
                          : truthy(attribute);
        if (passed == select) out.push_back(item);
      }
      return Value::from_list(std::move(out));
    }
    if (name == "map") {
      List out;
      bool by_attribute = args.has(99, "attribute");
      for (const auto& item : iterate(subject)) {
        if (by_attribute) {
          Value value = get_attribute_path(item, args.get(99, "attribute"));
          if (value.is_undefined() && args.has(99, "default")) value = args.get(99, "default");
          out.push_back(value);
        } else {
          if (args.positional.empty()) throw EvalError{"map needs a filter name or attribute="};
          std::string filter = require_string(args.positional[0], "map filter");
          Arguments rest;
          rest.positional.assign(args.positional.begin() + 1, args.positional.end());
          rest.keyword = args.keyword;
          static const char* const mappable[] = {"trim", "length", "count", "tojson", "upper", "lower", "capitalize",
                                                 "title", "default", "d", "first", "last", "join", "replace", "list",
                                                 "items", "string", "int", "float", "safe", "abs", "reverse"};
          if (std::none_of(std::begin(mappable), std::end(mappable), [&](const char* f) { return filter == f; })) {
            throw EvalError{"unsupported filter '" + filter + "' in map"};
          }
          out.push_back(apply_filter(filter, item, rest));
        }
      }
      return Value::from_list(std::move(out));
    }
    // String filters: Jinja converts the subject with str() first.
    if (subject.is_undefined() && name != "trim" && name != "upper" && name != "lower" && name != "capitalize" &&
        name != "title" && name != "replace") {
      undefined_error(subject);
    }
    std::string text = to_str(subject);
    if (name == "trim") return Value::from_string(python_strip(text, args.get(0, "chars"), true, true));
    if (name == "upper") return Value::from_string(utf8_upper(text));
    if (name == "lower") return Value::from_string(utf8_lower(text));
    if (name == "capitalize") return Value::from_string(python_capitalize(text));
    if (name == "title") return Value::from_string(jinja_title(text));
    if (name == "replace") {
      Value count = args.get(2, "count");
      return Value::from_string(python_replace(text, to_str(args.get(0, "old")), to_str(args.get(1, "new")),
                                               count.kind == Kind::None ? -1 : as_int(count, "count")));
    }
    throw EvalError{"unsupported filter '" + name + "'"};
  }

  // Jinja's attribute lookup for filters: "a.b" walks dicts, integers index sequences.
  static Value get_attribute_path(const Value& item, const Value& attribute) {
    if (attribute.kind == Kind::Integer) return get_item(item, attribute);
    std::string path = require_string(attribute, "attribute");
    Value current = item;
    size_t pos = 0;
    while (true) {
      size_t dot = path.find('.', pos);
      std::string part = path.substr(pos, dot == std::string::npos ? std::string::npos : dot - pos);
      bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; });
      if (current.is_undefined()) return current;
      current = numeric ? get_item(current, Value::from_int(std::stoll(part))) : get_item(current, Value::from_string(part));
      if (dot == std::string::npos) return current;
      pos = dot + 1;
    }
  }

  bool apply_test(const std::string& name, const Value& subject, const Arguments& args) {
    if (name == "defined") return !subject.is_undefined();
    if (name == "undefined") return subject.is_undefined();
    if (name == "none") return subject.kind == Kind::None;
    if (name == "string") return subject.kind == Kind::String;
    if (name == "mapping") return subject.kind == Kind::Dict;
    if (name == "iterable") {
      return subject.is_undefined() || subject.kind == Kind::String || subject.is_sequence() || subject.kind == Kind::Dict;
    }
    if (name == "sequence") {
      return subject.is_undefined() || subject.kind == Kind::String || subject.is_sequence() || subject.kind == Kind::Dict;
    }
    if (name == "number") return subject.is_number();
    if (name == "integer") return subject.kind == Kind::Integer;
    if (name == "float") return subject.kind == Kind::Float;
    if (name == "boolean") return subject.kind == Kind::Boolean;
    if (name == "true") return subject.kind == Kind::Boolean && subject.boolean;
    if (name == "false") return subject.kind == Kind::Boolean && !subject.boolean;
    Value other = args.get(0, "other");
    if (name == "equalto" || name == "eq" || name == "==") return python_equal(subject, other);
    if (name == "ne" || name == "!=") return !python_equal(subject, other);
    if (name == "in") return contains(other, subject);
    if (name == "gt" || name == ">") return compare(">", subject, other);
    if (name == "ge" || name == ">=") return compare(">=", subject, other);
    if (name == "lt" || name == "<") return compare("<", subject, other);
    if (name == "le" || name == "<=") return compare("<=", subject, other);
    if (name == "odd" || name == "even") {
      int64_t n = as_int(subject, "odd/even operand");
      bool odd = ((n % 2) + 2) % 2 == 1;
      return name == "odd" ? odd : !odd;
    }
    if (name == "divisibleby") {
      int64_t divisor = as_int(other, "divisor");
      if (divisor == 0) throw EvalError{"integer division or modulo by zero"};
      return as_int(subject, "dividend") % divisor == 0;
    }
    if (name == "lower" || name == "upper") {
      std::string text = to_str(subject);
      bool has_cased = false;
      for (const auto& character : iterate(Value::from_string(text))) {
        if (!is_cased_letter(character.text)) continue;
        has_cased = true;
        std::string mapped = name == "lower" ? utf8_lower(character.text) : utf8_upper(character.text);
        if (mapped != character.text) return false;
      }
      return has_cased;
    }
    throw EvalError{"unsupported test '" + name + "'"};
  }

  const std::string& origin_;
  std::vector<std::unordered_map<std::string, Value>> scopes_;
  std::map<std::string, const Node*> macros_;
};

}  // namespace

std::string render_program(const Program& program, const std::string& origin, const Value& context) {
  return Renderer(origin, context).run(program.body);
}

}  // namespace qlora::data::jinja

// Lexer and parser of the chat template interpreter: splits a template into text and tags with
// transformers' whitespace rules (trim_blocks and lstrip_blocks on, `-` and `+` modifiers, the one
// trailing newline Jinja drops), then builds the syntax tree. Tags, filters and tests it cannot run
// are refused here, by name and line, so a template is never rendered approximately.
#include <cctype>
#include <set>

#include "data/chat_template_internal.h"

namespace qlora::data::jinja {
namespace {

enum class TokenType { Name, String, Integer, Float, Operator, End };

struct Token {
  TokenType type;
  std::string text;
  int line;
};

// One piece of the template: text, an output tag {{ }} or a statement tag {% %} with its tokens.
struct Piece {
  enum Type { Text, Output, Statement } type;
  std::string text;
  std::vector<Token> tokens;
  int line;
};

[[noreturn]] void fail(const std::string& origin, int line, const std::string& message) {
  throw ChatTemplateError(origin + ": chat template line " + std::to_string(line) + ": " + message,
                          "qlora runs the Jinja2 subset Hugging Face chat templates use; pass another template "
                          "with --chat-template FILE");
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

int count_lines(const std::string& text, size_t begin, size_t end) {
  int lines = 0;
  for (size_t i = begin; i < end && i < text.size(); ++i) lines += text[i] == '\n';
  return lines;
}

class Lexer {
 public:
  Lexer(const std::string& source, const std::string& origin) : source_(source), origin_(origin) {}

  std::vector<Piece> run() {
    std::vector<Piece> pieces;
    size_t pos = 0;
    int line = 1;
    bool strip_leading = false;    // the previous tag ended with '-'
    bool trim_newline = false;     // the previous tag was a block or comment (trim_blocks)
    bool line_starting = true;     // the text starts a line (for lstrip_blocks)
    while (true) {
      size_t tag = find_tag(pos);
      std::string text = source_.substr(pos, tag == std::string::npos ? std::string::npos : tag - pos);
      int text_line = line;
      if (strip_leading) {
        size_t first = 0;
        while (first < text.size() && is_space(text[first])) ++first;
        text_line += count_lines(text, 0, first);
        text.erase(0, first);
      } else if (trim_newline && !text.empty() && text[0] == '\n') {
        text.erase(0, 1);
        ++text_line;
        line_starting = true;
      } else if (trim_newline && text.size() >= 2 && text[0] == '\r' && text[1] == '\n') {
        text.erase(0, 2);
        ++text_line;
        line_starting = true;
      }
      line += count_lines(source_, pos, tag == std::string::npos ? source_.size() : tag);
      if (tag == std::string::npos) {
        // Jinja drops one trailing newline of the template (keep_trailing_newline=False).
        if (!text.empty() && text.back() == '\n') {
          text.pop_back();
          if (!text.empty() && text.back() == '\r') text.pop_back();
        }
        add_text(pieces, text, text_line);
        break;
      }
      char kind = source_[tag + 1];
      char modifier = tag + 2 < source_.size() ? source_[tag + 2] : '\0';
      if (modifier == '-') {
        while (!text.empty() && is_space(text.back())) text.pop_back();
      } else if ((kind == '%' || kind == '#') && modifier != '+') {
        size_t line_begin = text.rfind('\n');
        line_begin = line_begin == std::string::npos ? 0 : line_begin + 1;
        if (line_begin > 0 || line_starting) {
          bool blank = true;
          for (size_t i = line_begin; i < text.size(); ++i) blank = blank && (text[i] == ' ' || text[i] == '\t');
          if (blank) text.erase(line_begin);
        }
      }
      add_text(pieces, text, text_line);
      size_t inner = tag + 2 + ((modifier == '-' || modifier == '+') ? 1 : 0);
      char end_modifier = '\0';
      size_t after = 0;
      if (kind == '#') {
        size_t close = source_.find("#}", inner);
        if (close == std::string::npos) fail(origin_, line, "comment {# is never closed");
        if (close > inner && (source_[close - 1] == '-' || source_[close - 1] == '+')) end_modifier = source_[close - 1];
        after = close + 2;
      } else {
        Piece piece;
        piece.type = kind == '{' ? Piece::Output : Piece::Statement;
        piece.line = line;
        after = tokenize_tag(inner, kind == '{' ? '}' : '%', line, piece.tokens, end_modifier);
        pieces.push_back(std::move(piece));
      }
      line += count_lines(source_, tag, after);
      pos = after;
      strip_leading = end_modifier == '-';
      trim_newline = kind != '{' && end_modifier != '+';
      line_starting = false;
    }
    return pieces;
  }

 private:
  size_t find_tag(size_t from) const {
    size_t pos = from;
    while ((pos = source_.find('{', pos)) != std::string::npos) {
      if (pos + 1 < source_.size() && (source_[pos + 1] == '{' || source_[pos + 1] == '%' || source_[pos + 1] == '#')) {
        return pos;
      }
      ++pos;
    }
    return std::string::npos;
  }

  static void add_text(std::vector<Piece>& pieces, std::string text, int line) {
    if (text.empty()) return;
    // Jinja normalises the newlines of template text to "\n".
    std::string normalized;
    for (size_t i = 0; i < text.size(); ++i) {
      if (text[i] == '\r') {
        normalized += '\n';
        if (i + 1 < text.size() && text[i + 1] == '\n') ++i;
      } else {
        normalized += text[i];
      }
    }
    pieces.push_back(Piece{Piece::Text, std::move(normalized), {}, line});
  }

  // Reads tokens up to the closing "}}" or "%}" (with its optional modifier); returns the position
  // after it.
  size_t tokenize_tag(size_t pos, char closer, int line, std::vector<Token>& tokens, char& end_modifier) {
    while (true) {
      while (pos < source_.size() && is_space(source_[pos])) {
        line += source_[pos] == '\n';
        ++pos;
      }
      if (pos >= source_.size()) fail(origin_, line, std::string("tag is never closed (missing '") + closer + "}')");
      char c = source_[pos];
      auto closes_at = [&](size_t at) { return at + 1 < source_.size() && source_[at] == closer && source_[at + 1] == '}'; };
      if ((c == '-' || c == '+') && closes_at(pos + 1)) {
        end_modifier = c;
        tokens.push_back(Token{TokenType::End, "", line});
        return pos + 3;
      }
      if (closes_at(pos)) {
        tokens.push_back(Token{TokenType::End, "", line});
        return pos + 2;
      }
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t start = pos;
        while (pos < source_.size() && (std::isalnum(static_cast<unsigned char>(source_[pos])) || source_[pos] == '_')) ++pos;
        tokens.push_back(Token{TokenType::Name, source_.substr(start, pos - start), line});
        continue;
      }
      if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t start = pos;
        bool is_float = false;
        while (pos < source_.size() && (std::isdigit(static_cast<unsigned char>(source_[pos])) || source_[pos] == '_')) ++pos;
        if (pos + 1 < source_.size() && source_[pos] == '.' && std::isdigit(static_cast<unsigned char>(source_[pos + 1]))) {
          is_float = true;
          ++pos;
          while (pos < source_.size() && std::isdigit(static_cast<unsigned char>(source_[pos]))) ++pos;
        }
        if (pos < source_.size() && (source_[pos] == 'e' || source_[pos] == 'E')) {
          size_t exponent = pos + 1;
          if (exponent < source_.size() && (source_[exponent] == '+' || source_[exponent] == '-')) ++exponent;
          if (exponent < source_.size() && std::isdigit(static_cast<unsigned char>(source_[exponent]))) {
            is_float = true;
            pos = exponent;
            while (pos < source_.size() && std::isdigit(static_cast<unsigned char>(source_[pos]))) ++pos;
          }
        }
        std::string number;
        for (size_t i = start; i < pos; ++i) {
          if (source_[i] != '_') number += source_[i];
        }
        tokens.push_back(Token{is_float ? TokenType::Float : TokenType::Integer, number, line});
        continue;
      }
      if (c == '\'' || c == '"') {
        tokens.push_back(Token{TokenType::String, read_string(pos, line), line});
        continue;
      }
      static const char* const operators[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<",
                                              ">", "(", ")", "[", "]", "{", "}", ",", ".", ":", "|", "="};
      bool matched = false;
      for (const char* op : operators) {
        size_t length = std::char_traits<char>::length(op);
        if (source_.compare(pos, length, op) == 0) {
          tokens.push_back(Token{TokenType::Operator, op, line});
          pos += length;
          matched = true;
          break;
        }
      }
      if (!matched) fail(origin_, line, std::string("unexpected character '") + c + "' in a tag");
    }
  }

  // A Python string literal with Python's escapes (Jinja's lexer decodes them the same way).
  std::string read_string(size_t& pos, int& line) {
    char quote = source_[pos++];
    std::string value;
    while (true) {
      if (pos >= source_.size()) fail(origin_, line, "string literal is never closed");
      char c = source_[pos++];
      if (c == quote) break;
      if (c == '\n') ++line;
      if (c != '\\') {
        value += c;
        continue;
      }
      if (pos >= source_.size()) fail(origin_, line, "string literal is never closed");
      char escape = source_[pos++];
      switch (escape) {
        case 'n': value += '\n'; break;
        case 't': value += '\t'; break;
        case 'r': value += '\r'; break;
        case '\\': value += '\\'; break;
        case '\'': value += '\''; break;
        case '"': value += '"'; break;
        case 'b': value += '\b'; break;
        case 'f': value += '\f'; break;
        case 'v': value += '\v'; break;
        case 'a': value += '\a'; break;
        case '0': value += '\0'; break;
        case '\n': ++line; break;
        case 'x':
        case 'u':
        case 'U': {
          size_t digits = escape == 'x' ? 2 : escape == 'u' ? 4 : 8;
          if (pos + digits > source_.size()) fail(origin_, line, "truncated \\" + std::string(1, escape) + " escape");
          uint32_t code_point = static_cast<uint32_t>(std::stoul(source_.substr(pos, digits), nullptr, 16));
          pos += digits;
          if (code_point < 0x80) value += static_cast<char>(code_point);
          else if (code_point < 0x800) {
            value += static_cast<char>(0xC0 | (code_point >> 6));
            value += static_cast<char>(0x80 | (code_point & 0x3F));
          } else if (code_point < 0x10000) {
            value += static_cast<char>(0xE0 | (code_point >> 12));
            value += static_cast<char>(0x80 | ((code_point >> 6) & 0x3F));
            value += static_cast<char>(0x80 | (code_point & 0x3F));
          } else {
            value += static_cast<char>(0xF0 | (code_point >> 18));
            value += static_cast<char>(0x80 | ((code_point >> 12) & 0x3F));
            value += static_cast<char>(0x80 | ((code_point >> 6) & 0x3F));
            value += static_cast<char>(0x80 | (code_point & 0x3F));
          }
          break;
        }
        default:
          // Python keeps an unknown escape as written.
          value += '\\';
          value += escape;
      }
    }
    return value;
  }

  const std::string& source_;
  const std::string& origin_;
};

// The filters the renderer implements (apply_filter in chat_template_render.cpp); any other is
// refused when the template is parsed.
const std::set<std::string> kImplementedFilters = {
    "trim", "length", "count", "tojson", "upper", "lower", "capitalize", "title", "default", "d", "first",
    "last", "join", "replace", "list", "items", "string", "int", "float", "selectattr", "rejectattr", "map",
    "safe", "abs", "reverse"};
const std::set<std::string> kTests = {
    "defined", "undefined", "none", "string", "mapping", "iterable", "sequence", "number", "integer", "float",
    "boolean", "true", "false", "equalto", "eq", "==", "ne", "!=", "in", "odd", "even", "divisibleby", "lower",
    "upper", "gt", "ge", "lt", "le", ">", ">=", "<", "<="};

class Parser {
 public:
  Parser(std::vector<Piece> pieces, const std::string& origin) : pieces_(std::move(pieces)), origin_(origin) {}

  Body parse_all() {
    Body body = parse_body({});
    if (index_ < pieces_.size()) {
      fail(origin_, pieces_[index_].line, "unexpected '" + pieces_[index_].tokens[0].text + "' tag");
    }
    return body;
  }

 private:
  // Parses until a statement whose first word is in `stops` (left unconsumed) or the end.
  Body parse_body(const std::set<std::string>& stops) {
    Body body;
    while (index_ < pieces_.size()) {
      const Piece& piece = pieces_[index_];
      if (piece.type == Piece::Text) {
        auto node = std::make_shared<Node>();
        node->type = NodeType::Text;
        node->text = piece.text;
        node->line = piece.line;
        body.push_back(node);
        ++index_;
        continue;
      }
      begin_piece(piece);
      if (piece.type == Piece::Output) {
        auto node = std::make_shared<Node>();
        node->type = NodeType::Output;
        node->line = piece.line;
        node->expression = parse_expression();
        expect_end();
        body.push_back(node);
        ++index_;
        continue;
      }
      const Token& keyword = peek();
      if (keyword.type != TokenType::Name) fail(origin_, keyword.line, "a statement tag must start with a keyword");
      if (stops.count(keyword.text)) return body;
      if (!stops.empty() && (keyword.text.rfind("end", 0) == 0 || keyword.text == "else" || keyword.text == "elif")) {
        fail(origin_, keyword.line, "unexpected '" + keyword.text + "'");
      }
      body.push_back(parse_statement());
    }
    if (!stops.empty()) {
      std::string expected;
      for (const auto& stop : stops) expected += (expected.empty() ? "" : " or ") + stop;
      fail(origin_, pieces_.empty() ? 1 : pieces_.back().line, "template ended while looking for " + expected);
    }
    return body;
  }

  NodePtr parse_statement() {
    const Token keyword = next();
    auto node = std::make_shared<Node>();
    node->line = keyword.line;
    const std::string& word = keyword.text;
    if (word == "if") {
      node->type = NodeType::If;
      ExprPtr condition = parse_expression();
      expect_end();
      ++index_;
      while (true) {
        Body branch = parse_body({"elif", "else", "endif"});
        node->branches.emplace_back(condition, std::move(branch));
        std::string stop = next().text;
        if (stop == "elif") {
          condition = parse_expression();
          expect_end();
          ++index_;
        } else if (stop == "else") {
          expect_end();
          ++index_;
          Body else_branch = parse_body({"endif"});
          node->branches.emplace_back(nullptr, std::move(else_branch));
          next();
          expect_end();
          ++index_;
          break;
        } else {
          expect_end();
          ++index_;
          break;
        }
      }
    } else if (word == "for") {
      node->type = NodeType::For;
      node->targets.push_back(expect_name());
      while (accept_operator(",")) node->targets.push_back(expect_name());
      if (next().text != "in") fail(origin_, keyword.line, "expected 'in' in the for tag");
      node->expression = parse_expression(/*allow_conditional=*/false);
      if (accept_name("if")) node->filter = parse_expression();
      if (accept_name("recursive")) fail(origin_, keyword.line, "recursive for loops are not supported");
      expect_end();
      ++index_;
      node->body = parse_body({"else", "endfor"});
      if (next().text == "else") {
        expect_end();
        ++index_;
        node->else_body = parse_body({"endfor"});
        next();
      }
      expect_end();
      ++index_;
    } else if (word == "set") {
      std::string target = expect_name();
      if (accept_operator(".")) {
        node->attribute_target = true;
        node->targets = {target, expect_name()};
      } else {
        node->targets.push_back(target);
        while (accept_operator(",")) node->targets.push_back(expect_name());
      }
      if (accept_operator("=")) {
        node->type = NodeType::Set;
        node->expression = parse_tuple_or_expression();
        expect_end();
        ++index_;
      } else {
        if (node->attribute_target || node->targets.size() != 1) fail(origin_, keyword.line, "block set takes one name");
        if (peek().type == TokenType::Operator && peek().text == "|") fail(origin_, keyword.line, "filtered block set is not supported");
        expect_end();
        ++index_;
        node->type = NodeType::SetBlock;
        node->body = parse_body({"endset"});
        next();
        expect_end();
        ++index_;
      }
    } else if (word == "macro") {
      node->type = NodeType::Macro;
      node->macro_name = expect_name();
      expect_operator("(");
      if (!accept_operator(")")) {
        do {
          std::string parameter = expect_name();
          ExprPtr fallback;
          if (accept_operator("=")) fallback = parse_expression();
          node->macro_parameters.emplace_back(parameter, fallback);
        } while (accept_operator(","));
        expect_operator(")");
      }
      expect_end();
      ++index_;
      node->body = parse_body({"endmacro"});
      next();
      expect_end();
      ++index_;
    } else if (word == "break" || word == "continue") {
      node->type = word == "break" ? NodeType::Break : NodeType::Continue;
      expect_end();
      ++index_;
    } else if (word == "generation") {
      // transformers' extension marking assistant text; it renders its body unchanged.
      node->type = NodeType::Generation;
      expect_end();
      ++index_;
      node->body = parse_body({"endgeneration"});
      next();
      expect_end();
      ++index_;
    } else {
      fail(origin_, keyword.line, "unsupported tag '" + word + "'");
    }
    return node;
  }

  // ---- expressions ----

  ExprPtr parse_tuple_or_expression() {
    ExprPtr first = parse_expression();
    if (!(peek().type == TokenType::Operator && peek().text == ",")) return first;
    auto tuple = make(ExprType::TupleLiteral, first->line);
    tuple->children.push_back(first);
    while (accept_operator(",")) {
      if (peek().type == TokenType::End) break;
      tuple->children.push_back(parse_expression());
    }
    return tuple;
  }

  ExprPtr parse_expression(bool allow_conditional = true) {
    ExprPtr value = parse_or();
    if (allow_conditional && accept_name("if")) {
      auto conditional = make(ExprType::Conditional, value->line);
      ExprPtr condition = parse_or();
      conditional->children = {condition, value};
      if (accept_name("else")) {
        conditional->children.push_back(parse_expression());
        conditional->has_else = true;
      }
      return conditional;
    }
    return value;
  }

  ExprPtr parse_or() {
    ExprPtr left = parse_and();
    while (accept_name("or")) {
      auto node = make(ExprType::Or, left->line);
      node->children = {left, parse_and()};
      left = node;
    }
    return left;
  }

  ExprPtr parse_and() {
    ExprPtr left = parse_not();
    while (accept_name("and")) {
      auto node = make(ExprType::And, left->line);
      node->children = {left, parse_not()};
      left = node;
    }
    return left;
  }

  ExprPtr parse_not() {
    if (peek().type == TokenType::Name && peek().text == "not") {
      int line = next().line;
      auto node = make(ExprType::Not, line);
      node->children = {parse_not()};
      return node;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    ExprPtr left = parse_math1();
    std::shared_ptr<Expr> compare;
    while (true) {
      const Token& token = peek();
      std::string op;
      if (token.type == TokenType::Operator &&
          (token.text == "==" || token.text == "!=" || token.text == "<" || token.text == "<=" || token.text == ">" ||
           token.text == ">=")) {
        op = next().text;
      } else if (token.type == TokenType::Name && token.text == "in") {
        next();
        op = "in";
      } else if (token.type == TokenType::Name && token.text == "not" && peek(1).type == TokenType::Name &&
                 peek(1).text == "in") {
        next();
        next();
        op = "not in";
      } else {
        break;
      }
      if (!compare) {
        compare = make(ExprType::Compare, left->line);
        compare->children.push_back(left);
      }
      compare->operators.push_back(op);
      compare->children.push_back(parse_math1());
    }
    return compare ? compare : left;
  }

  ExprPtr parse_math1() {
    ExprPtr left = parse_concat();
    while (peek().type == TokenType::Operator && (peek().text == "+" || peek().text == "-")) {
      auto node = make(ExprType::Binary, left->line);
      node->name = next().text;
      node->children = {left, parse_concat()};
      left = node;
    }
    return left;
  }

  ExprPtr parse_concat() {
    ExprPtr left = parse_math2();
    while (accept_operator("~")) {
      auto node = make(ExprType::Binary, left->line);
      node->name = "~";
      node->children = {left, parse_math2()};
      left = node;
    }
    return left;
  }

  ExprPtr parse_math2() {
    ExprPtr left = parse_pow();
    while (peek().type == TokenType::Operator &&
           (peek().text == "*" || peek().text == "/" || peek().text == "//" || peek().text == "%")) {
      auto node = make(ExprType::Binary, left->line);
      node->name = next().text;
      node->children = {left, parse_pow()};
      left = node;
    }
    return left;
  }

  ExprPtr parse_pow() {
    ExprPtr left = parse_unary();
    while (accept_operator("**")) {
      auto node = make(ExprType::Binary, left->line);
      node->name = "**";
      node->children = {left, parse_unary()};
      left = node;
    }
    return left;
  }

  // As in Jinja, a sign binds tighter than filters and tests: -3|abs is (-3)|abs.
  ExprPtr parse_unary(bool with_filters = true) {
    ExprPtr node;
    if (peek().type == TokenType::Operator && (peek().text == "-" || peek().text == "+")) {
      const Token op = next();
      auto unary = make(ExprType::Unary, op.line);
      unary->name = op.text;
      unary->children = {parse_unary(false)};
      node = unary;
    } else {
      node = parse_postfix(parse_primary());
    }
    return with_filters ? parse_filters_and_tests(node) : node;
  }

  ExprPtr parse_primary() {
    const Token token = next();
    switch (token.type) {
      case TokenType::Name: {
        if (token.text == "true" || token.text == "True") return literal(Value::from_bool(true), token.line);
        if (token.text == "false" || token.text == "False") return literal(Value::from_bool(false), token.line);
        if (token.text == "none" || token.text == "None") return literal(Value::none(), token.line);
        auto node = make(ExprType::Name, token.line);
        node->name = token.text;
        return node;
      }
      case TokenType::String: {
        std::string text = token.text;
        while (peek().type == TokenType::String) text += next().text;  // adjacent literals concatenate
        return literal(Value::from_string(text), token.line);
      }
      case TokenType::Integer: return literal(Value::from_int(std::stoll(token.text)), token.line);
      case TokenType::Float: return literal(Value::from_double(std::stod(token.text)), token.line);
      case TokenType::Operator: {
        if (token.text == "(") {
          if (accept_operator(")")) return make(ExprType::TupleLiteral, token.line);
          ExprPtr inner = parse_expression();
          if (accept_operator(",")) {
            auto tuple = make(ExprType::TupleLiteral, token.line);
            tuple->children.push_back(inner);
            while (!accept_operator(")")) {
              tuple->children.push_back(parse_expression());
              if (!accept_operator(",")) {
                expect_operator(")");
                break;
              }
            }
            return tuple;
          }
          expect_operator(")");
          return inner;
        }
        if (token.text == "[") {
          auto list = make(ExprType::ListLiteral, token.line);
          while (!accept_operator("]")) {
            list->children.push_back(parse_expression());
            if (!accept_operator(",")) {
              expect_operator("]");
              break;
            }
          }
          return list;
        }
        if (token.text == "{") {
          auto dict = make(ExprType::DictLiteral, token.line);
          while (!accept_operator("}")) {
            dict->children.push_back(parse_expression());
            expect_operator(":");
            dict->children.push_back(parse_expression());
            if (!accept_operator(",")) {
              expect_operator("}");
              break;
            }
          }
          return dict;
        }
        break;
      }
      case TokenType::End: fail(origin_, token.line, "expression expected before the end of the tag");
    }
    fail(origin_, token.line, "unexpected '" + token.text + "' in an expression");
  }

  ExprPtr parse_postfix(ExprPtr subject) {
    while (true) {
      if (accept_operator(".")) {
        const Token name = next();
        if (name.type != TokenType::Name && name.type != TokenType::Integer) {
          fail(origin_, name.line, "attribute name expected after '.'");
        }
        if (name.type == TokenType::Integer) {
          auto node = make(ExprType::Subscript, name.line);
          node->children = {subject, literal(Value::from_int(std::stoll(name.text)), name.line)};
          subject = node;
        } else {
          auto node = make(ExprType::Attribute, name.line);
          node->name = name.text;
          node->children = {subject};
          subject = node;
        }
      } else if (peek().type == TokenType::Operator && peek().text == "[") {
        int line = next().line;
        ExprPtr start, stop, step;
        bool is_slice = false;
        if (!(peek().type == TokenType::Operator && peek().text == ":")) start = parse_expression();
        if (accept_operator(":")) {
          is_slice = true;
          if (!(peek().type == TokenType::Operator && (peek().text == "]" || peek().text == ":"))) stop = parse_expression();
          if (accept_operator(":")) {
            if (!(peek().type == TokenType::Operator && peek().text == "]")) step = parse_expression();
          }
        }
        expect_operator("]");
        auto node = make(is_slice ? ExprType::Slice : ExprType::Subscript, line);
        node->children = {subject, start, stop, step};
        if (!is_slice) node->children.resize(2);
        subject = node;
      } else if (peek().type == TokenType::Operator && peek().text == "(") {
        int line = next().line;
        auto call = make(ExprType::Call, line);
        call->children.push_back(subject);
        parse_arguments(*call);
        subject = call;
      } else {
        return subject;
      }
    }
  }

  // After "(": positional and keyword arguments up to ")".
  void parse_arguments(Expr& call) {
    while (!accept_operator(")")) {
      if (peek().type == TokenType::Name && peek(1).type == TokenType::Operator && peek(1).text == "=") {
        std::string key = next().text;
        next();
        call.keyword_arguments.emplace_back(key, parse_expression());
      } else {
        if (!call.keyword_arguments.empty()) fail(origin_, peek().line, "positional argument after a keyword argument");
        call.children.push_back(parse_expression());
      }
      if (!accept_operator(",")) {
        expect_operator(")");
        break;
      }
    }
  }

  ExprPtr parse_filters_and_tests(ExprPtr subject) {
    while (true) {
      if (accept_operator("|")) {
        const Token name = next();
        if (name.type != TokenType::Name) fail(origin_, name.line, "filter name expected after '|'");
        if (!kImplementedFilters.count(name.text)) fail(origin_, name.line, "unsupported filter '" + name.text + "'");
        auto node = make(ExprType::Filter, name.line);
        node->name = name.text;
        node->children.push_back(subject);
        if (accept_operator("(")) parse_arguments(*node);
        subject = node;
        continue;
      }
      if (peek().type == TokenType::Name && peek().text == "is") {
        int line = next().line;
        auto node = make(ExprType::Test, line);
        node->negated = accept_name("not");
        const Token name = next();
        if (name.type == TokenType::Name || (name.type == TokenType::Operator && kTests.count(name.text))) {
          node->name = name.text;
        } else {
          fail(origin_, name.line, "test name expected after 'is'");
        }
        if (!kTests.count(node->name)) fail(origin_, name.line, "unsupported test '" + node->name + "'");
        node->children.push_back(subject);
        if (accept_operator("(")) {
          parse_arguments(*node);
        } else if (starts_test_argument()) {
          // Jinja accepts one argument without parentheses: `x is divisibleby 3`, `x is equalto 'a'`.
          node->children.push_back(parse_postfix(parse_primary()));
        }
        subject = node;
        continue;
      }
      return subject;
    }
  }

  bool starts_test_argument() const {
    const Token& token = peek();
    if (token.type == TokenType::String || token.type == TokenType::Integer || token.type == TokenType::Float) return true;
    if (token.type == TokenType::Name) {
      static const std::set<std::string> stop = {"and", "or", "else", "if", "in", "not", "is", "recursive"};
      return !stop.count(token.text);
    }
    return token.type == TokenType::Operator && (token.text == "[" || token.text == "{");
  }

  // ---- token helpers ----

  void begin_piece(const Piece& piece) {
    tokens_ = &piece.tokens;
    token_index_ = 0;
  }
  const Token& peek(size_t ahead = 0) const {
    size_t at = std::min(token_index_ + ahead, tokens_->size() - 1);
    return (*tokens_)[at];
  }
  const Token& next() {
    const Token& token = peek();
    if (token_index_ < tokens_->size() - 1) ++token_index_;
    return token;
  }
  bool accept_operator(const std::string& op) {
    if (peek().type == TokenType::Operator && peek().text == op) {
      next();
      return true;
    }
    return false;
  }
  bool accept_name(const std::string& name) {
    if (peek().type == TokenType::Name && peek().text == name) {
      next();
      return true;
    }
    return false;
  }
  void expect_operator(const std::string& op) {
    if (!accept_operator(op)) fail(origin_, peek().line, "expected '" + op + "' but found '" + describe(peek()) + "'");
  }
  std::string expect_name() {
    const Token& token = next();
    if (token.type != TokenType::Name) fail(origin_, token.line, "expected a name but found '" + describe(token) + "'");
    return token.text;
  }
  void expect_end() {
    if (peek().type != TokenType::End) fail(origin_, peek().line, "unexpected '" + describe(peek()) + "' before the end of the tag");
  }
  static std::string describe(const Token& token) { return token.type == TokenType::End ? "end of tag" : token.text; }

  std::shared_ptr<Expr> make(ExprType type, int line) {
    auto node = std::make_shared<Expr>();
    node->type = type;
    node->line = line;
    return node;
  }
  ExprPtr literal(Value value, int line) {
    auto node = make(ExprType::Literal, line);
    node->literal = std::move(value);
    return node;
  }

  std::vector<Piece> pieces_;
  const std::string& origin_;
  size_t index_ = 0;
  const std::vector<Token>* tokens_ = nullptr;
  size_t token_index_ = 0;
};

}  // namespace

std::shared_ptr<const Program> parse_template(const std::string& source, const std::string& origin) {
  auto pieces = Lexer(source, origin).run();
  auto program = std::make_shared<Program>();
  program->body = Parser(std::move(pieces), origin).parse_all();
  return program;
}

}  // namespace qlora::data::jinja

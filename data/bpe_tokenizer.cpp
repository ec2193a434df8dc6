// Byte-level BPE: the pre-tokenizer expressions as code point matchers, and merging by rank with a
// heap ordered as tokenizers' Word::merge_all orders it (lowest rank, then leftmost position), so
// ties and stale candidates resolve the way the reference does.
#include "data/bpe_tokenizer.h"

#include <algorithm>
#include <array>
#include <mutex>
#include <queue>
#include <unordered_map>

#include "common/errors.h"
#include "data/unicode.h"

namespace qlora::data {
namespace {

// ---- code points of a piece of text --------------------------------------------------------------

constexpr uint8_t kLetter = 1;
constexpr uint8_t kNumber = 2;
constexpr uint8_t kSpace = 4;

struct CodePoints {
  std::vector<uint32_t> values;
  std::vector<uint8_t> flags;
  std::vector<size_t> offsets;   // byte offset of each code point, plus the end

  explicit CodePoints(std::string_view text) {
    values.reserve(text.size());
    flags.reserve(text.size());
    offsets.reserve(text.size() + 1);
    for (size_t position = 0; position < text.size();) {
      uint32_t code_point = 0;
      const size_t length = unicode::decode_utf8(text, position, &code_point);
      const auto kind = unicode::classify(code_point);
      uint8_t flag = kind == unicode::CodePointClass::letter ? kLetter
                     : kind == unicode::CodePointClass::number ? kNumber
                                                               : 0;
      if (unicode::is_white_space(code_point)) flag |= kSpace;
      values.push_back(code_point);
      flags.push_back(flag);
      offsets.push_back(position);
      position += length;
    }
    offsets.push_back(text.size());
  }
};

using Range = std::pair<size_t, size_t>;   // code point indices [first, second)

// The expressions' character tests, bounded by the piece's end (lookarounds see the piece only).
struct Cursor {
  const CodePoints& text;
  size_t end;
  bool letter(size_t i) const { return i < end && (text.flags[i] & kLetter); }
  bool number(size_t i) const { return i < end && (text.flags[i] & kNumber); }
  bool space(size_t i) const { return i < end && (text.flags[i] & kSpace); }
  bool other(size_t i) const { return i < end && (text.flags[i] & (kLetter | kNumber | kSpace)) == 0; }
  bool newline(size_t i) const { return i < end && (text.values[i] == '\r' || text.values[i] == '\n'); }
  uint32_t at(size_t i) const { return i < end ? text.values[i] : 0; }

  size_t run_of_letters(size_t i) const {
    while (letter(i)) ++i;
    return i;
  }
  size_t run_of_others(size_t i) const {
    while (other(i)) ++i;
    return i;
  }
  // \s+(?!\S)|\s+ from i (a white space code point): the run, less its last code point when a
  // non-space follows and the run is longer than one.
  size_t white_space_tail(size_t i) const {
    size_t j = i;
    while (space(j)) ++j;
    if (j == end || j - i == 1) return j;
    return j - 1;
  }
};

// Length (in code points) of the GPT-2 expression's match at i; every code point starts one.
size_t gpt2_match(const Cursor& cursor, size_t i) {
  const uint32_t c = cursor.at(i);
  if (c == '\'') {
    const uint32_t next = cursor.at(i + 1), after = cursor.at(i + 2);
    if (next == 's' || next == 't' || next == 'm' || next == 'd') return i + 2;
    if ((next == 'r' && after == 'e') || (next == 'v' && after == 'e') || (next == 'l' && after == 'l')) return i + 3;
  }
  const size_t start = c == ' ' ? i + 1 : i;
  if (cursor.letter(start)) return cursor.run_of_letters(start);
  if (cursor.number(start)) {
    size_t j = start;
    while (cursor.number(j)) ++j;
    return j;
  }
  if (cursor.other(start)) return cursor.run_of_others(start);
  return cursor.white_space_tail(i);
}

// Oniguruma's case folding for (?i:'s|'t|'re|'ve|'m|'ll|'d): ASCII, and the long s (U+017F) folds to s.
uint32_t fold_case(uint32_t c) {
  if (c >= 'A' && c <= 'Z') return c + 32;
  if (c == 0x017F) return 's';
  return c;
}

size_t llama3_match(const Cursor& cursor, size_t i) {
  const uint32_t c = cursor.at(i);
  if (c == '\'') {
    const uint32_t next = fold_case(cursor.at(i + 1)), after = fold_case(cursor.at(i + 2));
    if (next == 's' || next == 't' || next == 'm' || next == 'd') return i + 2;
    if ((next == 'r' && after == 'e') || (next == 'v' && after == 'e') || (next == 'l' && after == 'l')) return i + 3;
  }
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (cursor.letter(i)) return cursor.run_of_letters(i);
  if (!cursor.newline(i) && !cursor.number(i) && cursor.letter(i + 1)) return cursor.run_of_letters(i + 1);
  // \p{N}{1,3}
  if (cursor.number(i)) {
    size_t j = i;
    while (j - i < 3 && cursor.number(j)) ++j;
    return j;
  }
  // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
  const size_t start = (c == ' ' && cursor.other(i + 1)) ? i + 1 : i;
  if (cursor.other(start)) {
    size_t j = cursor.run_of_others(start);
    while (cursor.newline(j)) ++j;
    return j;
  }
  // \s*[\r\n]+ : through the last line break of the white space run
  size_t j = i;
  size_t last_break = std::string::npos;
  while (cursor.space(j)) {
    if (cursor.newline(j)) last_break = j;
    ++j;
  }
  if (last_break != std::string::npos) return last_break + 1;
  return cursor.white_space_tail(i);
}

void split_by_expression(const CodePoints& text, const Range& range, PreTokenizerStep step, std::vector<Range>& out) {
  const Cursor cursor{text, range.second};
  for (size_t i = range.first; i < range.second;) {
    const size_t j = step == PreTokenizerStep::gpt2_expression ? gpt2_match(cursor, i) : llama3_match(cursor, i);
    out.emplace_back(i, j);
    i = j;
  }
}

void split_digits(const CodePoints& text, const Range& range, bool individual, std::vector<Range>& out) {
  size_t i = range.first;
  while (i < range.second) {
    const bool is_number = text.flags[i] & kNumber;
    size_t j = i + 1;
    if (!is_number || !individual)
      while (j < range.second && static_cast<bool>(text.flags[j] & kNumber) == is_number) ++j;
    out.emplace_back(i, j);
    i = j;
  }
}

// ---- GPT-2's byte characters ---------------------------------------------------------------------

struct ByteCharacters {
  std::array<uint32_t, 256> of_byte{};
  std::array<int16_t, 512> byte_of{};   // -1: not a byte character

  ByteCharacters() {
    byte_of.fill(-1);
    uint32_t next_free = 256;
    for (uint32_t byte = 0; byte < 256; ++byte) {
      const bool printable = (byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || byte >= 174;
      of_byte[byte] = printable ? byte : next_free++;
      byte_of[of_byte[byte]] = static_cast<int16_t>(byte);
    }
  }
};

const ByteCharacters& byte_characters() {
  static const ByteCharacters table;
  return table;
}

// A token's text in byte-character form back to the bytes it stands for; characters outside the
// map (added tokens' plain text) stay as they are.
std::string token_bytes(const std::string& token) {
  std::string bytes;
  const auto& table = byte_characters();
  for (size_t position = 0; position < token.size();) {
    uint32_t code_point = 0;
    const size_t length = unicode::decode_utf8(token, position, &code_point);
    if (code_point < table.byte_of.size() && table.byte_of[code_point] >= 0)
      bytes += static_cast<char>(table.byte_of[code_point]);
    else
      bytes.append(token, position, length);
    position += length;
  }
  return bytes;
}

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// ---- added tokens --------------------------------------------------------------------------------

struct Segment {
  size_t begin;
  size_t end;
  int32_t token;   // an added token's id, or -1 for text still to tokenize
};

bool is_unicode_space_at(std::string_view text, size_t position, size_t* length) {
  uint32_t code_point = 0;
  *length = unicode::decode_utf8(text, position, &code_point);
  return unicode::is_white_space(code_point);
}

// Leftmost-longest matching of a set of literal strings, as tokenizers' AddedVocabulary does.
class AddedTokenMatcher {
 public:
  explicit AddedTokenMatcher(std::vector<AddedToken> tokens) : tokens_(std::move(tokens)) {
    std::sort(tokens_.begin(), tokens_.end(),
              [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
    for (size_t i = 0; i < tokens_.size(); ++i)
      if (!tokens_[i].content.empty()) by_first_byte_[static_cast<uint8_t>(tokens_[i].content[0])].push_back(i);
  }
  bool empty() const { return tokens_.empty(); }

  // Splits the text segments of `segments` further; added-token segments pass through.
  std::vector<Segment> split(std::string_view text, const std::vector<Segment>& segments) const {
    std::vector<Segment> out;
    for (const Segment& segment : segments) {
      if (segment.token >= 0 || tokens_.empty()) {
        out.push_back(segment);
        continue;
      }
      size_t cursor = segment.begin;   // start of the text not yet emitted
      size_t position = segment.begin;
      while (position < segment.end) {
        const AddedToken* found = nullptr;
        for (size_t index : by_first_byte_[static_cast<uint8_t>(text[position])]) {
          const std::string& content = tokens_[index].content;
          if (content.size() <= segment.end - position && text.compare(position, content.size(), content) == 0) {
            found = &tokens_[index];
            break;   // longest first
          }
        }
        if (found == nullptr) {
          ++position;
          continue;
        }
        size_t match_begin = position;
        size_t match_end = position + found->content.size();
        if (found->lstrip) {
          while (match_begin > cursor) {
            size_t back = match_begin - 1;
            while (back > cursor && (static_cast<uint8_t>(text[back]) & 0xC0) == 0x80) --back;
            size_t length = 0;
            if (!is_unicode_space_at(text, back, &length) || back + length != match_begin) break;
            match_begin = back;
          }
        }
        if (found->rstrip) {
          size_t length = 0;
          while (match_end < segment.end && is_unicode_space_at(text, match_end, &length)) match_end += length;
        }
        if (match_begin > cursor) out.push_back({cursor, match_begin, -1});
        out.push_back({match_begin, match_end, found->id});
        cursor = position = match_end;
      }
      if (cursor < segment.end) out.push_back({cursor, segment.end, -1});
    }
    return out;
  }

 private:
  std::vector<AddedToken> tokens_;
  std::array<std::vector<size_t>, 256> by_first_byte_;
};

// ---- the tokenizer -------------------------------------------------------------------------------

class ByteLevelBpe final : public Tokenizer {
 public:
  ByteLevelBpe(BpeSpec spec, const std::string& where)
      : kind_(spec.kind), steps_(spec.steps), add_prefix_space_(spec.add_prefix_space),
        ignore_merges_(spec.ignore_merges), bos_id_(spec.bos_id), eos_id_(spec.eos_id),
        adds_bos_(spec.adds_bos && spec.bos_id >= 0),
        special_(select(spec.added_tokens, true)), non_special_(select(spec.added_tokens, false)) {
    vocab_size_ = static_cast<int64_t>(spec.tokens.size());
    for (const AddedToken& token : spec.added_tokens) vocab_size_ = std::max<int64_t>(vocab_size_, token.id + 1);
    decoded_.resize(static_cast<size_t>(vocab_size_));
    vocab_.reserve(spec.tokens.size());
    for (size_t id = 0; id < spec.tokens.size(); ++id) {
      if (spec.tokens[id].empty()) continue;
      vocab_.emplace(spec.tokens[id], static_cast<int32_t>(id));
      decoded_[id] = token_bytes(spec.tokens[id]);
    }
    for (const AddedToken& token : spec.added_tokens) {
      if (token.id < 0) throw FormatError(where + ": added token '" + token.content + "' has a negative id");
      decoded_[static_cast<size_t>(token.id)] = token.content;
    }
    // Some vocabularies leave out bytes that never occur in valid UTF-8 text (SmolLM2 has no token
    // for 0x04); tokenizers then drops such a byte, and so does this.
    const auto& characters = byte_characters();
    int missing = 0;
    for (int byte = 0; byte < 256; ++byte) {
      std::string character;
      unicode::append_utf8(character, characters.of_byte[byte]);
      const auto found = vocab_.find(character);
      byte_ids_[byte] = found == vocab_.end() ? -1 : found->second;
      missing += found == vocab_.end();
    }
    if (missing > 128)
      throw FormatError(where + ": the vocabulary has tokens for only " + std::to_string(256 - missing) +
                        " of the 256 byte characters; not a byte-level BPE vocabulary");
    merges_.reserve(spec.merges.size());
    for (size_t rank = 0; rank < spec.merges.size(); ++rank) {
      const auto& [left, right] = spec.merges[rank];
      const auto left_id = vocab_.find(left), right_id = vocab_.find(right), merged = vocab_.find(left + right);
      if (left_id == vocab_.end() || right_id == vocab_.end() || merged == vocab_.end())
        throw FormatError(where + ": merge " + std::to_string(rank) + " ('" + left + "' '" + right +
                          "') names a token that is not in the vocabulary");
      // The first rank of a pair wins, as in tokenizers.
      merges_.emplace(pair_key(left_id->second, right_id->second),
                      MergeRule{static_cast<int32_t>(rank), merged->second});
    }
  }

  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    std::vector<Segment> segments{{0, text.size(), -1}};
    segments = non_special_.split(text, special_.split(text, segments));
    for (const Segment& segment : segments) {
      if (segment.token >= 0) {
        ids.push_back(segment.token);
        continue;
      }
      std::string_view piece = text.substr(segment.begin, segment.end - segment.begin);
      std::string prefixed;
      if (add_prefix_space_ && (piece.empty() || piece[0] != ' ')) {
        prefixed = " " + std::string(piece);
        piece = prefixed;
      }
      for (const auto& [first, second] : pre_tokenize(piece, steps_)) encode_word(piece.substr(first, second - first), ids);
    }
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string text;
    for (int32_t id : ids)
      if (id >= 0 && id < vocab_size_) text += decoded_[static_cast<size_t>(id)];
    return text;
  }

  int64_t vocab_size() const override { return vocab_size_; }
  int32_t bos_id() const override { return bos_id_; }
  int32_t eos_id() const override { return eos_id_; }
  bool adds_bos() const override { return adds_bos_; }
  std::string kind() const override { return kind_; }

 private:
  struct MergeRule {
    int32_t rank;
    int32_t merged;
  };
  struct Symbol {
    int32_t id;
    int32_t previous;
    int32_t next;
    bool alive;
  };
  struct Candidate {
    int32_t rank;
    int32_t position;
    int32_t merged;
    bool operator>(const Candidate& other) const {
      return rank != other.rank ? rank > other.rank : position > other.position;
    }
  };

  static std::vector<AddedToken> select(const std::vector<AddedToken>& tokens, bool special) {
    std::vector<AddedToken> chosen;
    for (const AddedToken& token : tokens)
      if (token.special == special) chosen.push_back(token);
    return chosen;
  }

  const MergeRule* merge_of(int32_t left, int32_t right) const {
    const auto found = merges_.find(pair_key(left, right));
    return found == merges_.end() ? nullptr : &found->second;
  }

  void encode_word(std::string_view word, std::vector<int32_t>& ids) const {
    CacheStripe& stripe = cache_[std::hash<std::string_view>{}(word) % kCacheStripes];
    {
      std::lock_guard<std::mutex> lock(stripe.mutex);
      const auto cached = stripe.words.find(std::string(word));
      if (cached != stripe.words.end()) {
        ids.insert(ids.end(), cached->second.begin(), cached->second.end());
        return;
      }
    }
    std::vector<int32_t> result;
    if (ignore_merges_) {
      std::string characters;
      for (char byte : word) unicode::append_utf8(characters, byte_characters().of_byte[static_cast<uint8_t>(byte)]);
      const auto whole = vocab_.find(characters);
      if (whole != vocab_.end()) result.push_back(whole->second);
    }
    if (result.empty()) merge_word(word, result);
    {
      std::lock_guard<std::mutex> lock(stripe.mutex);
      if (stripe.words.size() > kCacheLimit / kCacheStripes) stripe.words.clear();
      stripe.words.emplace(std::string(word), result);
    }
    ids.insert(ids.end(), result.begin(), result.end());
  }

  void merge_word(std::string_view word, std::vector<int32_t>& result) const {
    std::vector<Symbol> symbols;
    symbols.reserve(word.size());
    for (char byte : word) {
      const int32_t id = byte_ids_[static_cast<uint8_t>(byte)];
      if (id >= 0) symbols.push_back({id, static_cast<int32_t>(symbols.size()) - 1, -1, true});
    }
    const int32_t count = static_cast<int32_t>(symbols.size());
    for (int32_t i = 0; i + 1 < count; ++i) symbols[i].next = i + 1;
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
    for (int32_t i = 0; i + 1 < count; ++i)
      if (const MergeRule* rule = merge_of(symbols[i].id, symbols[i + 1].id)) queue.push({rule->rank, i, rule->merged});
    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      Symbol& symbol = symbols[top.position];
      if (!symbol.alive || symbol.next < 0) continue;
      Symbol& right = symbols[symbol.next];
      const MergeRule* rule = merge_of(symbol.id, right.id);
      if (rule == nullptr || rule->merged != top.merged) continue;   // stale candidate
      symbol.id = top.merged;
      right.alive = false;
      symbol.next = right.next;
      if (symbol.next >= 0) symbols[symbol.next].previous = top.position;
      if (symbol.previous >= 0)
        if (const MergeRule* left_rule = merge_of(symbols[symbol.previous].id, symbol.id))
          queue.push({left_rule->rank, symbol.previous, left_rule->merged});
      if (symbol.next >= 0)
        if (const MergeRule* right_rule = merge_of(symbol.id, symbols[symbol.next].id))
          queue.push({right_rule->rank, top.position, right_rule->merged});
    }
    for (int32_t i = count > 0 ? 0 : -1; i >= 0; i = symbols[i].next) result.push_back(symbols[i].id);
  }

  static constexpr size_t kCacheLimit = 1 << 20;
  // Words already merged, split into independently locked stripes so that threads encoding
  // different pieces of a corpus rarely wait for each other.
  static constexpr size_t kCacheStripes = 64;
  struct CacheStripe {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int32_t>> words;
  };

  std::string kind_;
  std::vector<PreTokenizerStep> steps_;
  bool add_prefix_space_;
  bool ignore_merges_;
  int32_t bos_id_;
  int32_t eos_id_;
  bool adds_bos_;
  AddedTokenMatcher special_;
  AddedTokenMatcher non_special_;
  int64_t vocab_size_ = 0;
  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> decoded_;
  std::array<int32_t, 256> byte_ids_{};
  std::unordered_map<uint64_t, MergeRule> merges_;
  mutable std::array<CacheStripe, kCacheStripes> cache_;
};

}  // namespace

std::vector<std::pair<size_t, size_t>> pre_tokenize(std::string_view text, const std::vector<PreTokenizerStep>& steps) {
  const CodePoints code_points(text);
  std::vector<Range> ranges{{0, code_points.values.size()}};
  if (code_points.values.empty()) ranges.clear();
  std::vector<Range> next;
  for (PreTokenizerStep step : steps) {
    next.clear();
    for (const Range& range : ranges) {
      switch (step) {
        case PreTokenizerStep::digits_individual: split_digits(code_points, range, true, next); break;
        case PreTokenizerStep::digits_contiguous: split_digits(code_points, range, false, next); break;
        default: split_by_expression(code_points, range, step, next); break;
      }
    }
    ranges.swap(next);
  }
  std::vector<std::pair<size_t, size_t>> spans;
  spans.reserve(ranges.size());
  for (const Range& range : ranges) spans.emplace_back(code_points.offsets[range.first], code_points.offsets[range.second]);
  return spans;
}

std::unique_ptr<Tokenizer> make_byte_level_bpe(BpeSpec spec, const std::string& where) {
  return std::make_unique<ByteLevelBpe>(std::move(spec), where);
}

}  // namespace qlora::data

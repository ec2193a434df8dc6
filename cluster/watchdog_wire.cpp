// Encoding of the watchdog's hellos and notices (big-endian integers), and the stream splitter.
#include "cluster/watchdog_wire.h"

#include <fcntl.h>
#include <unistd.h>

#include <random>

namespace qlora::cluster::watchdog_wire {
namespace {

constexpr uint32_t kHelloMagic = 0x514c5732;  // "QLW2": the 128-bit-token protocol

void put_u32(uint8_t* out, uint32_t value) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<uint8_t>(value >> (24 - 8 * i));
}

uint32_t get_u32(const uint8_t* in) {
  return (uint32_t{in[0]} << 24) | (uint32_t{in[1]} << 16) | (uint32_t{in[2]} << 8) | uint32_t{in[3]};
}

bool read_urandom(Token* token) {
  const int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  size_t held = 0;
  while (held < token->size()) {
    const ssize_t got = read(fd, token->data() + held, token->size() - held);
    if (got <= 0) break;
    held += static_cast<size_t>(got);
  }
  close(fd);
  return held == token->size();
}

// Cuts at a character boundary, so a cut message is still valid UTF-8.
std::string cut_text(const std::string& text) {
  if (text.size() <= kMaxNoticeText) return text;
  size_t end = kMaxNoticeText - 3;
  while (end > 0 && (static_cast<uint8_t>(text[end]) & 0xC0) == 0x80) --end;
  return text.substr(0, end) + "...";
}

}  // namespace

Token random_token() {
  Token token{};
  if (read_urandom(&token)) return token;
  std::random_device device;
  for (size_t i = 0; i < token.size(); i += 4) {
    const uint32_t value = device();
    for (size_t k = 0; k < 4; ++k) token[i + k] = static_cast<uint8_t>(value >> (8 * k));
  }
  return token;
}

Hello encode_hello(int rank, const Token& token) {
  Hello hello{};
  put_u32(hello.data(), kHelloMagic);
  put_u32(hello.data() + 4, static_cast<uint32_t>(rank));
  for (size_t i = 0; i < token.size(); ++i) hello[8 + i] = token[i];
  return hello;
}

int decode_hello(const uint8_t* bytes, const Token& token) {
  // Every byte is compared whatever the first difference, so timing does not reveal the token.
  uint8_t difference = 0;
  for (size_t i = 0; i < token.size(); ++i) difference |= static_cast<uint8_t>(bytes[8 + i] ^ token[i]);
  if (get_u32(bytes) != kHelloMagic || difference != 0) return -1;
  const uint32_t rank = get_u32(bytes + 4);
  return rank > 0x7fffffffu ? -1 : static_cast<int>(rank);
}

std::string encode_notice(const Notice& notice) {
  const std::string text = cut_text(notice.text);
  std::string bytes(kNoticeHeaderBytes + text.size(), '\0');
  auto* out = reinterpret_cast<uint8_t*>(bytes.data());
  out[0] = kNoticeTag;
  out[1] = static_cast<uint8_t>(notice.kind);
  put_u32(out + 2, static_cast<uint32_t>(notice.subject));
  put_u32(out + 6, static_cast<uint32_t>(notice.reporter));
  put_u32(out + 10, static_cast<uint32_t>(notice.exit_code));
  out[14] = static_cast<uint8_t>(text.size() >> 8);
  out[15] = static_cast<uint8_t>(text.size());
  bytes.replace(kNoticeHeaderBytes, text.size(), text);
  return bytes;
}

void StreamReader::append(const uint8_t* bytes, size_t count) {
  if (consumed_ > 0 && consumed_ == buffer_.size()) {
    buffer_.clear();
    consumed_ = 0;
  }
  buffer_.append(reinterpret_cast<const char*>(bytes), count);
}

StreamReader::Item StreamReader::next(Notice* notice) {
  if (consumed_ >= buffer_.size()) return Item::none;
  const auto* in = reinterpret_cast<const uint8_t*>(buffer_.data()) + consumed_;
  const size_t available = buffer_.size() - consumed_;
  switch (in[0]) {
    case kHeartbeat:
      ++consumed_;
      return Item::heartbeat;
    case kGoodbye:
      ++consumed_;
      return Item::goodbye;
    case kNoticeTag: {
      if (available < kNoticeHeaderBytes) return Item::none;
      const size_t length = (size_t{in[14]} << 8) | in[15];
      const auto kind = static_cast<NoticeKind>(in[1]);
      if ((kind != NoticeKind::failed && kind != NoticeKind::lost) || length > kMaxNoticeText) return Item::malformed;
      if (available < kNoticeHeaderBytes + length) return Item::none;
      notice->kind = kind;
      notice->subject = static_cast<int>(get_u32(in + 2));
      notice->reporter = static_cast<int>(get_u32(in + 6));
      notice->exit_code = static_cast<int>(get_u32(in + 10));
      notice->text.assign(reinterpret_cast<const char*>(in + kNoticeHeaderBytes), length);
      consumed_ += kNoticeHeaderBytes + length;
      return Item::notice;
    }
    default:
      return Item::malformed;
  }
}

}  // namespace qlora::cluster::watchdog_wire

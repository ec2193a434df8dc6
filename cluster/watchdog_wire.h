// The bytes the fault watchdog's links carry. A connection opens with a hello each way (the sender's
// rank and the job's 128-bit token, so a connection from anything else is refused); after it the
// stream holds one-byte heartbeats and goodbyes, and framed notices that travel rank to rank until
// every rank knows that a rank failed (its own error) or was lost (died, froze, went off the network).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace qlora::cluster::watchdog_wire {

using Token = std::array<uint8_t, 16>;

// 16 bytes from /dev/urandom (std::random_device should that be unreadable).
Token random_token();

constexpr size_t kHelloBytes = 24;  // magic, rank, token
using Hello = std::array<uint8_t, kHelloBytes>;
Hello encode_hello(int rank, const Token& token);
// The rank a hello names, or -1 when its magic or token is not this job's.
int decode_hello(const uint8_t* bytes, const Token& token);

// Exchanged with the tree neighbours at setup (through the group, not TCP), before listening: who
// the rank is, for messages about it, and its interfaces, for choosing an address its children reach.
constexpr size_t kMaxHostAddresses = 12;
struct HostRecord {
  char host[64];
  uint64_t identity;  // host_identity(): equal means one loopback
  uint32_t pid;
  uint32_t address_count;
  uint32_t addresses[kMaxHostAddresses];  // IPv4, network byte order, loopback excluded
};
static_assert(sizeof(HostRecord) == 128, "HostRecord is exchanged as raw bytes");

// Then where it listens.
struct ListenRecord {
  uint32_t address;  // IPv4, network byte order
  uint32_t port;     // 0: not listening (a leaf, or listening failed)
};

constexpr uint8_t kHeartbeat = 'H';
constexpr uint8_t kGoodbye = 'G';  // the sender finished normally and sends nothing more
constexpr uint8_t kNoticeTag = 'N';

enum class NoticeKind : uint8_t {
  failed = 'F',  // `subject` ended with an error of its own and says so before exiting
  lost = 'L',    // `subject` vanished without a goodbye; `reporter` saw it
};

struct Notice {
  NoticeKind kind = NoticeKind::failed;
  int subject = -1;
  int reporter = -1;
  int exit_code = 0;  // what every rank ends with
  std::string text;   // failed: the rank's own message; lost: "lost rank ... : why"
};

constexpr size_t kNoticeHeaderBytes = 16;  // tag, kind, subject, reporter, exit code, text length
constexpr size_t kMaxNoticeText = 1024;    // longer texts are cut (a message, not a log)
std::string encode_notice(const Notice& notice);

// Splits a link's stream (after the hello) into items as bytes arrive in any pieces.
class StreamReader {
 public:
  enum class Item { none, heartbeat, goodbye, notice, malformed };
  void append(const uint8_t* bytes, size_t count);
  // The next complete item (`notice` filled for Item::notice); none until more bytes arrive.
  Item next(Notice* notice);

 private:
  std::string buffer_;
  size_t consumed_ = 0;
};

}  // namespace qlora::cluster::watchdog_wire

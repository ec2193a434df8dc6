// The fault watchdog's parts that need no network: the tree its links follow, the bytes on the
// links (hellos, heartbeats, goodbyes, notices arriving in any pieces), and the choice of the one
// address a rank listens on.
#include <arpa/inet.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <set>

#include "cluster/fault_watchdog.h"
#include "cluster/watchdog_address.h"
#include "cluster/watchdog_wire.h"

namespace qlora::cluster {
namespace {

namespace wire = watchdog_wire;

uint32_t ip(const char* dotted) {
  in_addr address{};
  EXPECT_EQ(inet_pton(AF_INET, dotted, &address), 1) << dotted;
  return address.s_addr;
}

TEST(WatchdogTree, SmallWorldsLinkParentFirstThenChildren) {
  EXPECT_EQ(watchdog_tree_neighbours(0, 1), std::vector<int>{});
  EXPECT_EQ(watchdog_tree_neighbours(0, 2), std::vector<int>{1});
  EXPECT_EQ(watchdog_tree_neighbours(1, 2), std::vector<int>{0});
  EXPECT_EQ(watchdog_tree_neighbours(0, 3), (std::vector<int>{1, 2}));
  EXPECT_EQ(watchdog_tree_neighbours(1, 5), (std::vector<int>{0, 3, 4}));
  EXPECT_EQ(watchdog_tree_neighbours(37, 300), (std::vector<int>{18, 75, 76}));
  EXPECT_EQ(watchdog_tree_neighbours(149, 300), (std::vector<int>{74, 299}));
}

// For every world size up to 1100: links are symmetric, at most 3 per rank, every rank is reached
// from rank 0, and no two ranks are more than 2 * floor(log2 N) hops apart.
TEST(WatchdogTree, EveryWorldIsOneTreeOfDegreeAtMostThreeAndLogarithmicDepth) {
  for (int size = 1; size <= 1100; ++size) {
    std::vector<int> depth(size, -1);
    depth[0] = 0;
    std::deque<int> queue{0};
    int edges = 0;
    while (!queue.empty()) {
      const int rank = queue.front();
      queue.pop_front();
      const auto neighbours = watchdog_tree_neighbours(rank, size);
      ASSERT_LE(neighbours.size(), 3u) << rank << " of " << size;
      edges += static_cast<int>(neighbours.size());
      for (const int other : neighbours) {
        const auto back = watchdog_tree_neighbours(other, size);
        ASSERT_NE(std::find(back.begin(), back.end(), rank), back.end()) << rank << " - " << other << " of " << size;
        if (depth[other] < 0) {
          depth[other] = depth[rank] + 1;
          queue.push_back(other);
        }
      }
    }
    ASSERT_EQ(*std::min_element(depth.begin(), depth.end()), 0) << "a rank is unreachable in a world of " << size;
    EXPECT_EQ(edges, 2 * (size - 1)) << size;  // a tree: N - 1 links, each seen from both ends
    EXPECT_EQ(*std::max_element(depth.begin(), depth.end()), static_cast<int>(std::floor(std::log2(size)))) << size;
  }
}

TEST(WatchdogWire, AHelloNamesItsRankOnlyWithTheSameTokenBitForBit) {
  const wire::Token token = wire::random_token();
  const wire::Hello hello = wire::encode_hello(4097, token);
  EXPECT_EQ(wire::decode_hello(hello.data(), token), 4097);
  for (size_t byte = 0; byte < token.size(); ++byte)
    for (int bit = 0; bit < 8; ++bit) {
      wire::Token other = token;
      other[byte] ^= static_cast<uint8_t>(1 << bit);
      EXPECT_EQ(wire::decode_hello(hello.data(), other), -1) << byte << ":" << bit;
    }
  wire::Hello wrong_magic = hello;
  wrong_magic[0] ^= 0x01;
  EXPECT_EQ(wire::decode_hello(wrong_magic.data(), token), -1);
}

TEST(WatchdogWire, TokensAre128RandomBits) {
  std::set<wire::Token> seen;
  int ones = 0;
  for (int i = 0; i < 64; ++i) {
    const wire::Token token = wire::random_token();
    seen.insert(token);
    for (const uint8_t byte : token) ones += __builtin_popcount(byte);
  }
  EXPECT_EQ(seen.size(), 64u);
  // 8192 fair bits: 4096 ones, standard deviation 45; 300 is more than six of them.
  EXPECT_NEAR(ones, 4096, 300);
}

TEST(WatchdogWire, ItemsSplitAnywhereComeOutWhole) {
  const wire::Notice failed{wire::NoticeKind::failed, 7, 7, 2, "cannot write /runs/a: disk full"};
  const wire::Notice lost{wire::NoticeKind::lost, 37, 18, 3, "lost rank 37 (pid 4242 on node3): closed"};
  const std::string stream = "HH" + wire::encode_notice(failed) + "H" + wire::encode_notice(lost) + "G";
  EXPECT_EQ(wire::encode_notice(failed).size(), wire::kNoticeHeaderBytes + failed.text.size());
  for (const size_t piece : {size_t{1}, size_t{3}, size_t{16}, stream.size()}) {
    wire::StreamReader reader;
    std::vector<wire::StreamReader::Item> items;
    std::vector<wire::Notice> notices;
    for (size_t at = 0; at < stream.size(); at += piece) {
      reader.append(reinterpret_cast<const uint8_t*>(stream.data()) + at, std::min(piece, stream.size() - at));
      wire::Notice notice;
      for (auto item = reader.next(&notice); item != wire::StreamReader::Item::none; item = reader.next(&notice)) {
        items.push_back(item);
        if (item == wire::StreamReader::Item::notice) notices.push_back(notice);
      }
    }
    using Item = wire::StreamReader::Item;
    EXPECT_EQ(items, (std::vector<Item>{Item::heartbeat, Item::heartbeat, Item::notice, Item::heartbeat, Item::notice,
                                        Item::goodbye}))
        << "pieces of " << piece;
    ASSERT_EQ(notices.size(), 2u);
    for (size_t i = 0; i < 2; ++i) {
      const wire::Notice& expected = i == 0 ? failed : lost;
      EXPECT_EQ(notices[i].kind, expected.kind);
      EXPECT_EQ(notices[i].subject, expected.subject);
      EXPECT_EQ(notices[i].reporter, expected.reporter);
      EXPECT_EQ(notices[i].exit_code, expected.exit_code);
      EXPECT_EQ(notices[i].text, expected.text);
    }
  }
}

TEST(WatchdogWire, LongTextsAreCutAtACharacterBoundary) {
  std::string text;
  while (text.size() < 3000) text += "é";  // two bytes each
  const std::string bytes = wire::encode_notice({wire::NoticeKind::failed, 1, 1, 2, text});
  wire::StreamReader reader;
  reader.append(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  wire::Notice notice;
  ASSERT_EQ(reader.next(&notice), wire::StreamReader::Item::notice);
  EXPECT_LE(notice.text.size(), wire::kMaxNoticeText);
  EXPECT_EQ(notice.text.size(), 1020u + 3u);  // 510 whole characters, then "..."
  EXPECT_EQ(notice.text.substr(notice.text.size() - 3), "...");
  EXPECT_EQ(notice.text.substr(0, 4), "éé");
}

TEST(WatchdogWire, UnknownBytesAndNoticeKindsAreMalformed) {
  wire::Notice notice;
  wire::StreamReader junk;
  junk.append(reinterpret_cast<const uint8_t*>("HX"), 2);
  EXPECT_EQ(junk.next(&notice), wire::StreamReader::Item::heartbeat);
  EXPECT_EQ(junk.next(&notice), wire::StreamReader::Item::malformed);

  std::string bytes = wire::encode_notice({wire::NoticeKind::lost, 1, 0, 3, "x"});
  bytes[1] = 'Q';
  wire::StreamReader bad_kind;
  bad_kind.append(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  EXPECT_EQ(bad_kind.next(&notice), wire::StreamReader::Item::malformed);

  bytes = wire::encode_notice({wire::NoticeKind::lost, 1, 0, 3, "x"});
  bytes[14] = 0x7f;  // a text length beyond the limit
  wire::StreamReader too_long;
  too_long.append(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  EXPECT_EQ(too_long.next(&notice), wire::StreamReader::Item::malformed);
}

TEST(WatchdogAddress, RanksSharingOneLoopbackListenOnIt) {
  const std::vector<HostInterface> interfaces{{ip("10.0.0.5"), ip("255.255.255.0")}};
  EXPECT_EQ(format_ipv4(choose_listen_address(true, {ip("10.0.0.5")}, interfaces, {})), "127.0.0.1");
}

TEST(WatchdogAddress, TheHostNamesOwnAddressComesFirst) {
  const std::vector<HostInterface> interfaces{{ip("192.168.1.5"), ip("255.255.255.0")},
                                              {ip("10.0.0.5"), ip("255.255.0.0")}};
  // Children on 192.168.1.x would favour the first interface; the host name says 10.0.0.5.
  EXPECT_EQ(format_ipv4(choose_listen_address(false, {ip("10.0.0.5")}, interfaces, {ip("192.168.1.9")})), "10.0.0.5");
}

TEST(WatchdogAddress, ALoopbackOrForeignHostNameFallsBackToTheSubnetOfMostPeers) {
  const std::vector<HostInterface> interfaces{{ip("192.168.1.5"), ip("255.255.255.0")},
                                              {ip("10.0.0.5"), ip("255.255.0.0")}};
  // Debian's 127.0.1.1 for the host name, and an address that is not this host's.
  const std::vector<uint32_t> resolved{ip("127.0.1.1"), ip("172.16.0.1")};
  EXPECT_EQ(format_ipv4(choose_listen_address(false, resolved, interfaces, {ip("10.0.7.1"), ip("10.0.3.2"), ip("192.168.1.7")})),
            "10.0.0.5");
  EXPECT_EQ(format_ipv4(choose_listen_address(false, resolved, interfaces, {ip("192.168.1.7")})), "192.168.1.5");
  EXPECT_EQ(format_ipv4(choose_listen_address(false, resolved, interfaces, {ip("8.8.8.8")})), "192.168.1.5");
  EXPECT_EQ(format_ipv4(choose_listen_address(false, resolved, {}, {ip("10.0.7.1")})), "127.0.0.1");
}

TEST(WatchdogAddress, TheHostIdentityIsStableAndThisHostsInterfacesAreNotLoopback) {
  EXPECT_EQ(host_identity(), host_identity());
  for (const auto& interface : local_interfaces()) EXPECT_NE(format_ipv4(interface.address).substr(0, 4), "127.");
  EXPECT_EQ(resolve_host_addresses("localhost").empty(), false);
}

}  // namespace
}  // namespace qlora::cluster

// The watchdog's listen address: host identity from /proc, interfaces from getifaddrs, names from
// getaddrinfo, and the choice between them (a pure function, so tests can give it any network).
#include "cluster/watchdog_address.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <string>

#include "common/hash.h"

namespace qlora::cluster {
namespace {

bool is_loopback(uint32_t address) { return (ntohl(address) >> 24) == 127; }

bool shares_subnet(const HostInterface& interface, uint32_t address) {
  return interface.netmask != 0 && (interface.address & interface.netmask) == (address & interface.netmask);
}

}  // namespace

uint64_t host_identity() {
  std::string identity;
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  identity += host;
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string boot_id;
  std::getline(boot, boot_id);
  identity += "/" + boot_id;
  struct stat network_namespace {};
  if (stat("/proc/self/ns/net", &network_namespace) == 0)
    identity += "/" + std::to_string(network_namespace.st_dev) + ":" + std::to_string(network_namespace.st_ino);
  Fnv1a64 hash;
  hash.update(identity.data(), identity.size());
  return std::stoull(hash.hex(), nullptr, 16);
}

std::vector<HostInterface> local_interfaces() {
  std::vector<HostInterface> result;
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return result;
  for (ifaddrs* entry = list; entry != nullptr; entry = entry->ifa_next) {
    if (entry->ifa_addr == nullptr || entry->ifa_addr->sa_family != AF_INET) continue;
    if ((entry->ifa_flags & IFF_UP) == 0 || (entry->ifa_flags & IFF_LOOPBACK) != 0) continue;
    const auto* address = reinterpret_cast<const sockaddr_in*>(entry->ifa_addr);
    const auto* netmask = reinterpret_cast<const sockaddr_in*>(entry->ifa_netmask);
    result.push_back({address->sin_addr.s_addr, netmask != nullptr ? netmask->sin_addr.s_addr : 0u});
  }
  freeifaddrs(list);
  return result;
}

std::vector<uint32_t> resolve_host_addresses(const std::string& host) {
  std::vector<uint32_t> result;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* list = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &list) != 0) return result;
  for (addrinfo* entry = list; entry != nullptr; entry = entry->ai_next) {
    const uint32_t address = reinterpret_cast<const sockaddr_in*>(entry->ai_addr)->sin_addr.s_addr;
    if (std::find(result.begin(), result.end(), address) == result.end()) result.push_back(address);
  }
  freeaddrinfo(list);
  return result;
}

uint32_t choose_listen_address(bool all_on_one_host, const std::vector<uint32_t>& resolved,
                               const std::vector<HostInterface>& interfaces,
                               const std::vector<uint32_t>& peer_addresses) {
  const uint32_t loopback = htonl(INADDR_LOOPBACK);
  if (all_on_one_host || interfaces.empty()) return loopback;
  for (const uint32_t address : resolved) {
    if (is_loopback(address)) continue;
    const bool ours = std::any_of(interfaces.begin(), interfaces.end(),
                                  [&](const HostInterface& interface) { return interface.address == address; });
    if (ours) return address;
  }
  const HostInterface* best = &interfaces.front();
  long best_reached = -1;
  for (const auto& interface : interfaces) {
    const long reached = std::count_if(peer_addresses.begin(), peer_addresses.end(),
                                       [&](uint32_t address) { return shares_subnet(interface, address); });
    if (reached > best_reached) {
      best = &interface;
      best_reached = reached;
    }
  }
  return best->address;
}

std::string format_ipv4(uint32_t address) {
  char text[INET_ADDRSTRLEN] = {0};
  in_addr value{};
  value.s_addr = address;
  inet_ntop(AF_INET, &value, text, sizeof text);
  return text;
}

}  // namespace qlora::cluster

// Where a rank's fault watchdog listens: one address its peers can reach, never every interface.
// All ranks behind one loopback (one kernel boot, one network namespace): 127.0.0.1. Otherwise the
// address the host name resolves to, when it is one of this host's interfaces (what MPI launchers and
// ssh use to reach the host); failing that (Debian maps the host name to 127.0.1.1), the interface
// on a subnet shared with most of the peers that will connect.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qlora::cluster {

struct HostInterface {
  uint32_t address = 0;  // IPv4, network byte order
  uint32_t netmask = 0;
};

// Equal for processes that share a loopback: the same kernel boot and network namespace (and host name).
uint64_t host_identity();

// This host's IPv4 interfaces that are up, loopback excluded.
std::vector<HostInterface> local_interfaces();

// What `host` resolves to (IPv4, network byte order; empty when it does not resolve).
std::vector<uint32_t> resolve_host_addresses(const std::string& host);

// `peer_addresses`: the interface addresses of the peers on other hosts that must reach this one.
uint32_t choose_listen_address(bool all_on_one_host, const std::vector<uint32_t>& resolved,
                               const std::vector<HostInterface>& interfaces,
                               const std::vector<uint32_t>& peer_addresses);

std::string format_ipv4(uint32_t address);  // dotted quad of a network-byte-order address

}  // namespace qlora::cluster

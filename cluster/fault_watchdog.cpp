// The fault watchdog: a TCP connection between every pair of ranks, serviced by one thread per rank.
// Rank i connects to every rank below it and accepts from every rank above; a 16-byte hello carrying
// a token shared through MPI identifies both ends, so a connection that reached the wrong process
// (an address that exists on several hosts, a stale port) is dropped and the next address tried.
// After the hello the stream carries single bytes: heartbeats, and one goodbye before a clean exit.
#include "cluster/fault_watchdog.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>

#include "common/log.h"

namespace qlora::cluster {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint32_t kHelloMagic = 0x514c5744;  // "QLWD"
constexpr size_t kHelloBytes = 16;
constexpr uint8_t kHeartbeat = 'H';
constexpr uint8_t kGoodbye = 'G';
constexpr double kConnectAttemptSeconds = 3.0;
// A reply comes within milliseconds from the right process; only a wrong one stays silent.
constexpr double kReplySeconds = 10.0;
// A gap this long between two passes of our own loop means this process was not running (stopped,
// suspended): peers' silence over that gap says nothing about them.
constexpr double kSelfStallSeconds = 5.0;
constexpr size_t kMaxAddresses = 13;

// What every rank publishes about itself, gathered to all ranks through MPI.
struct Endpoint {
  char host[64];
  uint32_t pid;
  uint32_t port;
  uint32_t address_count;
  uint32_t addresses[kMaxAddresses];  // IPv4, network byte order, loopback excluded
};
static_assert(sizeof(Endpoint) == 128, "Endpoint is exchanged as raw bytes");

double seconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

void put_u32(uint8_t* out, uint32_t value) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<uint8_t>(value >> (24 - 8 * i));
}
uint32_t get_u32(const uint8_t* in) {
  return (uint32_t{in[0]} << 24) | (uint32_t{in[1]} << 16) | (uint32_t{in[2]} << 8) | uint32_t{in[3]};
}

void encode_hello(uint8_t* out, int rank, uint64_t token) {
  put_u32(out, kHelloMagic);
  put_u32(out + 4, static_cast<uint32_t>(rank));
  put_u32(out + 8, static_cast<uint32_t>(token >> 32));
  put_u32(out + 12, static_cast<uint32_t>(token));
}

// The rank a hello names, or -1 when it is not one of ours.
int decode_hello(const uint8_t* in, uint64_t token) {
  if (get_u32(in) != kHelloMagic) return -1;
  const uint64_t received = (uint64_t{get_u32(in + 8)} << 32) | get_u32(in + 12);
  if (received != token) return -1;
  return static_cast<int>(get_u32(in + 4));
}

struct Interface {
  uint32_t address;  // network byte order
  uint32_t netmask;
};

std::vector<Interface> local_interfaces() {
  std::vector<Interface> result;
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

void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// One non-blocking send; false when the connection is broken (a full buffer is not).
bool send_byte(int fd, uint8_t byte) {
  const ssize_t sent = send(fd, &byte, 1, MSG_NOSIGNAL | MSG_DONTWAIT);
  return sent == 1 || (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR));
}

// Reads what is there into `buffer` up to `want` bytes; -1 on end-of-file or error, else bytes held.
ssize_t read_some(int fd, uint8_t* buffer, size_t* held, size_t want) {
  while (*held < want) {
    const ssize_t got = recv(fd, buffer + *held, want - *held, MSG_DONTWAIT);
    if (got > 0) {
      *held += static_cast<size_t>(got);
      continue;
    }
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) break;
    return -1;
  }
  return static_cast<ssize_t>(*held);
}

void check_setup(int result, const char* call, MPI_Comm comm) {
  if (result == MPI_SUCCESS) return;
  char reason[MPI_MAX_ERROR_STRING] = {0};
  int length = 0;
  MPI_Error_string(result, reason, &length);
  log::error(std::string("fault watchdog setup: ") + call + " failed: " + reason + "; aborting every rank");
  MPI_Abort(comm, 3);
  std::abort();
}

}  // namespace

FaultWatchdogSettings FaultWatchdogSettings::from_environment() {
  FaultWatchdogSettings settings;
  if (const char* text = std::getenv("QLORA_HEARTBEAT_TIMEOUT")) {
    char* end = nullptr;
    const double value = std::strtod(text, &end);
    if (end != text && *end == '\0' && std::isfinite(value) && value > 0)
      settings.heartbeat_timeout_seconds = value;
    else
      log::warn(std::string("QLORA_HEARTBEAT_TIMEOUT='") + text + "' is not a positive number of seconds; using " +
                std::to_string(static_cast<int>(settings.heartbeat_timeout_seconds)));
  }
  return settings;
}

FaultWatchdog::FaultWatchdog(MPI_Comm comm, FaultWatchdogSettings settings)
    : comm_(comm), settings_(settings), collective_timeout_seconds_(settings.collective_timeout_seconds) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
  // Listen before publishing the port, so every peer that learns it can connect at once.
  listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  sockaddr_in any{};
  any.sin_family = AF_INET;
  any.sin_addr.s_addr = htonl(INADDR_ANY);
  any.sin_port = 0;
  socklen_t length = sizeof any;
  const bool listening = listen_fd_ >= 0 && wake_fd_ >= 0 &&
                         bind(listen_fd_, reinterpret_cast<sockaddr*>(&any), sizeof any) == 0 &&
                         listen(listen_fd_, SOMAXCONN) == 0 &&
                         getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&any), &length) == 0;
  if (!listening) {
    log::warn(std::string("fault watchdog: cannot listen on a TCP port (") + std::strerror(errno) +
              "); a lost rank will end this one only after --collective-timeout");
    if (listen_fd_ >= 0) close(listen_fd_);
    listen_fd_ = -1;
  }
  uint64_t token = 0;
  if (rank_ == 0) token = (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
  check_setup(MPI_Bcast(&token, 1, MPI_UINT64_T, 0, comm_), "MPI_Bcast", comm_);
  token_ = token;

  Endpoint self{};
  gethostname(self.host, sizeof self.host - 1);
  self.pid = static_cast<uint32_t>(getpid());
  self.port = listen_fd_ >= 0 ? ntohs(any.sin_port) : 0;
  const auto interfaces = local_interfaces();
  for (const auto& interface : interfaces)
    if (self.address_count < kMaxAddresses) self.addresses[self.address_count++] = interface.address;
  std::vector<Endpoint> endpoints(static_cast<size_t>(size_));
  check_setup(MPI_Allgather(&self, sizeof self, MPI_BYTE, endpoints.data(), sizeof self, MPI_BYTE, comm_),
              "MPI_Allgather", comm_);

  const auto now = Clock::now();
  peers_.resize(static_cast<size_t>(size_));
  for (int r = 0; r < size_; ++r) {
    Peer& peer = peers_[r];
    const Endpoint& endpoint = endpoints[r];
    peer.rank = r;
    peer.host.assign(endpoint.host, strnlen(endpoint.host, sizeof endpoint.host));
    peer.pid = endpoint.pid;
    peer.port = static_cast<uint16_t>(endpoint.port);
    peer.last_heard = now;
    if (r == rank_) {
      peer.link = Link::finished;
      continue;
    }
    if (listen_fd_ < 0 || endpoint.port == 0) {
      peer.link = Link::unreachable;
      continue;
    }
    if (r > rank_) continue;  // it connects to us
    // Addresses to try: loopback for a peer on this host, then the peer's addresses that share a
    // subnet with one of ours (the ones most likely routed directly), then the rest.
    if (peer.host == self.host) peer.candidates.push_back(htonl(INADDR_LOOPBACK));
    std::vector<uint32_t> near;
    std::vector<uint32_t> far;
    for (uint32_t i = 0; i < std::min<uint32_t>(endpoint.address_count, kMaxAddresses); ++i) {
      const uint32_t address = endpoint.addresses[i];
      const bool shares_subnet = std::any_of(interfaces.begin(), interfaces.end(), [&](const Interface& mine) {
        return mine.netmask != 0 && (mine.address & mine.netmask) == (address & mine.netmask);
      });
      (shares_subnet ? near : far).push_back(address);
    }
    peer.candidates.insert(peer.candidates.end(), near.begin(), near.end());
    peer.candidates.insert(peer.candidates.end(), far.begin(), far.end());
    try_next_candidate(peer, now);
  }
  last_heartbeat_ = now;
  last_service_ = now;

  // Connect to every peer before returning, so a rank that ends right away (a user error found on
  // every rank) already has links to say goodbye over.
  const auto deadline = now + std::chrono::duration_cast<Clock::duration>(
                                  std::chrono::duration<double>(settings_.setup_timeout_seconds));
  while (!setup_complete() && Clock::now() < deadline) service(50);
  count_connected();
  std::ostringstream missing;
  for (const auto& peer : peers_) {
    if (peer.link == Link::connected || peer.link == Link::finished) continue;
    missing << " " << peer.rank << " (" << peer.host << ")";
  }
  if (!missing.str().empty())
    log::warn("fault watchdog: no connection to rank(s)" + missing.str() +
              "; if one of them is lost, this rank ends only after --collective-timeout");
  thread_ = std::thread([this] { run(); });
}

FaultWatchdog::~FaultWatchdog() {
  stopping_.store(true);
  const uint64_t one = 1;
  if (wake_fd_ >= 0 && write(wake_fd_, &one, sizeof one) < 0) {
    // The thread notices `stopping_` at its next poll timeout anyway.
  }
  if (thread_.joinable()) thread_.join();
  // Goodbye, then wait (briefly) for each peer to close its end: closing while its heartbeats are
  // still unread would reset the connection instead of ending it in order.
  std::vector<Peer*> open;
  for (auto& peer : peers_) {
    if (peer.link != Link::connected) {
      if (peer.fd >= 0) close(peer.fd);
      peer.fd = -1;
      continue;
    }
    send_byte(peer.fd, kGoodbye);
    shutdown(peer.fd, SHUT_WR);
    open.push_back(&peer);
  }
  const auto deadline = Clock::now() + std::chrono::seconds(2);
  while (!open.empty() && Clock::now() < deadline) {
    std::vector<pollfd> fds;
    for (Peer* peer : open) fds.push_back({peer->fd, POLLIN, 0});
    if (poll(fds.data(), fds.size(), 100) < 0 && errno != EINTR) break;
    std::vector<Peer*> still_open;
    for (size_t i = 0; i < open.size(); ++i) {
      bool closed = false;
      if (fds[i].revents != 0) {
        uint8_t discard[256];
        for (;;) {
          const ssize_t got = recv(open[i]->fd, discard, sizeof discard, MSG_DONTWAIT);
          if (got > 0) continue;
          closed = got == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
          break;
        }
      }
      if (closed) {
        close(open[i]->fd);
        open[i]->fd = -1;
      } else {
        still_open.push_back(open[i]);
      }
    }
    open.swap(still_open);
  }
  for (Peer* peer : open) close(peer->fd);
  for (auto& pending : unidentified_) close(pending.fd);
  if (listen_fd_ >= 0) close(listen_fd_);
  if (wake_fd_ >= 0) close(wake_fd_);
}

void FaultWatchdog::begin_wait(const char* call) {
  wait_call_.store(call);
  const auto since = Clock::now().time_since_epoch();
  wait_started_nanoseconds_.store(std::max<int64_t>(1, std::chrono::duration_cast<std::chrono::nanoseconds>(since).count()));
}

void FaultWatchdog::end_wait() { wait_started_nanoseconds_.store(0); }

void FaultWatchdog::run() {
  // Signals (SIGUSR1 from SLURM, SIGTERM, SIGINT) belong to the main thread.
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
  while (!stopping_.load()) service(250);
}

bool FaultWatchdog::setup_complete() const {
  for (const auto& peer : peers_)
    if (peer.link != Link::connected && peer.link != Link::finished && peer.link != Link::unreachable) return false;
  return true;
}

void FaultWatchdog::count_connected() {
  int connected = 0;
  for (const auto& peer : peers_)
    if (peer.link == Link::connected) ++connected;
  connected_peers_.store(connected);
}

void FaultWatchdog::service(int poll_milliseconds) {
  enum class Owner { listener, wake, unidentified, peer };
  std::vector<pollfd> fds;
  std::vector<std::pair<Owner, size_t>> owners;
  if (listen_fd_ >= 0) {
    fds.push_back({listen_fd_, POLLIN, 0});
    owners.emplace_back(Owner::listener, 0);
  }
  if (wake_fd_ >= 0) {
    fds.push_back({wake_fd_, POLLIN, 0});
    owners.emplace_back(Owner::wake, 0);
  }
  for (size_t i = 0; i < unidentified_.size(); ++i) {
    fds.push_back({unidentified_[i].fd, POLLIN, 0});
    owners.emplace_back(Owner::unidentified, i);
  }
  for (size_t i = 0; i < peers_.size(); ++i) {
    const Peer& peer = peers_[i];
    if (peer.fd < 0) continue;
    const short events = peer.link == Link::connecting ? POLLOUT : POLLIN;
    fds.push_back({peer.fd, events, 0});
    owners.emplace_back(Owner::peer, i);
  }
  const int ready = poll(fds.data(), fds.size(), poll_milliseconds);
  const auto now = Clock::now();
  if (seconds_between(last_service_, now) > kSelfStallSeconds)
    for (auto& peer : peers_) peer.last_heard = now;
  last_service_ = now;

  if (ready > 0) {
    const size_t known_unidentified = unidentified_.size();
    for (size_t i = 0; i < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      const auto [owner, index] = owners[i];
      switch (owner) {
        case Owner::listener:
          accept_connections(now);
          break;
        case Owner::wake: {
          uint64_t count = 0;
          if (read(wake_fd_, &count, sizeof count) < 0) {
            // Nothing to do: the wake-up only interrupts poll().
          }
          break;
        }
        case Owner::unidentified:
          if (index < known_unidentified) read_unidentified(unidentified_[index], now);
          break;
        case Owner::peer: {
          Peer& peer = peers_[index];
          if (peer.link == Link::connecting)
            finish_connect(peer, now);
          else if (peer.link == Link::awaiting_reply)
            read_reply(peer, now);
          else if (peer.link == Link::connected)
            read_link(peer, now);
          break;
        }
      }
    }
  }
  // Drop hellos that never came (and the sockets whose hello was handled above).
  unidentified_.erase(std::remove_if(unidentified_.begin(), unidentified_.end(),
                                     [&](Unidentified& pending) {
                                       if (pending.fd >= 0 && seconds_between(pending.accepted, now) > kReplySeconds) {
                                         close(pending.fd);
                                         pending.fd = -1;
                                       }
                                       return pending.fd < 0;
                                     }),
                      unidentified_.end());
  for (auto& peer : peers_) {
    if (peer.link == Link::connecting && seconds_between(peer.attempt_started, now) > kConnectAttemptSeconds) {
      close_link(peer, Link::connecting);
      try_next_candidate(peer, now);
    } else if (peer.link == Link::awaiting_reply && seconds_between(peer.attempt_started, now) > kReplySeconds) {
      close_link(peer, Link::awaiting_reply);
      try_next_candidate(peer, now);
    }
  }
  if (seconds_between(last_heartbeat_, now) >= settings_.heartbeat_interval_seconds) {
    last_heartbeat_ = now;
    for (auto& peer : peers_)
      if (peer.link == Link::connected && !send_byte(peer.fd, kHeartbeat))
        lose(peer, std::string("its watchdog connection broke (") + std::strerror(errno) +
                       "): the process died (killed, crashed, or exited without finishing)");
  }
  for (auto& peer : peers_)
    if (peer.link == Link::connected && seconds_between(peer.last_heard, now) > settings_.heartbeat_timeout_seconds) {
      char reason[160];
      std::snprintf(reason, sizeof reason,
                    "no heartbeat for %.0f s: its node or network is down, or the process is frozen",
                    settings_.heartbeat_timeout_seconds);
      lose(peer, reason);
    }
  count_connected();
  check_wait(now);
}

void FaultWatchdog::accept_connections(Clock::time_point now) {
  for (;;) {
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;
    set_nodelay(fd);
    Unidentified pending;
    pending.fd = fd;
    pending.accepted = now;
    unidentified_.push_back(pending);
  }
}

void FaultWatchdog::read_unidentified(Unidentified& pending, Clock::time_point now) {
  const ssize_t held = read_some(pending.fd, pending.hello, &pending.hello_bytes, kHelloBytes);
  if (held >= 0 && static_cast<size_t>(held) < kHelloBytes) return;
  const int rank = held < 0 ? -1 : decode_hello(pending.hello, token_);
  const bool expected = rank > rank_ && rank < size_ && peers_[rank].link == Link::accepting;
  uint8_t reply[kHelloBytes];
  encode_hello(reply, rank_, token_);
  if (expected && send(pending.fd, reply, kHelloBytes, MSG_NOSIGNAL | MSG_DONTWAIT) == static_cast<ssize_t>(kHelloBytes)) {
    Peer& peer = peers_[rank];
    peer.fd = pending.fd;
    peer.link = Link::connected;
    peer.last_heard = now;
  } else {
    close(pending.fd);
  }
  pending.fd = -1;  // handed over or closed; erased after this pass
}

void FaultWatchdog::try_next_candidate(Peer& peer, Clock::time_point now) {
  while (peer.next_candidate < peer.candidates.size()) {
    const uint32_t address = peer.candidates[peer.next_candidate++];
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) break;
    set_nodelay(fd);
    sockaddr_in target{};
    target.sin_family = AF_INET;
    target.sin_addr.s_addr = address;
    target.sin_port = htons(peer.port);
    if (connect(fd, reinterpret_cast<sockaddr*>(&target), sizeof target) == 0 || errno == EINPROGRESS) {
      peer.fd = fd;
      peer.link = Link::connecting;
      peer.attempt_started = now;
      peer.hello_bytes = 0;
      return;
    }
    close(fd);
  }
  peer.link = Link::unreachable;
}

void FaultWatchdog::finish_connect(Peer& peer, Clock::time_point now) {
  int error = 0;
  socklen_t length = sizeof error;
  uint8_t hello[kHelloBytes];
  encode_hello(hello, rank_, token_);
  if (getsockopt(peer.fd, SOL_SOCKET, SO_ERROR, &error, &length) == 0 && error == 0 &&
      send(peer.fd, hello, kHelloBytes, MSG_NOSIGNAL | MSG_DONTWAIT) == static_cast<ssize_t>(kHelloBytes)) {
    peer.link = Link::awaiting_reply;
    peer.attempt_started = now;
    return;
  }
  close_link(peer, Link::connecting);
  try_next_candidate(peer, now);
}

void FaultWatchdog::read_reply(Peer& peer, Clock::time_point now) {
  const ssize_t held = read_some(peer.fd, peer.hello, &peer.hello_bytes, kHelloBytes);
  if (held >= 0 && static_cast<size_t>(held) < kHelloBytes) return;
  if (held >= 0 && decode_hello(peer.hello, token_) == peer.rank) {
    peer.link = Link::connected;
    peer.last_heard = now;
    return;
  }
  close_link(peer, Link::awaiting_reply);
  try_next_candidate(peer, now);
}

void FaultWatchdog::read_link(Peer& peer, Clock::time_point now) {
  uint8_t bytes[256];
  for (;;) {
    const ssize_t got = recv(peer.fd, bytes, sizeof bytes, MSG_DONTWAIT);
    if (got > 0) {
      for (ssize_t i = 0; i < got; ++i) {
        if (bytes[i] == kGoodbye) {
          // It finished normally; it sends nothing after the goodbye, so closing loses nothing.
          close_link(peer, Link::finished);
          return;
        }
        if (bytes[i] != kHeartbeat) lose(peer, "its watchdog connection carried unexpected data");
      }
      peer.last_heard = now;
      continue;
    }
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    lose(peer, got == 0 ? "its watchdog connection closed without a goodbye: the process died (killed, crashed, "
                          "or exited without finishing)"
                        : std::string("its watchdog connection broke (") + std::strerror(errno) +
                              "): the process died (killed, crashed, or exited without finishing)");
  }
}

void FaultWatchdog::close_link(Peer& peer, Link state) {
  if (peer.fd >= 0) close(peer.fd);
  peer.fd = -1;
  peer.link = state;
}

void FaultWatchdog::lose(const Peer& peer, const std::string& reason) {
  end_job("lost rank " + std::to_string(peer.rank) + " (pid " + std::to_string(peer.pid) + " on " + peer.host +
              "): " + reason + "; aborting every rank (exit code " + std::to_string(kExitLostRank) + ")",
          settings_.exit_grace_seconds);
}

void FaultWatchdog::end_job(const std::string& message, double grace_seconds) {
  if (ending_.exchange(true)) {
    // Another path is already ending the process.
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  log::error(message);
  std::this_thread::sleep_for(std::chrono::duration<double>(grace_seconds));
  // MPI_Abort rather than exiting alone: it also ends ranks that cannot end themselves (a frozen
  // one, or one without a watchdog connection), under mpirun and srun alike. Should it ever stall,
  // the exit below still comes; no destructors, no MPI_Finalize, which would wait for the lost rank.
  std::thread([] {
    std::this_thread::sleep_for(std::chrono::seconds(10));
    std::_Exit(kExitLostRank);
  }).detach();
  MPI_Abort(comm_, kExitLostRank);
  std::_Exit(kExitLostRank);
}

void FaultWatchdog::check_wait(Clock::time_point now) {
  const double limit = collective_timeout_seconds_.load();
  const int64_t started = wait_started_nanoseconds_.load();
  if (limit <= 0 || started == 0) return;
  const double waited =
      seconds_between(Clock::time_point(std::chrono::duration_cast<Clock::duration>(std::chrono::nanoseconds(started))),
                      now);
  if (waited <= limit) return;
  const char* call = wait_call_.load();
  char message[320];
  std::snprintf(message, sizeof message,
                "%s has waited %.0f s for the other ranks (--collective-timeout %g): a rank is stuck or lost; "
                "aborting every rank (exit code %d)",
                call != nullptr ? call : "a collective", waited, limit, kExitLostRank);
  end_job(message, 0.0);
}

}  // namespace qlora::cluster

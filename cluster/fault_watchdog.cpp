// The fault watchdog: TCP links along a binary tree of the ranks, serviced by one thread per rank.
// Each child connects to its parent's one listening address; a 24-byte hello each way carries the
// rank and the job's 128-bit token, so a connection that reached the wrong process (a stale port,
// another job) is dropped. The listener closes once the children are linked. After the hello the
// links carry heartbeats, goodbyes and notices (cluster/watchdog_wire.h).
#include "cluster/fault_watchdog.h"

#include <arpa/inet.h>
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
#include <sstream>

#include "cluster/watchdog_address.h"
#include "common/log.h"

namespace qlora::cluster {
namespace {

using Clock = std::chrono::steady_clock;
namespace wire = watchdog_wire;

constexpr double kConnectAttemptSeconds = 3.0;
// A reply comes within milliseconds from the right process; only a wrong one stays silent.
constexpr double kReplySeconds = 10.0;
constexpr double kRetrySeconds = 0.2;  // after a refused or failed attempt, within the setup timeout
// A gap this long between two passes of our own loop means this process was not running (stopped,
// suspended): neighbours' silence over that gap says nothing about them.
constexpr double kSelfStallSeconds = 5.0;
constexpr double kReportFailureWaitSeconds = 1.0;
constexpr double kFarewellSeconds = 2.0;
// A frozen neighbour stops reading: past this many unsent bytes, heartbeats are not queued for it.
constexpr size_t kMaxQueuedBytes = 4096;

double seconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

Clock::duration to_duration(double seconds) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

bool would_block() { return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR; }

// Reads what is there into `buffer` up to `want` bytes; -1 on end-of-file or error, else bytes held.
ssize_t read_some(int fd, uint8_t* buffer, size_t* held, size_t want) {
  while (*held < want) {
    const ssize_t got = recv(fd, buffer + *held, want - *held, MSG_DONTWAIT);
    if (got > 0) {
      *held += static_cast<size_t>(got);
      continue;
    }
    if (got < 0 && would_block()) break;
    return -1;
  }
  return static_cast<ssize_t>(*held);
}

const char* kDiedReason = "the process died (killed, crashed, or exited without finishing)";

}  // namespace

std::vector<int> watchdog_tree_neighbours(int rank, int size) {
  std::vector<int> result;
  if (rank > 0) result.push_back((rank - 1) / 2);
  for (const int64_t child : {2 * int64_t{rank} + 1, 2 * int64_t{rank} + 2})
    if (child < size) result.push_back(static_cast<int>(child));
  return result;
}

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
    : FaultWatchdog(make_mpi_watchdog_group(comm), settings) {}

FaultWatchdog::FaultWatchdog(std::unique_ptr<WatchdogGroup> group, FaultWatchdogSettings settings)
    : group_(std::move(group)), settings_(settings), collective_timeout_seconds_(settings.collective_timeout_seconds) {
  rank_ = group_->rank();
  size_ = group_->size();
  neighbour_ranks_ = watchdog_tree_neighbours(rank_, size_);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (rank_ == 0) token_ = wire::random_token();
  group_->broadcast_from_root(token_.data(), token_.size());
  set_up_links();

  // Link to every neighbour before returning, so a rank that ends right away (a user error found on
  // every rank) already has links to say so over.
  const auto now = Clock::now();
  setup_deadline_ = now + to_duration(settings_.setup_timeout_seconds);
  last_heartbeat_ = now;
  last_service_ = now;
  for (auto& peer : peers_) {
    peer.last_heard = now;
    if (peer.is_parent && peer.link == Link::connecting) start_connect(peer, now);
  }
  while (!setup_complete() && Clock::now() < setup_deadline_) service(50);
  std::ostringstream missing;
  for (auto& peer : peers_) {
    if (peer.link == Link::connected || peer.link == Link::finished) continue;
    close_link(peer, Link::unreachable);
    missing << " " << peer.rank << " (" << peer.host << ")";
  }
  close_listener();
  count_connected();
  if (!missing.str().empty())
    log::warn("fault watchdog: no connection to rank(s)" + missing.str() +
              "; if a rank beyond them is lost, this rank ends only after --collective-timeout");
  thread_ = std::thread([this] { run(); });
}

void FaultWatchdog::set_up_links() {
  wire::HostRecord self{};
  gethostname(self.host, sizeof self.host - 1);
  self.identity = host_identity();
  self.pid = static_cast<uint32_t>(getpid());
  const auto interfaces = local_interfaces();
  for (const auto& interface : interfaces)
    if (self.address_count < wire::kMaxHostAddresses) self.addresses[self.address_count++] = interface.address;
  const bool all_on_one_host = group_->all_equal(self.identity);
  std::vector<wire::HostRecord> records(neighbour_ranks_.size());
  group_->exchange_with(neighbour_ranks_, &self, sizeof self, records.data());

  peers_.resize(neighbour_ranks_.size());
  std::vector<uint32_t> remote_child_addresses;
  for (size_t i = 0; i < peers_.size(); ++i) {
    Peer& peer = peers_[i];
    const wire::HostRecord& record = records[i];
    peer.rank = neighbour_ranks_[i];
    peer.host.assign(record.host, strnlen(record.host, sizeof record.host));
    peer.pid = record.pid;
    peer.is_parent = peer.rank < rank_;
    if (peer.is_parent || record.identity == self.identity) continue;
    for (uint32_t k = 0; k < std::min<uint32_t>(record.address_count, wire::kMaxHostAddresses); ++k)
      remote_child_addresses.push_back(record.addresses[k]);
  }
  wire::ListenRecord mine{0, 0};
  const bool has_children = std::any_of(peers_.begin(), peers_.end(), [](const Peer& peer) { return !peer.is_parent; });
  if (has_children) {
    const auto resolved = all_on_one_host ? std::vector<uint32_t>{} : resolve_host_addresses(self.host);
    mine.address = choose_listen_address(all_on_one_host, resolved, interfaces, remote_child_addresses);
    mine.port = open_listener(mine.address);
  }
  std::vector<wire::ListenRecord> listening(neighbour_ranks_.size());
  group_->exchange_with(neighbour_ranks_, &mine, sizeof mine, listening.data());
  for (size_t i = 0; i < peers_.size(); ++i) {
    Peer& peer = peers_[i];
    if (peer.is_parent) {
      peer.address = listening[i].address;
      peer.port = static_cast<uint16_t>(listening[i].port);
      peer.link = peer.port != 0 ? Link::connecting : Link::unreachable;
    } else {
      peer.link = listen_fd_ >= 0 ? Link::accepting : Link::unreachable;
    }
  }
}

uint16_t FaultWatchdog::open_listener(uint32_t address) {
  listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  sockaddr_in bound{};
  bound.sin_family = AF_INET;
  bound.sin_addr.s_addr = address;
  bound.sin_port = 0;
  socklen_t length = sizeof bound;
  const bool listening = listen_fd_ >= 0 && bind(listen_fd_, reinterpret_cast<sockaddr*>(&bound), sizeof bound) == 0 &&
                         listen(listen_fd_, 8) == 0 &&
                         getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &length) == 0;
  if (listening) return ntohs(bound.sin_port);
  log::warn("fault watchdog: cannot listen on " + format_ipv4(address) + " (" + std::strerror(errno) +
            "); a lost rank beyond this one ends it only after --collective-timeout");
  close_listener();
  return 0;
}

FaultWatchdog::~FaultWatchdog() {
  ending_itself_.store(true);
  stopping_.store(true);
  wake();
  if (thread_.joinable()) thread_.join();
  for (auto& peer : peers_)
    if (peer.fd >= 0) close(peer.fd);
  for (auto& pending : unidentified_) close(pending.fd);
  close_listener();
  if (wake_fd_ >= 0) close(wake_fd_);
}

void FaultWatchdog::wake() {
  const uint64_t one = 1;
  if (wake_fd_ >= 0 && write(wake_fd_, &one, sizeof one) < 0) {
    // The thread notices at its next poll timeout anyway.
  }
}

void FaultWatchdog::report_failure(const std::string& message, int exit_code) {
  assert(exit_code != 0 && "a clean exit is a goodbye, not a failure");
  ending_itself_.store(true);
  std::unique_lock<std::mutex> lock(failure_mutex_);
  if (own_failure_) return;
  own_failure_ = wire::Notice{wire::NoticeKind::failed, rank_, rank_, exit_code, message};
  wake();
  failure_sent_.wait_for(lock, to_duration(kReportFailureWaitSeconds), [this] { return own_failure_sent_; });
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
  say_farewell();
}

bool FaultWatchdog::setup_complete() const {
  for (const auto& peer : peers_)
    if (peer.link != Link::connected && peer.link != Link::finished && peer.link != Link::unreachable) return false;
  return true;
}

void FaultWatchdog::count_connected() {
  const auto connected = std::count_if(peers_.begin(), peers_.end(), [](const Peer& peer) { return peer.link == Link::connected; });
  connected_peers_.store(static_cast<int>(connected));
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
    short events = POLLIN;
    if (peer.link == Link::connecting) events = POLLOUT;
    if (peer.link == Link::connected && !peer.outgoing.empty()) events |= POLLOUT;
    fds.push_back({peer.fd, events, 0});
    owners.emplace_back(Owner::peer, i);
  }
  const int ready = poll(fds.data(), fds.size(), poll_milliseconds);
  const auto now = Clock::now();
  if (seconds_between(last_service_, now) > kSelfStallSeconds)
    for (auto& peer : peers_) peer.last_heard = now;
  last_service_ = now;

  const size_t known_unidentified = unidentified_.size();
  for (size_t i = 0; ready > 0 && i < fds.size(); ++i) {
    if (fds[i].revents == 0) continue;
    const auto [owner, index] = owners[i];
    if (owner == Owner::listener) {
      accept_connections(now);
    } else if (owner == Owner::wake) {
      uint64_t count = 0;
      if (read(wake_fd_, &count, sizeof count) < 0) {
        // Nothing to do: the wake-up only interrupts poll().
      }
    } else if (owner == Owner::unidentified) {
      if (index < known_unidentified) read_unidentified(unidentified_[index], now);
    } else {
      Peer& peer = peers_[index];
      if (peer.fd != fds[i].fd) continue;  // closed by an earlier event of this pass
      if (peer.link == Link::connecting)
        finish_connect(peer, now);
      else if (peer.link == Link::awaiting_reply)
        read_reply(peer, now);
      else if (peer.link == Link::connected && (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) != 0)
        read_link(peer, now);
    }
  }
  check_timers(now);
  send_own_failure();
  if (seconds_between(last_heartbeat_, now) >= settings_.heartbeat_interval_seconds) {
    last_heartbeat_ = now;
    for (auto& peer : peers_)
      if (peer.link == Link::connected && peer.outgoing.size() < kMaxQueuedBytes) peer.outgoing.push_back(wire::kHeartbeat);
  }
  flush_all();
  for (auto& peer : peers_)
    if (peer.link == Link::connected && seconds_between(peer.last_heard, now) > settings_.heartbeat_timeout_seconds) {
      char reason[160];
      std::snprintf(reason, sizeof reason,
                    "no heartbeat for %.0f s: its node or network is down, or the process is frozen",
                    settings_.heartbeat_timeout_seconds);
      lose(peer, reason);
    }
  if (pending_failure_ && !ending_itself_.load() && now >= pending_failure_->act_at) {
    const wire::Notice& notice = pending_failure_->notice;
    const std::string code = std::to_string(notice.exit_code);
    end_job("rank " + std::to_string(notice.subject) + " failed (exit code " + code + "): " + notice.text +
                "; aborting every rank (exit code " + code + ")",
            notice.exit_code, 0.0);
  }
  count_connected();
  check_wait(now);
}

void FaultWatchdog::check_timers(Clock::time_point now) {
  // Drop hellos that never came (and the sockets whose hello was handled this pass).
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
    const double waited = seconds_between(peer.attempt_started, now);
    const bool retry = (peer.link == Link::connecting && peer.fd < 0 && waited > kRetrySeconds) ||
                       (peer.link == Link::connecting && peer.fd >= 0 && waited > kConnectAttemptSeconds) ||
                       (peer.link == Link::awaiting_reply && waited > kReplySeconds);
    if (!retry) continue;
    close_link(peer, Link::connecting);
    if (now < setup_deadline_) start_connect(peer, now);
  }
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
  const ssize_t held = read_some(pending.fd, pending.hello.data(), &pending.hello_bytes, wire::kHelloBytes);
  if (held >= 0 && static_cast<size_t>(held) < wire::kHelloBytes) return;
  const int rank = held < 0 ? -1 : wire::decode_hello(pending.hello.data(), token_);
  const auto child = std::find_if(peers_.begin(), peers_.end(), [&](const Peer& peer) {
    return peer.rank == rank && !peer.is_parent && peer.link == Link::accepting;
  });
  const wire::Hello reply = wire::encode_hello(rank_, token_);
  if (child != peers_.end() &&
      send(pending.fd, reply.data(), reply.size(), MSG_NOSIGNAL | MSG_DONTWAIT) == static_cast<ssize_t>(reply.size())) {
    child->fd = pending.fd;
    child->link = Link::connected;
    child->last_heard = now;
  } else {
    close(pending.fd);
  }
  pending.fd = -1;  // handed over or closed; erased after this pass
}

void FaultWatchdog::start_connect(Peer& peer, Clock::time_point now) {
  peer.link = Link::connecting;
  peer.attempt_started = now;
  peer.hello_bytes = 0;
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return;  // retried after kRetrySeconds
  set_nodelay(fd);
  sockaddr_in target{};
  target.sin_family = AF_INET;
  target.sin_addr.s_addr = peer.address;
  target.sin_port = htons(peer.port);
  if (connect(fd, reinterpret_cast<sockaddr*>(&target), sizeof target) == 0 || errno == EINPROGRESS) {
    peer.fd = fd;
    return;
  }
  close(fd);
}

void FaultWatchdog::finish_connect(Peer& peer, Clock::time_point now) {
  int error = 0;
  socklen_t length = sizeof error;
  const wire::Hello hello = wire::encode_hello(rank_, token_);
  if (getsockopt(peer.fd, SOL_SOCKET, SO_ERROR, &error, &length) == 0 && error == 0 &&
      send(peer.fd, hello.data(), hello.size(), MSG_NOSIGNAL | MSG_DONTWAIT) == static_cast<ssize_t>(hello.size())) {
    peer.link = Link::awaiting_reply;
    peer.attempt_started = now;
    return;
  }
  close_link(peer, Link::connecting);  // retried after kRetrySeconds
  peer.attempt_started = now;
}

void FaultWatchdog::read_reply(Peer& peer, Clock::time_point now) {
  const ssize_t held = read_some(peer.fd, peer.hello.data(), &peer.hello_bytes, wire::kHelloBytes);
  if (held >= 0 && static_cast<size_t>(held) < wire::kHelloBytes) return;
  if (held >= 0 && wire::decode_hello(peer.hello.data(), token_) == peer.rank) {
    peer.link = Link::connected;
    peer.last_heard = now;
    return;
  }
  close_link(peer, Link::connecting);  // retried after kRetrySeconds
  peer.attempt_started = now;
}

void FaultWatchdog::read_link(Peer& peer, Clock::time_point now) {
  uint8_t bytes[512];
  for (;;) {
    const ssize_t got = recv(peer.fd, bytes, sizeof bytes, MSG_DONTWAIT);
    if (got > 0) {
      peer.reader.append(bytes, static_cast<size_t>(got));
      peer.last_heard = now;
      continue;
    }
    const int error = errno;
    if (got < 0 && would_block()) break;
    // What came before the end still counts (a goodbye or a notice, then the close).
    if (!take_items(peer, now)) return;
    if (peer.reported_failure) {
      close_link(peer, Link::finished);
      return;
    }
    lose(peer, got == 0 ? std::string("its watchdog connection closed without a goodbye: ") + kDiedReason
                        : std::string("its watchdog connection broke (") + std::strerror(error) + "): " + kDiedReason);
    return;
  }
  take_items(peer, now);
}

// Acts on what the stream holds; false when that ended the link.
bool FaultWatchdog::take_items(Peer& peer, Clock::time_point now) {
  wire::Notice notice;
  for (;;) {
    switch (peer.reader.next(&notice)) {
      case wire::StreamReader::Item::none:
        return true;
      case wire::StreamReader::Item::heartbeat:
        break;
      case wire::StreamReader::Item::goodbye:
        // It finished normally; it sends nothing after the goodbye, so closing loses nothing.
        close_link(peer, Link::finished);
        return false;
      case wire::StreamReader::Item::notice:
        if (notice.subject < 0 || notice.subject >= size_ || notice.exit_code < 1 || notice.exit_code > 255) {
          lose(peer, "its watchdog connection carried a malformed notice");
          return false;
        }
        if (notice.kind == wire::NoticeKind::failed && notice.subject == peer.rank) peer.reported_failure = true;
        on_notice(peer, notice, now);
        if (peer.link != Link::connected) return false;
        break;
      case wire::StreamReader::Item::malformed:
        lose(peer, "its watchdog connection carried unexpected data");
        return false;
    }
  }
}

void FaultWatchdog::on_notice(const Peer& from, const wire::Notice& notice, Clock::time_point now) {
  if (!notice_forwarded_) {
    notice_forwarded_ = true;
    queue_to_links(wire::encode_notice(notice), &from);
    flush_all();
  }
  if (ending_itself_.load()) return;
  if (notice.kind == wire::NoticeKind::lost)
    end_job(notice.text + " (seen by rank " + std::to_string(notice.reporter) + "); aborting every rank (exit code " +
                std::to_string(notice.exit_code) + ")",
            notice.exit_code, settings_.exit_grace_seconds);
  if (!pending_failure_) pending_failure_ = PendingFailure{notice, now + to_duration(settings_.failure_grace_seconds)};
}

void FaultWatchdog::send_own_failure() {
  std::lock_guard<std::mutex> lock(failure_mutex_);
  if (!own_failure_ || own_failure_sent_) return;
  notice_forwarded_ = true;
  queue_to_links(wire::encode_notice(*own_failure_), nullptr);
  flush_all();
  own_failure_sent_ = true;
  failure_sent_.notify_all();
}

void FaultWatchdog::queue_to_links(const std::string& bytes, const Peer* except) {
  for (auto& peer : peers_)
    if (peer.link == Link::connected && &peer != except) peer.outgoing += bytes;
}

bool FaultWatchdog::flush(Peer& peer) {
  while (!peer.outgoing.empty()) {
    const ssize_t sent = send(peer.fd, peer.outgoing.data(), peer.outgoing.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent > 0) {
      peer.outgoing.erase(0, static_cast<size_t>(sent));
      continue;
    }
    return sent < 0 && would_block();
  }
  return true;
}

void FaultWatchdog::flush_all() {
  for (auto& peer : peers_) {
    if (peer.link != Link::connected || flush(peer)) continue;
    lose(peer, std::string("its watchdog connection broke (") + std::strerror(errno) + "): " + kDiedReason);
  }
}

void FaultWatchdog::say_farewell() {
  send_own_failure();  // reported just before the destructor: still goes first
  bool failed = false;
  {
    std::lock_guard<std::mutex> lock(failure_mutex_);
    failed = own_failure_.has_value();
  }
  if (!failed) queue_to_links(std::string(1, static_cast<char>(wire::kGoodbye)), nullptr);
  // Then wait for each neighbour to close its end: closing ours while its bytes are unread would
  // reset the connection, and a reset may discard what we sent. After a failure, a neighbour that is
  // still working acts on it within failure_grace_seconds (it aborts the job and its end closes);
  // this rank stays until then, so that no launcher ends the job on this rank's exit code before
  // the others have printed why. Neighbours failing too (their own notice came) are shut down at once.
  const double limit = failed ? settings_.failure_grace_seconds + kFarewellSeconds : kFarewellSeconds;
  const auto deadline = Clock::now() + to_duration(limit);
  while (Clock::now() < deadline) {
    std::vector<pollfd> fds;
    std::vector<Peer*> open;
    for (auto& peer : peers_) {
      if (peer.link != Link::connected) continue;
      const bool ending_too = !failed || peer.reported_failure;
      if (ending_too && peer.outgoing.empty() && !peer.write_closed) {
        shutdown(peer.fd, SHUT_WR);
        peer.write_closed = true;
      }
      fds.push_back({peer.fd, static_cast<short>(POLLIN | (peer.outgoing.empty() ? 0 : POLLOUT)), 0});
      open.push_back(&peer);
    }
    if (open.empty()) return;
    if (poll(fds.data(), fds.size(), 100) < 0 && errno != EINTR) return;
    for (size_t i = 0; i < open.size(); ++i) {
      if (!flush(*open[i]))
        close_link(*open[i], Link::finished);
      else if ((fds[i].revents & (POLLIN | POLLHUP | POLLERR)) != 0)
        read_during_farewell(*open[i]);
    }
  }
}

// Only whether the neighbour is ending too matters now: its own failure notice, a goodbye, or its close.
void FaultWatchdog::read_during_farewell(Peer& peer) {
  uint8_t bytes[512];
  for (;;) {
    const ssize_t got = recv(peer.fd, bytes, sizeof bytes, MSG_DONTWAIT);
    if (got > 0) {
      peer.reader.append(bytes, static_cast<size_t>(got));
      continue;
    }
    if (got < 0 && would_block()) break;
    close_link(peer, Link::finished);
    return;
  }
  wire::Notice notice;
  for (auto item = peer.reader.next(&notice); item != wire::StreamReader::Item::none; item = peer.reader.next(&notice)) {
    if (item == wire::StreamReader::Item::goodbye || item == wire::StreamReader::Item::malformed) {
      close_link(peer, Link::finished);
      return;
    }
    if (item == wire::StreamReader::Item::notice && notice.kind == wire::NoticeKind::failed && notice.subject == peer.rank)
      peer.reported_failure = true;
  }
}

void FaultWatchdog::close_link(Peer& peer, Link state) {
  if (peer.fd >= 0) close(peer.fd);
  peer.fd = -1;
  peer.link = state;
  peer.outgoing.clear();
}

void FaultWatchdog::close_listener() {
  if (listen_fd_ >= 0) close(listen_fd_);
  listen_fd_ = -1;
}

void FaultWatchdog::lose(Peer& peer, const std::string& reason) {
  const std::string text = "lost rank " + std::to_string(peer.rank) + " (pid " + std::to_string(peer.pid) + " on " +
                           peer.host + "): " + reason;
  close_link(peer, Link::finished);
  // On its way out, this rank blocks nobody; and once a failure is known, the neighbours are ending
  // the job too (their abort closes their links), so a close is no news.
  if (ending_itself_.load() || pending_failure_) return;
  notice_forwarded_ = true;
  queue_to_links(wire::encode_notice({wire::NoticeKind::lost, peer.rank, rank_, kExitLostRank, text}), nullptr);
  end_job(text + "; aborting every rank (exit code " + std::to_string(kExitLostRank) + ")", kExitLostRank,
          settings_.exit_grace_seconds);
}

void FaultWatchdog::end_job(const std::string& message, int exit_code, double grace_seconds) {
  if (ending_.exchange(true)) {
    // Another path is already ending the process.
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  log::error(message);
  // The grace also lets the notices queued for the neighbours go out (at least one try without it).
  for (auto& peer : peers_)
    if (peer.link == Link::connected) flush(peer);
  const auto deadline = Clock::now() + to_duration(grace_seconds);
  for (auto now = Clock::now(); now < deadline; now = Clock::now()) {
    std::vector<pollfd> fds;
    for (auto& peer : peers_)
      if (peer.link == Link::connected && !peer.outgoing.empty()) fds.push_back({peer.fd, POLLOUT, 0});
    if (fds.empty()) {
      std::this_thread::sleep_until(deadline);
      break;
    }
    poll(fds.data(), fds.size(), 50);
    for (auto& peer : peers_)
      if (peer.link == Link::connected && !flush(peer)) peer.outgoing.clear();
  }
  group_->end_job(exit_code);
  std::abort();  // unreachable: the group's end_job does not return (GCC does not see it through virtual calls)
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
  char reason[256];
  std::snprintf(reason, sizeof reason,
                "%s has waited %.0f s for the other ranks (--collective-timeout %g): a rank is stuck or lost",
                call != nullptr ? call : "a collective", waited, limit);
  // The neighbours learn why this rank aborts, so its links closing is not taken for a loss.
  notice_forwarded_ = true;
  queue_to_links(wire::encode_notice({wire::NoticeKind::failed, rank_, rank_, kExitLostRank, reason}), nullptr);
  const std::string message = std::string(reason) + "; aborting every rank (exit code " + std::to_string(kExitLostRank) + ")";
  end_job(message, kExitLostRank, 0.0);
}

}  // namespace qlora::cluster

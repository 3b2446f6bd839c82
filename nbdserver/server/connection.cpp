#include "server/connection.hpp"

#include <algorithm>

namespace server {

void SendQueue::prepare(msghdr* msg) {
  size_t n = 0;
  size_t skip = front_sent_;
  auto add = [&](const void* p, size_t len) {
    if (len <= skip) {
      skip -= len;
      return;
    }
    if (n == iov_.size()) iov_.resize(std::min(kMaxIov, std::max<size_t>(16, 2 * n)));
    iov_[n].iov_base = const_cast<uint8_t*>(static_cast<const uint8_t*>(p) + skip);
    iov_[n].iov_len = len - skip;
    skip = 0;
    ++n;
  };
  for (const OutMsg& m : q_) {
    if (n + 2 + std::max<size_t>(1, m.parts.size()) > kMaxIov) break;
    if (m.hlen) add(m.head, m.hlen);
    if (!m.extra.empty()) add(m.extra.data(), m.extra.size());
    if (!m.parts.empty()) {
      for (const iovec& v : m.parts) add(v.iov_base, v.iov_len);
    } else if (m.dlen) {
      add(m.payload(), m.dlen);
    }
  }
  *msg = {};
  msg->msg_iov = iov_.data();
  msg->msg_iovlen = n;
}

void SendQueue::consume(size_t n) {
  bytes_ -= n;
  n += front_sent_;
  while (!q_.empty() && n >= q_.front().size()) {
    n -= q_.front().size();
    if (q_.front().from_mappings()) mapped_bytes_ -= q_.front().dlen;
    q_.pop_front();
  }
  front_sent_ = n;
}

}  // namespace server

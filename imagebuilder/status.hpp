// Errors as values for imagebuilder: every fallible step returns a Status
// (an empty message means success) or a Result<T>. Messages name the path
// and the cause, and are shown to the admin as they are.
#pragma once

#include <string>
#include <utility>
#include <variant>

namespace ib {

class Status {
 public:
  Status() = default;
  static Status fail(std::string msg) { return Status(std::move(msg)); }
  bool ok() const { return msg_.empty(); }
  explicit operator bool() const { return ok(); }
  const std::string& message() const { return msg_; }
  // Prefixes the message with context ("while building lab: ...").
  Status context(const std::string& what) const {
    return ok() ? *this : Status(what + ": " + msg_);
  }

 private:
  explicit Status(std::string msg) : msg_(msg.empty() ? "unknown error" : std::move(msg)) {}
  std::string msg_;
};

// A value or the Status that explains why there is none.
template <typename T>
class Result {
 public:
  Result(T v) : v_(std::move(v)) {}
  Result(Status s) : v_(std::move(s)) {}
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() { return std::get<0>(v_); }
  const T& value() const { return std::get<0>(v_); }
  T& operator*() { return value(); }
  T* operator->() { return &value(); }
  Status status() const { return ok() ? Status() : std::get<1>(v_); }

 private:
  std::variant<T, Status> v_;
};

// "<what>: <strerror(err)>"
std::string errno_message(const std::string& what, int err);
// libext2fs error text for an errcode_t.
std::string ext2_message(const std::string& what, long code);

}  // namespace ib

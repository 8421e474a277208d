// Status helpers shared by every layer above kernels/.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVR_CONCAT_INNER_(a, b) a##b
#define KVR_CONCAT_(a, b) KVR_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define KVR_RETURN_IF_ERROR(expr)              \
  do {                                         \
    ::absl::Status kvr_status_ = (expr);       \
    if (!kvr_status_.ok()) return kvr_status_; \
  } while (0)

// `lhs = value of statusor_expr`, or return its error.
#define KVR_ASSIGN_OR_RETURN(lhs, expr) \
  KVR_ASSIGN_OR_RETURN_IMPL_(KVR_CONCAT_(kvr_statusor_, __LINE__), lhs, expr)
#define KVR_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return tmp.status();              \
  lhs = std::move(tmp).value()

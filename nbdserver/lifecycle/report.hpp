// Verification reports (issue 12; schema in docs/verification.md):
// one JSON per run, POSTed by the verification initrd to
// /nodes/<node>/report, validated here, then stored atomically:
//
//   nodes/<node>/reports/<run>.json        the report as stored (normalised:
//                                          overall status computed, logs moved out)
//   nodes/<node>/reports/<run>/<name>.log  raw logs that came in the report's "logs"
//   nodes/<node>/reports/latest            the newest run's id (replaced by rename)
//
// A step's status is one of passed, failed, degraded, timedout, skipped.
// The overall status is the worst step's, in the order
// skipped < passed < degraded < timedout < failed (a report whose steps
// were all skipped tested nothing: it is "skipped", and that is not a pass).
#pragma once

#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace lifecycle {

constexpr size_t kReportMaxBytes = 8u << 20;  // whole body, logs included

struct Report {
  nlohmann::json doc;   // normalised: "status" set, "logs" removed, "log_files" names them
  nlohmann::json logs;  // object name -> text, as sent (names checked)
  std::string node, run, status;
  std::string summary;  // one line for people: "passed: memtester 412 MiB (83 % of RAM), ..."
};

// Checks a report for `node` (the URL's). Bad JSON, wrong types, unknown
// statuses, a node or run that does not match, a claimed overall status that
// is not the worst step's, bad log names: false, *err says what and where
// ("steps[1].status: expected one of passed, failed, ...").
bool validate_report(const std::string& body, const std::string& node, Report* out,
                     std::string* err);

// The one-line summary of a (normalised) report. A report that did not
// pass starts with its steps that did not pass, worst first ("memtester
// failed (exit 2), ..."), which is what Lifecycle::on_report keeps as the
// failed node's reason; then memtester's coverage, CPUs and RAM.
std::string report_summary(const nlohmann::json& doc);

// Stores a validated report under the node (the node's directory must
// exist). Atomic: a crash leaves the old latest or the new one, whole.
bool store_report(const std::string& store_root, const Report& r, std::string* err);

// The latest stored report of a node, nullopt when it has none.
std::optional<nlohmann::json> latest_report(const std::string& store_root,
                                            const std::string& node, std::string* err);

}  // namespace lifecycle

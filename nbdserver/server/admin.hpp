// `nbdserver admin ...`: list, create, reset and delete nodes in a store,
// and show a node's changed blocks. See kAdminUsage in admin.cpp.
#pragma once

namespace server {

// argv[0] is "admin". Returns the process exit status.
int run_admin(int argc, const char* const* argv);

}  // namespace server

#include "plan_cache.h"

#include <cudnn.h>
#include <cudnn_frontend_version.h>

#include <atomic>
#include <exception>
#include <mutex>
#include <sstream>

#include "plan_store.h"

namespace cudnn_flex {
namespace {

// Plans are ~100 KB; a bound of 1 GiB keeps thousands of them.
constexpr uint64_t kStoreBytes = 1ull << 30;

std::mutex salt_mutex;
std::string salt;  // guarded by salt_mutex
std::atomic<int64_t> loads{0}, stores{0}, rejected{0};

PlanStore* store() {
  // Leaked on purpose, like the graph cache: used until the process exits.
  static PlanStore* instance = [] {
    auto directory = PlanStore::directory_from_environment();
    return directory ? new PlanStore(*directory, kStoreBytes) : nullptr;
  }();
  return instance;
}

std::string current_salt() {
  std::lock_guard<std::mutex> lock(salt_mutex);
  return salt;
}

}  // namespace

void set_plan_salt(const std::string& value) {
  std::lock_guard<std::mutex> lock(salt_mutex);
  salt = value;
}

std::optional<std::string> plan_store_directory() {
  PlanStore* s = store();
  return s ? std::optional<std::string>(s->directory()) : std::nullopt;
}

PlanStoreStats plan_store_stats() { return PlanStoreStats{loads.load(), stores.load(), rejected.load()}; }

void reset_plan_store_stats() {
  loads = 0;
  stores = 0;
  rejected = 0;
}

std::string plan_key(const GraphKey& key, const std::string& device_name, int64_t sm) {
  std::ostringstream s;
  s << "cudnn_flex plan 1|lowering " << current_salt() << "|cudnn " << cudnnGetVersion() << "|frontend "
    << CUDNN_FRONTEND_VERSION << "|gpu " << device_name << " sm " << sm << "|graph";
  for (int64_t word : key.words()) s << ' ' << word;
  return s.str();
}

std::shared_ptr<const BuiltGraph> load_or_build(const SdpaProblem& p, const std::string& device_name, int64_t sm,
                                                cudnnHandle_t handle,
                                                const std::function<std::shared_ptr<const BuiltGraph>()>& build) {
  PlanStore* s = store();
  if (s == nullptr || current_salt().empty()) return build();
  const std::string key = plan_key(p.key(), device_name, sm);
  if (auto blob = s->load(key)) {
    try {
      auto loaded = load_plans(*blob, handle);
      ++loads;
      return loaded;
    } catch (const std::exception&) {
      ++rejected;  // e.g. written by a process whose cuDNN saw the GPU differently: rebuilt below
    }
  }
  auto built = build();
  try {
    if (s->store(key, serialize_plans(*built))) ++stores;
  } catch (const std::exception&) {
    // A plan that cannot be serialised is still a good plan for this process.
  }
  return built;
}

}  // namespace cudnn_flex

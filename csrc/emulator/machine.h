// The emulated SIMT machine: blocks of fibers, their scheduler, barriers, warp
// rendezvous, faults, and the worker threads that run a grid's blocks.
//
// A block runs on one worker thread; its threads are fibers that switch only where the
// CUDA model lets threads wait for each other (a barrier, a warp collective,
// griddepcontrol.wait), so the scheduler decides every interleaving the kernel can see
// through shared memory at those points. Anything the emulator detects (a deadlock, a
// mask mismatch, a bad shared-memory address, ...) is a fault: the first one is kept
// with the kernel, block, warp, lane and source line, the grid is abandoned (its fibers
// are never resumed; nothing is unwound), and the launch reports it at the next
// synchronization.
//
// Static __shared__ variables are thread_local (see device.h): one OS thread runs one
// block at a time, so each block has its own copy. The emulator finds the whole
// thread-local block of its own library (dlinfo RTLD_DI_TLS_DATA + the PT_TLS size) on
// each worker thread, which never runs torch code, and poisons it at every block start.
// For the same reason the emulator itself keeps no thread_local state.
#pragma once

#include "emulator/fiber.h"
#include "emulator/types.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace std_ext::emu {

// ---------------------------------------------------------------- configuration

constexpr size_t kMaxDynamicSmem = 227 * 1024;  // the H100's per-block opt-in maximum
constexpr size_t kSmemCanary = 256;             // bytes after the block's dynamic smem, checked at its end
constexpr uint32_t kDynamicWindow = 0x400;      // shared "addresses" of dynamic smem start here
constexpr uint32_t kStaticWindow = 0x1000000;   // ... and of static __shared__ variables here

struct Site {
  const char* file = nullptr;
  int line = 0;
};

inline bool same_site(Site a, Site b) {
  return a.line == b.line && (a.file == b.file || (a.file && b.file && std::strcmp(a.file, b.file) == 0));
}

inline std::string site_text(Site s) {
  if (s.file == nullptr) return "?";
  if (s.line == 0) return s.file;
  const char* slash = std::strrchr(s.file, '/');
  return std::string(slash ? slash + 1 : s.file) + ":" + std::to_string(s.line);
}

enum class ScheduleKind { kForward, kReverse, kRandom, kWarp };

struct Schedule {
  ScheduleKind kind = ScheduleKind::kForward;
  uint64_t seed = 0;
};

// STD_EXT_EMULATOR_SCHEDULE = forward (default) | reverse | random:<seed> | warp. Read at
// every launch so that one process can run a test under several schedules.
inline bool schedule_from_env(Schedule* out, std::string* error) {
  const char* v = std::getenv("STD_EXT_EMULATOR_SCHEDULE");
  const std::string value = v ? v : "";
  if (value.empty() || value == "forward") {
    out->kind = ScheduleKind::kForward;
  } else if (value == "reverse") {
    out->kind = ScheduleKind::kReverse;
  } else if (value == "warp") {
    out->kind = ScheduleKind::kWarp;
  } else if (value.rfind("random:", 0) == 0 && value.size() > 7 &&
             value.find_first_not_of("0123456789", 7) == std::string::npos) {
    out->kind = ScheduleKind::kRandom;
    out->seed = std::strtoull(value.c_str() + 7, nullptr, 10);
  } else {
    *error = "STD_EXT_EMULATOR_SCHEDULE must be forward, reverse, random:<seed> or warp, got '" + value + "'";
    return false;
  }
  return true;
}

// STD_EXT_EMULATOR_ARCH = 90 (default) or 80: which __CUDA_ARCH__ path the kernels take
// (griddepcontrol, the dependent launch) and the ptxVersion cudaFuncGetAttributes reports.
// Read once: the kernels cache what they learn from it.
inline int arch() {
  static const int value = [] {
    const char* v = std::getenv("STD_EXT_EMULATOR_ARCH");
    if (v == nullptr || *v == '\0' || std::strcmp(v, "90") == 0) return 90;
    if (std::strcmp(v, "80") == 0) return 80;
    std::fprintf(stderr, "std_ext emulator: STD_EXT_EMULATOR_ARCH must be 80 or 90, got '%s'; using 90\n", v);
    return 90;
  }();
  return value;
}

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// "0-4,6,8-31"
inline std::string lanes_text(uint32_t mask) {
  std::string out;
  for (int i = 0; i < 32;) {
    if (!(mask >> i & 1u)) {
      ++i;
      continue;
    }
    int j = i;
    while (j + 1 < 32 && (mask >> (j + 1) & 1u)) ++j;
    if (!out.empty()) out += ",";
    out += std::to_string(i);
    if (j > i) out += "-" + std::to_string(j);
    i = j + 1;
  }
  return out.empty() ? "none" : out;
}

inline std::string hex_mask(uint32_t mask) {
  char buffer[16];
  std::snprintf(buffer, sizeof buffer, "0x%08x", mask);
  return buffer;
}

// ---------------------------------------------------------------- state

enum class WaitKind : uint8_t { kNone, kBarrier, kCollective, kDependency, kConverge };

struct PendingCopy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes;
  int src_bytes;
  int64_t group;  // -1 until cp.async.commit_group
};

struct Block;

struct Fiber {
  void* sp = nullptr;
  char* slot = nullptr;
  Block* block = nullptr;
  uint3 tid{};
  int linear = 0, warp = 0, lane = 0;
  bool runnable = false, done = false;
  WaitKind wait = WaitKind::kNone;
  Site site{};
  const char* what = nullptr;  // the operation it waits at
  std::vector<PendingCopy> copies;
  int64_t committed = 0;
  uint32_t active_mask = 0;  // __activemask's answer
};

using Completion = void (*)(void* const* io, uint32_t mask);

struct Collective {
  const char* name;
  uint32_t mask;
  Site site;
  uint32_t arrived;
  Completion complete;
};

struct WarpState {
  uint32_t exists = 0;  // lanes the block has (a partial last warp has fewer)
  uint32_t live = 0;    // lanes that have not exited
  std::vector<Collective> pending;
  void* io[32] = {};
  // __activemask call sites with the lanes waiting there (see converge()).
  std::vector<std::pair<Site, uint32_t>> converging;
};

struct Grid {
  std::string name;
  dim3 grid, block;
  size_t smem = 0;
  std::function<void()> body;  // runs the kernel with this launch's arguments
  bool dependent = false;      // launched with programmatic stream serialization (arch 90)
  std::atomic<bool> primary_done{true};
  Schedule schedule;
  // Seeds the random schedule with the kernel's name (not the launch count), so that a
  // test run alone reproduces the interleavings it had inside the whole suite.
  uint64_t salt = 0;
  uint64_t order_multiplier = 1, order_offset = 0;
  std::atomic<int64_t> next_block{0};
  std::mutex fault_mutex;
  std::string fault;
  std::atomic<bool> failed{false};

  int64_t num_blocks() const { return int64_t{grid.x} * grid.y * grid.z; }

  // The i-th block to run: ascending (forward, warp), descending (reverse), or an affine
  // permutation i -> (a i + c) mod n (random), which needs no table for large grids.
  int64_t block_at(int64_t i) const {
    const int64_t n = num_blocks();
    switch (schedule.kind) {
      case ScheduleKind::kReverse:
        return n - 1 - i;
      case ScheduleKind::kRandom:
        return static_cast<int64_t>((static_cast<unsigned __int128>(order_multiplier) * static_cast<uint64_t>(i) +
                                     order_offset) %
                                    static_cast<uint64_t>(n));
      default:
        return i;
    }
  }

  void report(const std::string& message) {
    std::lock_guard<std::mutex> lock(fault_mutex);
    if (fault.empty()) fault = message;
    failed.store(true);
  }
};

struct Block {
  Grid* grid = nullptr;
  uint3 idx{};
  int threads = 0;
  std::vector<Fiber*> fibers;
  std::vector<WarpState> warps;
  unsigned char* smem = nullptr;  // dynamic shared memory (grid->smem bytes + the canary)
  unsigned char* static_smem = nullptr;  // the worker's thread-local block
  size_t static_size = 0;
  int live = 0;
  int barrier_waiting = 0;
  Site barrier_site{};
  int runnable = 0;
  int cursor = 0;
  uint64_t rng = 0;
  void* scheduler_sp = nullptr;
  bool faulted = false;
  std::vector<unsigned char> static_image;  // a parked block's static shared memory
};

// ---------------------------------------------------------------- the running fiber

inline Fiber* self() { return static_cast<Fiber*>(current_slot_owner()); }

inline Fiber* pick(Block& b);
inline void settle_converging(Block& b, int warp);

// Switches straight to the next fiber the schedule picks (half the switches of a round
// trip through the scheduler); to the scheduler when none can run or the grid failed.
inline void yield(Fiber* f) {
  Block& b = *f->block;
  if (!b.warps[f->warp].converging.empty()) settle_converging(b, f->warp);
  Fiber* next = b.grid->failed.load(std::memory_order_relaxed) ? nullptr : pick(b);
  if (next == nullptr) {
    std_ext_emu_switch(&f->sp, b.scheduler_sp);
    return;
  }
  next->runnable = false;
  --b.runnable;
  if (next != f) std_ext_emu_switch(&f->sp, next->sp);
}

inline void make_runnable(Block& b, Fiber* f) {
  f->wait = WaitKind::kNone;
  if (!f->runnable) {
    f->runnable = true;
    ++b.runnable;
  }
}

inline std::string where(const Block& b, const Fiber* f) {
  std::string s = "kernel " + b.grid->name + ", block (" + std::to_string(b.idx.x) + "," + std::to_string(b.idx.y) +
                  "," + std::to_string(b.idx.z) + ")";
  if (f != nullptr) {
    s += ", thread (" + std::to_string(f->tid.x) + "," + std::to_string(f->tid.y) + "," + std::to_string(f->tid.z) +
         ") = warp " + std::to_string(f->warp) + " lane " + std::to_string(f->lane);
  }
  return s;
}

// Records the calling thread's fault and never returns: the scheduler abandons the block.
[[noreturn]] inline void fault(const std::string& what, Site site) {
  Fiber* f = self();
  Block& b = *f->block;
  b.grid->report("std_ext emulator: " + what + " at " + site_text(site) + " [" + where(b, f) + "]");
  b.faulted = true;
  for (;;) yield(f);
}

// ---------------------------------------------------------------- shared memory

inline unsigned char* shared_pointer(uint32_t address, size_t bytes, const char* what, Site site) {
  const Block& b = *self()->block;
  if (address >= kDynamicWindow && address - kDynamicWindow + bytes <= b.grid->smem) {
    return b.smem + (address - kDynamicWindow);
  }
  if (address >= kStaticWindow && address - kStaticWindow + bytes <= b.static_size) {
    return b.static_smem + (address - kStaticWindow);
  }
  fault(std::string(what) + ": shared address " + hex_mask(address) + " (+" + std::to_string(bytes) +
            " bytes) is outside the block's shared memory (" + std::to_string(b.grid->smem) + " dynamic bytes)",
        site);
}

inline uint32_t shared_address(const void* p, Site site) {
  const Block& b = *self()->block;
  const auto* c = static_cast<const unsigned char*>(p);
  if (c >= b.smem && c <= b.smem + b.grid->smem) return kDynamicWindow + static_cast<uint32_t>(c - b.smem);
  if (c >= b.static_smem && c < b.static_smem + b.static_size) {
    return kStaticWindow + static_cast<uint32_t>(c - b.static_smem);
  }
  fault("__cvta_generic_to_shared of a pointer that is not into the block's shared memory", site);
}

// ---------------------------------------------------------------- barriers and rendezvous

inline void block_barrier(Site site) {
  Fiber* f = self();
  Block& b = *f->block;
  if (b.barrier_waiting == 0) {
    b.barrier_site = site;
  } else if (!same_site(b.barrier_site, site)) {
    fault("__syncthreads while " + std::to_string(b.barrier_waiting) + " threads wait at the __syncthreads at " +
              site_text(b.barrier_site) + " (a barrier in divergent code)",
          site);
  }
  f->wait = WaitKind::kBarrier;
  f->site = site;
  f->what = "__syncthreads";
  if (++b.barrier_waiting == b.live) {
    b.barrier_waiting = 0;
    for (Fiber* g : b.fibers) {
      if (g->wait == WaitKind::kBarrier) make_runnable(b, g);
    }
    // The last to arrive (now runnable too) queues up like the others: the schedule
    // orders who goes first.
  }
  yield(f);
}

// A rendezvous of exactly the lanes in `mask` at one call site of one operation. Each lane
// leaves a pointer to its operands / results; the last to arrive runs `complete` for all.
inline void rendezvous(const char* name, uint32_t mask, Site site, void* io, Completion complete) {
  Fiber* f = self();
  Block& b = *f->block;
  WarpState& w = b.warps[f->warp];
  const uint32_t bit = 1u << f->lane;
  if (!(mask & bit)) fault(std::string(name) + " with mask " + hex_mask(mask) + " that excludes the calling lane", site);
  if (mask & ~w.exists) {
    fault(std::string(name) + " with mask " + hex_mask(mask) + " naming lanes " + lanes_text(mask & ~w.exists) +
              " that this block does not have",
          site);
  }
  if (mask & ~w.live) {
    fault(std::string(name) + " with mask " + hex_mask(mask) + " waits for lanes " + lanes_text(mask & ~w.live) +
              " that have exited",
          site);
  }
  Collective* c = nullptr;
  for (Collective& p : w.pending) {
    if (p.mask & mask) c = &p;
  }
  if (c == nullptr) {
    w.pending.push_back(Collective{name, mask, site, 0, complete});
    c = &w.pending.back();
  } else if (c->mask != mask) {
    fault(std::string(name) + " with mask " + hex_mask(mask) + " while lanes " + lanes_text(c->arrived) + " wait at " +
              c->name + " (" + site_text(c->site) + ") with mask " + hex_mask(c->mask),
          site);
  } else if ((c->name != name && std::strcmp(c->name, name) != 0) || !same_site(c->site, site)) {
    fault(std::string(name) + " while lanes " + lanes_text(c->arrived) + " of its mask wait at " + c->name + " (" +
              site_text(c->site) + "): the lanes diverged between collectives",
          site);
  }
  c->arrived |= bit;
  w.io[f->lane] = io;
  if (c->arrived == mask) {
    const Completion done = c->complete;
    w.pending.erase(w.pending.begin() + (c - w.pending.data()));
    done(w.io, mask);
    for (int lane = 0; lane < 32; ++lane) {
      if ((mask >> lane & 1u) && lane != f->lane) make_runnable(b, b.fibers[f->warp * 32 + lane]);
    }
    return;
  }
  f->wait = WaitKind::kCollective;
  f->site = site;
  f->what = name;
  yield(f);
}

// __activemask: the lanes of the warp converged at this call. A lane waits at the call
// site until every other live lane of its warp is either there too or blocked elsewhere
// (a barrier, a collective, another site, exited); the answer is the lanes at the site.
// Lanes that left a loop early and wait at a later barrier are not converged with the
// ones still in it, as on the hardware.
inline uint32_t converge(Site site) {
  Fiber* f = self();
  Block& b = *f->block;
  WarpState& w = b.warps[f->warp];
  std::pair<Site, uint32_t>* group = nullptr;
  for (auto& g : w.converging) {
    if (same_site(g.first, site)) group = &g;
  }
  if (group == nullptr) {
    w.converging.emplace_back(site, 0u);
    group = &w.converging.back();
  }
  group->second |= 1u << f->lane;
  f->wait = WaitKind::kConverge;
  f->site = site;
  f->what = "__activemask";
  yield(f);
  return f->active_mask;
}

// Answers the warp's waiting __activemask calls once none of its lanes can run.
inline void settle_converging(Block& b, int warp) {
  WarpState& w = b.warps[warp];
  for (int lane = 0; lane < 32; ++lane) {
    if ((w.live >> lane & 1u) && b.fibers[warp * 32 + lane]->runnable) return;
  }
  for (const auto& group : w.converging) {
    for (int lane = 0; lane < 32; ++lane) {
      if (!(group.second >> lane & 1u)) continue;
      Fiber* f = b.fibers[warp * 32 + lane];
      f->active_mask = group.second;
      make_runnable(b, f);
    }
  }
  w.converging.clear();
}

// ---------------------------------------------------------------- thread exit

inline void check_copies_retired(Fiber* f, Site site);

[[noreturn]] inline void thread_exit(Fiber* f) {
  Block& b = *f->block;
  const Site exit_site{"thread exit", 0};
  if (!f->copies.empty()) {
    fault("the thread exits with " + std::to_string(f->copies.size()) +
              " cp.async copies that no cp.async.wait_group retired",
          exit_site);
  }
  if (b.barrier_waiting > 0) {
    fault("the thread exits while " + std::to_string(b.barrier_waiting) + " threads wait at __syncthreads (" +
              site_text(b.barrier_site) + ")",
          exit_site);
  }
  WarpState& w = b.warps[f->warp];
  for (const Collective& c : w.pending) {
    if (c.mask >> f->lane & 1u) {
      fault("the lane exits while lanes " + lanes_text(c.arrived) + " wait for it at " + c.name + " (" +
                site_text(c.site) + ")",
            exit_site);
    }
  }
  f->done = true;
  --b.live;
  w.live &= ~(1u << f->lane);
  for (;;) yield(f);
}

inline void fiber_main(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
  f->block->grid->body();
  thread_exit(f);
}

// ---------------------------------------------------------------- the block scheduler

inline Fiber* pick(Block& b) {
  if (b.runnable == 0) return nullptr;
  const int n = b.threads;
  const ScheduleKind kind = b.grid->schedule.kind;
  int start = b.cursor;
  if (kind == ScheduleKind::kRandom) {
    b.rng = splitmix64(b.rng);
    start = static_cast<int>(b.rng % static_cast<uint64_t>(n));
  }
  if (kind == ScheduleKind::kWarp) {
    // The warp of the fiber that ran last keeps going while any of its lanes can.
    const int warp_base = start / 32 * 32;
    const int warp_end = std::min(warp_base + 32, n);
    for (int i = start; i < warp_end; ++i) {
      if (b.fibers[i]->runnable) return b.cursor = i, b.fibers[i];
    }
    for (int i = warp_base; i < start; ++i) {
      if (b.fibers[i]->runnable) return b.cursor = i, b.fibers[i];
    }
    start = warp_end % n;
  }
  for (int k = 0; k < n; ++k) {
    const int i = kind == ScheduleKind::kReverse ? ((start - k) % n + n) % n : (start + k) % n;
    if (b.fibers[i]->runnable) {
      b.cursor = kind == ScheduleKind::kReverse ? (i + n - 1) % n : kind == ScheduleKind::kWarp ? i : (i + 1) % n;
      return b.fibers[i];
    }
  }
  return nullptr;
}

// What every unfinished thread of a stuck block waits at, warp by warp.
inline std::string describe_waits(const Block& b) {
  std::string out;
  int warps_listed = 0;
  for (size_t wi = 0; wi < b.warps.size(); ++wi) {
    const WarpState& w = b.warps[wi];
    if (w.live == 0) continue;
    if (++warps_listed > 8) {
      out += "; ...";
      break;
    }
    out += std::string(warps_listed > 1 ? ";" : "") + " warp " + std::to_string(wi) + ":";
    uint32_t listed = 0;
    for (int lane = 0; lane < 32; ++lane) {
      if (!(w.live >> lane & 1u) || (listed >> lane & 1u)) continue;
      const Fiber* f = b.fibers[wi * 32 + lane];
      uint32_t group = 0;
      for (int other = lane; other < 32; ++other) {
        if (!(w.live >> other & 1u)) continue;
        const Fiber* g = b.fibers[wi * 32 + other];
        if (g->wait == f->wait && g->what == f->what && same_site(g->site, f->site)) group |= 1u << other;
      }
      listed |= group;
      out += std::string(listed == group ? " lanes " : ", lanes ") + lanes_text(group) + " at " + (f->what ? f->what : "?") + " (" +
             site_text(f->site) + ")";
      for (const Collective& c : w.pending) {
        if (c.arrived & group) out += " waiting for lanes " + lanes_text(c.mask & ~c.arrived);
      }
    }
  }
  uint32_t exited_warps = 0;
  for (const WarpState& w : b.warps) exited_warps += w.live == 0 ? 1 : 0;
  if (exited_warps > 0) out += " (" + std::to_string(exited_warps) + " warps have exited)";
  return out;
}

enum class BlockOutcome { kDone, kParked };

// Runs the block until every thread has exited, a fault, or (a dependent grid whose
// primary has not finished) every thread left waits at griddepcontrol.wait.
inline BlockOutcome run_block(Block& b) {
  Grid& g = *b.grid;
  for (;;) {
    if (g.failed.load(std::memory_order_relaxed)) return BlockOutcome::kDone;
    Fiber* f = pick(b);
    if (f == nullptr) break;
    f->runnable = false;
    --b.runnable;
    std_ext_emu_switch(&b.scheduler_sp, f->sp);
  }
  if (b.live == 0) {
    for (size_t i = 0; i < kSmemCanary; ++i) {
      if (b.smem[g.smem + i] != 0xA5) {
        g.report("std_ext emulator: a write past the end of the " + std::to_string(g.smem) +
                 " bytes of dynamic shared memory (byte " + std::to_string(i) + " after it changed) [" +
                 where(b, nullptr) + "]");
        break;
      }
    }
    return BlockOutcome::kDone;
  }
  bool dependency = false;
  for (const Fiber* f : b.fibers) dependency |= !f->done && f->wait == WaitKind::kDependency;
  if (dependency && !g.primary_done.load()) return BlockOutcome::kParked;
  std::string barrier;
  if (b.barrier_waiting > 0) {
    barrier = " " + std::to_string(b.barrier_waiting) + " of " + std::to_string(b.live) +
              " live threads wait at __syncthreads (" + site_text(b.barrier_site) + ");";
  }
  g.report("std_ext emulator: deadlock, no thread of the block can proceed [" + where(b, nullptr) + "]:" + barrier +
           describe_waits(b));
  return BlockOutcome::kDone;
}

// ---------------------------------------------------------------- workers

inline thread_local unsigned char tls_anchor;

// This library's thread-local block on the calling thread: the static shared memory.
inline bool find_module_tls(unsigned char** base, size_t* size) {
  *reinterpret_cast<volatile unsigned char*>(&tls_anchor) = 0;  // makes the block exist on this thread
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&find_module_tls), &info) == 0 || info.dli_fname == nullptr) return false;
  void* handle = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) return false;
  void* data = nullptr;
  struct link_map* map = nullptr;
  const bool ok = dlinfo(handle, RTLD_DI_TLS_DATA, &data) == 0 && data != nullptr &&
                  dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr;
  dlclose(handle);
  if (!ok) return false;
  struct Query {
    ElfW(Addr) load_address;
    size_t size;
  } query{map->l_addr, 0};
  dl_iterate_phdr(
      [](struct dl_phdr_info* phdr, size_t, void* arg) {
        auto* q = static_cast<Query*>(arg);
        if (phdr->dlpi_addr != q->load_address) return 0;
        for (int i = 0; i < phdr->dlpi_phnum; ++i) {
          if (phdr->dlpi_phdr[i].p_type == PT_TLS) q->size = phdr->dlpi_phdr[i].p_memsz;
        }
        return 1;
      },
      &query);
  if (query.size == 0) return false;
  *base = static_cast<unsigned char*>(data);
  *size = query.size;
  return true;
}

inline unsigned char* new_smem_buffer() {
  return static_cast<unsigned char*>(std::aligned_alloc(128, kMaxDynamicSmem + kSmemCanary));
}

struct Worker {
  int id = 0;
  unsigned char* smem = nullptr;
  unsigned char* tls = nullptr;
  size_t tls_size = 0;
  std::vector<Fiber*> free_fibers;
  std::unique_ptr<Block> block = std::make_unique<Block>();
  std::vector<std::unique_ptr<Block>> parked;

  void take_fibers(Block& b, int n) {
    while (static_cast<int>(free_fibers.size()) < n) {
      Fiber* f = new Fiber;
      f->slot = map_stack_slot();
      slot_owner(f->slot) = f;
      free_fibers.push_back(f);
    }
    b.fibers.assign(free_fibers.end() - n, free_fibers.end());
    free_fibers.resize(free_fibers.size() - n);
  }

  void give_back(Block& b) {
    free_fibers.insert(free_fibers.end(), b.fibers.begin(), b.fibers.end());
    b.fibers.clear();
  }

  // Sets up block `linear` of g with fresh fibers and poisoned shared memory.
  void start_block(Block& b, Grid& g, int64_t linear) {
    b.grid = &g;
    b.idx = uint3{static_cast<unsigned>(linear % g.grid.x), static_cast<unsigned>(linear / g.grid.x % g.grid.y),
                  static_cast<unsigned>(linear / (int64_t{g.grid.x} * g.grid.y))};
    b.threads = static_cast<int>(g.block.x * g.block.y * g.block.z);
    take_fibers(b, b.threads);
    b.warps.assign((b.threads + 31) / 32, WarpState{});
    for (int t = 0; t < b.threads; ++t) b.warps[t / 32].exists |= 1u << (t % 32);
    for (WarpState& w : b.warps) w.live = w.exists;
    b.smem = smem;
    std::memset(b.smem, 0xFF, g.smem);
    std::memset(b.smem + g.smem, 0xA5, kSmemCanary);
    b.static_smem = tls;
    b.static_size = tls_size;
    if (tls != nullptr) std::memset(tls, 0xFF, tls_size);
    b.live = b.threads;
    b.barrier_waiting = 0;
    b.runnable = 0;
    b.cursor = g.schedule.kind == ScheduleKind::kReverse ? b.threads - 1 : 0;
    b.rng = splitmix64(g.schedule.seed ^ splitmix64(g.salt * 0x10001 + static_cast<uint64_t>(linear)));
    b.faulted = false;
    for (int t = 0; t < b.threads; ++t) {
      Fiber* f = b.fibers[t];
      f->block = &b;
      f->tid = uint3{t % g.block.x, t / g.block.x % g.block.y, t / (g.block.x * g.block.y)};
      f->linear = t;
      f->warp = t / 32;
      f->lane = t % 32;
      f->runnable = false;
      f->done = false;
      f->wait = WaitKind::kNone;
      f->what = nullptr;
      f->copies.clear();
      f->committed = 0;
      f->sp = prepare_stack(f->slot, &fiber_main, f);
      make_runnable(b, f);
    }
  }

  // Runs block `linear` of g here. A block that parks (dependent grid, primary still
  // running) keeps its fibers, its dynamic shared memory and a copy of its static shared
  // memory until resume_parked().
  void run(Grid& g, int64_t linear) {
    Block& b = *block;
    start_block(b, g, linear);
    if (run_block(b) == BlockOutcome::kParked) {
      if (tls != nullptr) b.static_image.assign(tls, tls + tls_size);
      parked.push_back(std::move(block));
      block = std::make_unique<Block>();
      smem = new_smem_buffer();
      return;
    }
    give_back(b);
  }

  void resume_parked() {
    for (std::unique_ptr<Block>& p : parked) {
      Block& b = *p;
      if (!b.grid->failed.load()) {
        if (tls != nullptr) std::memcpy(tls, b.static_image.data(), tls_size);
        for (Fiber* f : b.fibers) {
          if (!f->done && f->wait == WaitKind::kDependency) make_runnable(b, f);
        }
        run_block(b);
      }
      give_back(b);
      std::free(b.smem);
    }
    parked.clear();
  }
};

// Worker threads, started on first use and kept for the life of the process (never
// joined: a dlopen'd library must not block exit on them).
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool;
    return *pool;
  }

  int size() const { return static_cast<int>(workers_.size()); }

  // Runs job(worker) on every worker and waits for all of them.
  void run_on_all(const std::function<void(Worker&)>& job) {
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = &job;
    busy_ = size();
    ++generation_;
    wake_.notify_all();
    done_.wait(lock, [&] { return busy_ == 0; });
    job_ = nullptr;
  }

 private:
  Pool() {
    const char* v = std::getenv("STD_EXT_EMULATOR_THREADS");
    int n = v ? std::atoi(v) : 2;
    n = std::max(1, std::min(n, 64));
    for (int i = 0; i < n; ++i) {
      workers_.push_back(std::make_unique<Worker>());
      workers_.back()->id = i;
    }
    for (int i = 0; i < n; ++i) std::thread([this, i] { loop(*workers_[i]); }).detach();
  }

  void loop(Worker& w) {
    w.smem = new_smem_buffer();
    if (!find_module_tls(&w.tls, &w.tls_size)) {
      w.tls = nullptr;
      w.tls_size = 0;
    }
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(Worker&)>* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
      }
      (*job)(w);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_all();
    }
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(Worker&)>* job_ = nullptr;
  int busy_ = 0;
  uint64_t generation_ = 0;
};

// Runs blocks first..n-1 (in the schedule's block order) of g on all workers.
inline void run_blocks(Grid& g, int64_t first) {
  g.next_block.store(first);
  const int64_t n = g.num_blocks();
  Pool::get().run_on_all([&](Worker& w) {
    for (;;) {
      if (g.failed.load(std::memory_order_relaxed)) return;
      const int64_t i = g.next_block.fetch_add(1);
      if (i >= n) return;
      w.run(g, g.block_at(i));
    }
  });
}

// A dependent launch, adversarially: the dependent grid's first blocks (one per worker)
// start before the primary and run until every thread waits at griddepcontrol.wait; then
// the primary runs to completion; then they resume, and the rest of the grid runs. A
// kernel that reads the primary's output before its wait reads unwritten memory.
inline void run_dependent_pair(Grid& primary, Grid& dependent) {
  dependent.primary_done.store(false);
  const int64_t early = std::min<int64_t>(dependent.num_blocks(), Pool::get().size());
  Pool::get().run_on_all([&](Worker& w) {
    if (w.id < early) w.run(dependent, dependent.block_at(w.id));
  });
  if (!dependent.failed.load()) run_blocks(primary, 0);
  dependent.primary_done.store(true);
  Pool::get().run_on_all([&](Worker& w) { w.resume_parked(); });
  if (!primary.failed.load() && !dependent.failed.load()) run_blocks(dependent, early);
}

inline std::string kernel_name(const void* fn) {
  Dl_info info{};
  if (dladdr(fn, &info) != 0 && info.dli_sname != nullptr) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && demangled ? demangled : info.dli_sname;
    std::free(demangled);
    return name;
  }
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%p", fn);
  return buffer;
}

}  // namespace std_ext::emu

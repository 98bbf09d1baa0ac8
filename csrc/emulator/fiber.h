// Fibers for the emulated CUDA threads: a hand-written x86-64 context switch and stacks
// that tell a running fiber who it is.
//
// ucontext's swapcontext saves and restores the signal mask with a system call on every
// switch; a block of 128 threads meeting at a few hundred shuffles and barriers makes
// that the whole cost of a call. The switch below saves only what the SysV ABI says a
// callee must preserve (rbx, rbp, r12-r15, rsp) plus the SSE and x87 control words.
//
// Every stack lives in a 64 KB slot aligned to 64 KB: page 0 holds a pointer to the
// slot's owner, page 1 is a guard (an overflow faults instead of corrupting a neighbour),
// the rest is the stack. A fiber finds itself by masking its stack pointer, so the
// emulator keeps no state in thread_local storage (whose block the emulator poisons as
// the block's static shared memory, see machine.h) and threadIdx costs one load.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

extern "C" {
void std_ext_emu_switch(void** save_sp, void* load_sp);
void std_ext_emu_trampoline();
}

// Weak and hidden: every translation unit that includes this header emits the same two
// functions, the linker keeps one, and no other library can interpose them.
asm(R"(
  .text
  .weak std_ext_emu_switch
  .hidden std_ext_emu_switch
  .type std_ext_emu_switch, @function
std_ext_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size std_ext_emu_switch, .-std_ext_emu_switch

  .weak std_ext_emu_trampoline
  .hidden std_ext_emu_trampoline
  .type std_ext_emu_trampoline, @function
std_ext_emu_trampoline:
  endbr64
  movq %r12, %rdi
  callq *%r13
  ud2
  .size std_ext_emu_trampoline, .-std_ext_emu_trampoline
)");

namespace std_ext::emu {

constexpr size_t kSlotBytes = 64 * 1024;
constexpr size_t kPageBytes = 4096;

// A fresh stack slot with its guard page; slots are never unmapped (the fibers that own
// them are pooled for the life of the process).
inline char* map_stack_slot() {
  static std::mutex mutex;
  static std::vector<char*> free_slots;
  std::lock_guard<std::mutex> lock(mutex);
  if (free_slots.empty()) {
    constexpr size_t kChunkSlots = 64;
    void* raw = mmap(nullptr, (kChunkSlots + 1) * kSlotBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) {
      std::fprintf(stderr, "std_ext emulator: cannot map fiber stacks\n");
      std::abort();
    }
    const uintptr_t base = (reinterpret_cast<uintptr_t>(raw) + kSlotBytes - 1) & ~(kSlotBytes - 1);
    for (size_t i = kChunkSlots; i-- > 0;) {
      char* slot = reinterpret_cast<char*>(base + i * kSlotBytes);
      mprotect(slot + kPageBytes, kPageBytes, PROT_NONE);
      free_slots.push_back(slot);
    }
  }
  char* slot = free_slots.back();
  free_slots.pop_back();
  return slot;
}

// A slot's owner pointer: the first word of the slot.
inline void*& slot_owner(char* slot) { return *reinterpret_cast<void**>(slot); }

// The owner of the slot whose stack the caller runs on.
inline void* current_slot_owner() {
  uintptr_t sp;
  asm volatile("movq %%rsp, %0" : "=r"(sp));
  return *reinterpret_cast<void**>(sp & ~(kSlotBytes - 1));
}

// Prepares `slot` so that switching to the returned stack pointer calls entry(arg) on it.
// entry must never return.
inline void* prepare_stack(char* slot, void (*entry)(void*), void* arg) {
  char* top = slot + kSlotBytes;  // 16-byte aligned: entry then sees the ABI's alignment
  void** frame = reinterpret_cast<void**>(top - 72);
  const uint32_t mxcsr = 0x1f80;   // round to nearest, no flush-to-zero, exceptions masked
  const uint16_t fpu_cw = 0x037f;  // the x87 default
  std::memcpy(reinterpret_cast<char*>(frame), &fpu_cw, sizeof fpu_cw);
  std::memcpy(reinterpret_cast<char*>(frame) + 8, &mxcsr, sizeof mxcsr);
  frame[2] = nullptr;                                                    // r15
  frame[3] = nullptr;                                                    // r14
  frame[4] = reinterpret_cast<void*>(entry);                             // r13
  frame[5] = arg;                                                        // r12
  frame[6] = nullptr;                                                    // rbx
  frame[7] = nullptr;                                                    // rbp
  frame[8] = reinterpret_cast<void*>(&std_ext_emu_trampoline);          // return address
  return frame;
}

}  // namespace std_ext::emu

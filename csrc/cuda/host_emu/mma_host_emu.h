// Host emulation of what mma_lse_kernels.cu uses of the GPU: the PTX wrappers of mma_ptx.cuh with
// the per-lane semantics the PTX ISA documents, and a block/warp/grid execution model. Used only
// by mma_lse_test.cpp (make check-cuda); not part of the extension.
//
// Every CUDA thread is a fiber (its own stack; one OS thread switches between them), so that the
// warp-collective instructions, which exchange registers between lanes, cost a few context
// switches instead of OS-thread barriers. A fiber runs until it waits, then the next runnable one
// runs; a fiber waiting at a barrier is parked until the barrier completes:
//   __syncthreads               a barrier of the block's fibers;
//   mma / ldmatrix / shuffle    each lane deposits its registers, the last lane to arrive checks
//                               that all 32 execute the same instruction and computes the result of
//                               the whole warp from the documented fragment layouts, each lane then
//                               takes its own registers;
//   semaphore spin              yields until another block releases it.
// Up to `resident` blocks of a grid run interleaved (a GPU's resident blocks), the next starting
// when one ends, so blocks really wait for each other on the semaphores.
//
// Checked on the way (an assert names the fault): ldmatrix row addresses 16-byte aligned and
// inside the launch's dynamic shared memory; cp.async sizes 4/8/16, both addresses aligned to the
// size, the destination inside shared memory, the source inside a registered global buffer;
// every element of every mma fragment defined by exactly one lane; no cp.async still pending when
// a thread ends; dynamic shared memory above 48 KB only after the kernel's attribute was raised;
// a grid that stops making progress (all fibers waiting) is a deadlock. cp.async copies land at
// a random moment between their issue and the wait that covers them (either end), so a read
// before the wait sees stale shared memory. Shared memory starts as NaN bytes (0xff).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // dim3, cudaError_t, __device__ and friends (empty for g++)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

using std::isinf;
using std::isnan;

#define RCL_EMU_CHECK(cond, ...)                                                  \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "host emulation: " __VA_ARGS__);                       \
      std::fprintf(stderr, "\n  (%s:%d: %s)\n", __FILE__, __LINE__, #cond);       \
      std::abort();                                                               \
    }                                                                             \
  } while (0)

// ------------------------------------------------------------------------------------------------
// Fibers

#if defined(__x86_64__)
// rcl_emu_switch(save, load): saves the callee-saved registers and the stack pointer into *save,
// continues on the stack `load` (System V x86-64; the FP control state is the same in all fibers).
extern "C" void rcl_emu_switch(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .globl rcl_emu_switch
  .type rcl_emu_switch, @function
rcl_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rcl_emu_switch, .-rcl_emu_switch
)");
#endif

namespace emu {

constexpr size_t kStackBytes = 128 << 10;

struct Copy {
  char* dst;
  const char* src;
  int bytes;
};

#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& save, Context& load) { rcl_emu_switch(&save.sp, load.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
#endif

struct Block;
struct Fiber {
  std::unique_ptr<char[]> stack;  // allocated once, reused by the blocks that follow
  Context ctx;
  Block* block = nullptr;
  dim3 tid;
  bool done = false;
  std::vector<Copy> open;               // cp.async not yet committed
  std::deque<std::vector<Copy>> groups;  // committed, not yet waited for
};

struct Barrier {
  unsigned expected = 0, count = 0, gen = 0;
  std::vector<Fiber*> parked;
};

// The registers one lane hands to a warp-collective instruction, and what it gets back.
struct LaneIn {
  int op;  // which instruction (all lanes must agree)
  uint32_t u[8];
  double f[8];
  const char* addr;
};
struct LaneOut {
  uint32_t u[4];
  float f[4];
  double d[2];
};

struct Warp {
  Barrier bar;
  LaneIn in[32];
  LaneOut out[2][32];  // by barrier generation parity: a fast lane's next result never
                       // overwrites one a slow lane has yet to read
};

struct Block {
  dim3 idx;
  std::vector<char> smem_buf;
  char* smem = nullptr;
  size_t smem_bytes = 0;
  Barrier bar;
  std::vector<Warp> warps;
  std::vector<Fiber> fibers;
  unsigned live = 0;
};

inline Fiber* cur = nullptr;
inline const std::function<void()>* kernel_body = nullptr;
inline dim3 grid_dim_v;
inline unsigned block_dim_v = 0;
inline uint64_t waits_since_progress = 0;
inline std::mt19937_64 rng(12345);
inline int resident_blocks = 1;  // blocks of a grid that run interleaved
inline std::vector<std::pair<const char*, size_t>> globals;  // registered global buffers
inline std::map<const void*, size_t> max_dynamic_smem;      // per kernel

inline Context scheduler;
inline std::deque<Fiber*> runnable;

// The current fiber stops (it is parked, queued or done): the next runnable fiber goes on, or the
// scheduler when none is left.
inline void run_next() {
  Fiber* me = cur;
  if (runnable.empty()) {
    switch_context(me->ctx, scheduler);
    return;
  }
  Fiber* next = runnable.front();
  runnable.pop_front();
  if (next == me) return;
  cur = next;
  switch_context(me->ctx, next->ctx);
}

inline void progress() { waits_since_progress = 0; }

// A spin-wait step: let every other runnable fiber go first.
inline void spin_yield() {
  RCL_EMU_CHECK(++waits_since_progress < (uint64_t(1) << 24),
                "deadlock: a thread spins while no other makes progress");
  runnable.push_back(cur);
  run_next();
}

// Arrive at b; the last arrival runs `last` before the parked ones are released.
template <class F>
inline void arrive_and_wait(Barrier& b, F&& last) {
  if (++b.count == b.expected) {
    last();
    b.count = 0;
    ++b.gen;
    for (Fiber* f : b.parked) runnable.push_back(f);
    b.parked.clear();
    progress();
    return;
  }
  b.parked.push_back(cur);
  run_next();
}

inline void sync_block() {
  arrive_and_wait(cur->block->bar, [] {});
}

inline unsigned lane() { return cur->tid.x % 32; }
inline Warp& warp() { return cur->block->warps[cur->tid.x / 32]; }

// A warp-collective instruction: deposit `mine`, the last lane runs compute(in, out) for all 32,
// returns this lane's result.
template <class F>
inline LaneOut collective(const LaneIn& mine, F&& compute) {
  Warp& w = warp();
  const unsigned l = lane();
  w.in[l] = mine;
  const unsigned parity = w.bar.gen & 1;
  arrive_and_wait(w.bar, [&] {
    for (unsigned i = 1; i < 32; ++i)
      RCL_EMU_CHECK(w.in[i].op == w.in[0].op,
                    "lanes 0 and %u of a warp execute different warp-collective instructions "
                    "(%d, %d)",
                    i, w.in[0].op, w.in[i].op);
    compute(w.in, w.out[parity]);
  });
  return w.out[parity][l];
}

// ------------------------------------------------------------------------------------------------
// cp.async

inline void perform(const Copy& c) { std::memcpy(c.dst, c.src, size_t(c.bytes)); }

inline bool in_globals(const char* p, size_t n) {
  for (const auto& [base, len] : globals)
    if (p >= base && p + n <= base + len) return true;
  return false;
}

inline void check_smem(const void* p, size_t n, const char* what) {
  const char* c = static_cast<const char*>(p);
  const Block* b = cur->block;
  RCL_EMU_CHECK(c >= b->smem && c + n <= b->smem + b->smem_bytes,
                "%s touches shared memory bytes [%td, %td) outside the %zu bytes of the launch", what,
                c - b->smem, c + n - b->smem, b->smem_bytes);
}

inline void finish_fiber_checks() {
  bool pending = !cur->open.empty();
  for (const auto& grp : cur->groups) pending |= !grp.empty();
  RCL_EMU_CHECK(!pending, "thread %u of block %u ends with cp.async copies never waited for",
                cur->tid.x, cur->block->idx.x);
}

// ------------------------------------------------------------------------------------------------
// Grid execution

[[noreturn]] inline void fiber_main() {
  (*kernel_body)();
  finish_fiber_checks();
  cur->done = true;
  progress();
  if (--cur->block->live == 0) {
    switch_context(cur->ctx, scheduler);  // the scheduler may start the next block
  } else {
    run_next();
  }
  std::abort();  // a finished fiber is never resumed
}
#if !defined(__x86_64__)
inline void fiber_entry() { fiber_main(); }
#endif

inline void start_fiber(Fiber& f) {
  if (!f.stack) f.stack.reset(new char[kStackBytes]);
  f.done = false;
  f.open.clear();
  f.groups.clear();
#if defined(__x86_64__)
  // Stack for `ret` into fiber_main after popping six callee-saved registers, with the
  // alignment of a function entry (rsp + 8 a multiple of 16).
  auto top = reinterpret_cast<uintptr_t>(f.stack.get() + kStackBytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  f.ctx.sp = sp;
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = f.stack.get();
  f.ctx.uc.uc_stack.ss_size = kStackBytes;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, fiber_entry, 0);
#endif
}

inline void start_block(Block& b, unsigned linear, size_t smem_bytes) {
  b.idx = dim3(linear % grid_dim_v.x, (linear / grid_dim_v.x) % grid_dim_v.y,
               linear / (grid_dim_v.x * grid_dim_v.y));
  b.smem_buf.assign(smem_bytes + 128, char(0xff));
  b.smem = b.smem_buf.data() + (128 - reinterpret_cast<uintptr_t>(b.smem_buf.data()) % 128) % 128;
  b.smem_bytes = smem_bytes;
  b.bar = Barrier{block_dim_v, 0, 0, {}};
  b.warps.assign((block_dim_v + 31) / 32, Warp{});
  for (auto& w : b.warps) w.bar = Barrier{32, 0, 0, {}};
  if (b.fibers.size() != block_dim_v) b.fibers = std::vector<Fiber>(block_dim_v);
  for (unsigned t = 0; t < block_dim_v; ++t) {
    Fiber& f = b.fibers[t];
    f.block = &b;
    f.tid = dim3(t, 0, 0);
    start_fiber(f);
    runnable.push_back(&f);
  }
  b.live = block_dim_v;
}

// Runs body() as every thread of every block of grid (1-D blocks of `threads`, a multiple of 32),
// up to resident_blocks blocks at a time.
inline void launch(const void* kernel, dim3 grid, unsigned threads, size_t smem_bytes,
                   const std::function<void()>& body) {
  RCL_EMU_CHECK(threads % 32 == 0 && threads <= 1024, "block of %u threads", threads);
  const auto attr = max_dynamic_smem.find(kernel);
  const size_t allowed = attr == max_dynamic_smem.end() ? 48 << 10 : std::max<size_t>(48 << 10, attr->second);
  RCL_EMU_CHECK(smem_bytes <= allowed,
                "launch with %zu bytes of dynamic shared memory; the kernel allows %zu", smem_bytes,
                allowed);
  const unsigned total = grid.x * grid.y * grid.z;
  if (total == 0) return;
  kernel_body = &body;
  grid_dim_v = grid;
  block_dim_v = threads;
  static std::vector<std::unique_ptr<Block>> pool;  // blocks and fiber stacks, kept for reuse
  while (pool.size() < size_t(std::max(1, resident_blocks))) pool.push_back(std::make_unique<Block>());
  const size_t slots = size_t(std::max(1, resident_blocks));
  std::vector<bool> busy(slots, false);
  unsigned next = 0, running = 0;
  while (next < total || running > 0) {
    for (size_t s = 0; s < slots && next < total; ++s) {
      if (busy[s]) continue;
      start_block(*pool[s], next++, smem_bytes);
      busy[s] = true;
      ++running;
    }
    RCL_EMU_CHECK(!runnable.empty(), "deadlock: every thread of the resident blocks is parked");
    cur = runnable.front();
    runnable.pop_front();
    switch_context(scheduler, cur->ctx);  // back when a block ends or nothing is runnable
    for (size_t s = 0; s < slots; ++s) {
      if (busy[s] && pool[s]->live == 0) {
        busy[s] = false;
        --running;
      }
    }
  }
  cur = nullptr;
}

// Global buffers cp.async may read (the test registers its inputs).
inline void register_global(const void* p, size_t bytes) {
  globals.emplace_back(static_cast<const char*>(p), bytes);
}
inline void clear_globals() { globals.clear(); }

}  // namespace emu

#define threadIdx (emu::cur->tid)
#define blockIdx (emu::cur->block->idx)
#define gridDim (emu::grid_dim_v)
#define __syncthreads() emu::sync_block()
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
// The launch macros of csrc/cuda/launch.cuh, emulated.
#define RCL_DYNAMIC_SMEM(name) char* name = emu::cur->block->smem
#define RCL_LAUNCH(kernel, grid, block, smem, stream, ...)                                    \
  emu::launch(reinterpret_cast<const void*>(&kernel), dim3(grid), unsigned(block), size_t(smem), \
              [&] { kernel(__VA_ARGS__); })

// ------------------------------------------------------------------------------------------------
// The PTX wrappers of mma_ptx.cuh, per the PTX ISA ("Matrix Fragments for mma.m16n8k16 with
// floating point type", "... for mma.m16n8k8" (.tf32), "... for mma.m8n8k4 with .f64",
// "ldmatrix", "cp.async", "cp.async.wait_group").

namespace rcl_mma {

enum Op : int { kMma16816Bf16 = 1, kMma16816F16, kMma1688Tf32, kMma884F64, kLdsm, kLdsmTrans, kShfl };

namespace detail {

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float f16_bits_to_float(uint16_t b) {
  __half_raw r;
  r.x = b;
  return __half2float(__half(r));
}
// A TF32 operand: the tensor core reads the top 19 bits of the register.
inline float tf32_operand(uint32_t u) {
  u &= 0xffffe000u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Element i of a fragment held in 32-bit registers of 16-bit pairs: low half first.
inline uint16_t half_of(const uint32_t* regs, int i) {
  return uint16_t(i % 2 == 0 ? regs[i / 2] & 0xffffu : regs[i / 2] >> 16);
}

// Places a lane's fragment element at (row, col) of a matrix, each element exactly once.
template <int ROWS, int COLS>
struct Matrix {
  double v[ROWS * COLS];
  int owner[ROWS * COLS];
  Matrix() { std::fill(owner, owner + ROWS * COLS, -1); }
  void put(int row, int col, double x, int lane, const char* what) {
    RCL_EMU_CHECK(row >= 0 && row < ROWS && col >= 0 && col < COLS,
                  "%s: lane %d element at (%d, %d) outside the fragment", what, lane, row, col);
    const int i = row * COLS + col;
    RCL_EMU_CHECK(owner[i] < 0, "%s: element (%d, %d) held by lanes %d and %d", what, row, col,
                  owner[i], lane);
    owner[i] = lane;
    v[i] = x;
  }
  double at(int row, int col) const { return v[row * COLS + col]; }
  void check_full(const char* what) const {
    for (int i = 0; i < ROWS * COLS; ++i)
      RCL_EMU_CHECK(owner[i] >= 0, "%s: element (%d, %d) held by no lane", what, i / COLS,
                    i % COLS);
  }
};

// m16n8k16 with 16-bit A/B (to_float decodes them), fp32 C/D.
template <class ToFloat>
inline void mma_16816(const emu::LaneIn* in, emu::LaneOut* out, ToFloat to_float) {
  Matrix<16, 16> A;
  Matrix<16, 8> B, C;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane % 4;
    for (int i = 0; i < 8; ++i) {
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A.put(row, col, to_float(half_of(in[lane].u, i)), lane, "mma.m16n8k16 A");
    }
    for (int i = 0; i < 4; ++i) {
      const int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      B.put(row, g, to_float(half_of(in[lane].u + 4, i)), lane, "mma.m16n8k16 B");
    }
    for (int i = 0; i < 4; ++i)
      C.put(i < 2 ? g : g + 8, t * 2 + (i & 1), in[lane].f[i], lane, "mma.m16n8k16 C");
  }
  A.check_full("mma.m16n8k16 A");
  B.check_full("mma.m16n8k16 B");
  C.check_full("mma.m16n8k16 C");
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
      float acc = float(C.at(row, col));
      for (int kk = 0; kk < 16; ++kk) acc += float(A.at(row, kk)) * float(B.at(kk, col));
      out[lane].f[i] = acc;
    }
  }
}

}  // namespace detail

namespace detail {
template <int OP, float (*TO_FLOAT)(uint16_t)>
inline void mma_16816_lanes(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::LaneIn in{OP, {a[0], a[1], a[2], a[3], b0, b1}, {d[0], d[1], d[2], d[3]}, nullptr};
  const auto out = emu::collective(
      in, [](const emu::LaneIn* i, emu::LaneOut* o) { mma_16816(i, o, TO_FLOAT); });
  for (int e = 0; e < 4; ++e) d[e] = out.f[e];
}
}  // namespace detail

inline void mma_16816_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  detail::mma_16816_lanes<kMma16816Bf16, detail::bf16_bits_to_float>(d, a, b0, b1);
}
inline void mma_16816_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  detail::mma_16816_lanes<kMma16816F16, detail::f16_bits_to_float>(d, a, b0, b1);
}

inline void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::LaneIn in{kMma1688Tf32, {a[0], a[1], a[2], a[3], b0, b1}, {d[0], d[1], d[2], d[3]}, nullptr};
  const auto out = emu::collective(in, [](const emu::LaneIn* in, emu::LaneOut* o) {
    detail::Matrix<16, 8> A, C;
    detail::Matrix<8, 8> B;
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, t = lane % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = (i == 0 || i == 2) ? g : g + 8;
        const int col = i < 2 ? t : t + 4;
        A.put(row, col, detail::tf32_operand(in[lane].u[i]), lane, "mma.m16n8k8.tf32 A");
      }
      for (int i = 0; i < 2; ++i)
        B.put(i == 0 ? t : t + 4, g, detail::tf32_operand(in[lane].u[4 + i]), lane,
              "mma.m16n8k8.tf32 B");
      for (int i = 0; i < 4; ++i)
        C.put(i < 2 ? g : g + 8, t * 2 + (i & 1), in[lane].f[i], lane, "mma.m16n8k8 C");
    }
    A.check_full("mma.m16n8k8.tf32 A");
    B.check_full("mma.m16n8k8.tf32 B");
    C.check_full("mma.m16n8k8 C");
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, t = lane % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
        float acc = float(C.at(row, col));
        for (int kk = 0; kk < 8; ++kk) acc += float(A.at(row, kk)) * float(B.at(kk, col));
        o[lane].f[i] = acc;
      }
    }
  });
  for (int e = 0; e < 4; ++e) d[e] = out.f[e];
}

inline void mma_884_f64(double& d0, double& d1, double a, double b) {
  emu::LaneIn in{kMma884F64, {}, {a, b, d0, d1}, nullptr};
  const auto out = emu::collective(in, [](const emu::LaneIn* in, emu::LaneOut* o) {
    detail::Matrix<8, 4> A;
    detail::Matrix<4, 8> B;
    detail::Matrix<8, 8> C;
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, t = lane % 4;
      A.put(lane >> 2, lane % 4, in[lane].f[0], lane, "mma.m8n8k4.f64 A");
      B.put(lane % 4, lane >> 2, in[lane].f[1], lane, "mma.m8n8k4.f64 B");
      for (int i = 0; i < 2; ++i)
        C.put(g, t * 2 + (i & 1), in[lane].f[2 + i], lane, "mma.m8n8k4.f64 C");
    }
    A.check_full("mma.m8n8k4.f64 A");
    B.check_full("mma.m8n8k4.f64 B");
    C.check_full("mma.m8n8k4.f64 C");
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, t = lane % 4;
      for (int i = 0; i < 2; ++i) {
        const int col = t * 2 + (i & 1);
        double acc = C.at(g, col);
        for (int kk = 0; kk < 4; ++kk) acc = std::fma(A.at(g, kk), B.at(kk, col), acc);
        o[lane].d[i] = acc;
      }
    }
  });
  d0 = out.d[0];
  d1 = out.d[1];
}

inline uint32_t to_tf32(float x) {
  // cvt.rna.tf32.f32: nearest, ties away from zero, on the 13 dropped bits; NaN/inf kept.
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  return u;
}

namespace detail {
// ldmatrix .m8n8 .x4 .b16: lanes 8q..8q+7 give the row addresses of matrix q. Without .trans lane
// l gets elements (l / 4, 2·(l % 4)) and (l / 4, 2·(l % 4) + 1) of each matrix; with .trans,
// (2·(l % 4), l / 4) and (2·(l % 4) + 1, l / 4) ("loaded in column-major format").
inline void ldsm(uint32_t (&r)[4], const void* row, bool trans) {
  emu::check_smem(row, 16, "ldmatrix row");
  RCL_EMU_CHECK(reinterpret_cast<uintptr_t>(row) % 16 == 0, "ldmatrix row address not 16-byte aligned");
  emu::LaneIn in{trans ? kLdsmTrans : kLdsm, {}, {}, static_cast<const char*>(row)};
  const auto out = emu::collective(in, [trans](const emu::LaneIn* in, emu::LaneOut* o) {
    for (int lane = 0; lane < 32; ++lane) {
      for (int q = 0; q < 4; ++q) {
        uint16_t e[2];
        for (int h = 0; h < 2; ++h) {
          const int row_i = trans ? 2 * (lane % 4) + h : lane / 4;
          const int col_i = trans ? lane / 4 : 2 * (lane % 4) + h;
          std::memcpy(&e[h], in[8 * q + row_i].addr + 2 * col_i, 2);
        }
        o[lane].u[q] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
      }
    }
  });
  for (int q = 0; q < 4; ++q) r[q] = out.u[q];
}
}  // namespace detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { detail::ldsm(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { detail::ldsm(r, row, true); }

template <int BYTES>
inline void cp_async(void* dst, const void* src) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
  emu::check_smem(dst, BYTES, "cp.async destination");
  RCL_EMU_CHECK(reinterpret_cast<uintptr_t>(dst) % BYTES == 0 &&
                    reinterpret_cast<uintptr_t>(src) % BYTES == 0,
                "cp.async of %d bytes with a misaligned address", BYTES);
  RCL_EMU_CHECK(emu::in_globals(static_cast<const char*>(src), BYTES),
                "cp.async reads %d bytes outside every input buffer", BYTES);
  const emu::Copy c{static_cast<char*>(dst), static_cast<const char*>(src), BYTES};
  if (emu::rng() % 2 == 0) {
    emu::perform(c);  // landed at once
  } else {
    emu::cur->open.push_back(c);  // lands when waited for
  }
}
inline void cp_async_commit() {
  emu::cur->groups.push_back(std::move(emu::cur->open));
  emu::cur->open.clear();
}
template <int N>
inline void cp_async_wait() {
  while (emu::cur->groups.size() > size_t(N)) {
    for (const auto& c : emu::cur->groups.front()) emu::perform(c);
    emu::cur->groups.pop_front();
  }
}

template <typename T>
inline T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "a register");
  emu::LaneIn in{kShfl, {uint32_t(lane_mask)}, {}, nullptr};
  std::memcpy(in.f, &v, sizeof v);
  const auto out = emu::collective(in, [](const emu::LaneIn* in, emu::LaneOut* o) {
    for (int lane = 0; lane < 32; ++lane) {
      RCL_EMU_CHECK(in[lane].u[0] == in[0].u[0], "shuffle lanes disagree on the lane mask");
      std::memcpy(o[lane].d, in[lane ^ int(in[lane].u[0])].f, 8);
    }
  });
  T r;
  std::memcpy(&r, out.d, sizeof r);
  return r;
}

inline int take_work(int* counter) { return (*counter)++; }  // one OS thread: atomic as it is

inline void sem_wait(const int* sem, int value) {
  while (*static_cast<const volatile int*>(sem) != value) emu::spin_yield();
}
inline void sem_release(int* sem, int value) {
  *sem = value;
  emu::progress();
}

inline float ldcg(const float* p) { return *p; }
inline double ldcg(const double* p) { return *p; }
// The vector forms: the hardware faults on a pair that is not aligned to its size.
template <typename T>
inline void ldcg_pair(const T* p, T& x, T& y) {
  RCL_EMU_CHECK(reinterpret_cast<uintptr_t>(p) % (2 * sizeof(T)) == 0, "pair access not aligned to its size");
  x = p[0];
  y = p[1];
}
template <typename T>
inline void st_pair(T* p, T x, T y) {
  RCL_EMU_CHECK(reinterpret_cast<uintptr_t>(p) % (2 * sizeof(T)) == 0, "pair access not aligned to its size");
  p[0] = x;
  p[1] = y;
}

template <typename K>
inline cudaError_t set_max_dynamic_smem(K kernel, size_t bytes) {
  emu::max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = bytes;
  return cudaSuccess;
}
inline cudaError_t memset_async(void* p, size_t bytes, cudaStream_t) {
  std::memset(p, 0, bytes);
  return cudaSuccess;
}
inline cudaError_t last_launch_error() { return cudaSuccess; }

}  // namespace rcl_mma

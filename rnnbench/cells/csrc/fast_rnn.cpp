// Time loops of three recurrent cells with hand-written back-propagation through time, on the CPU.
//
//   peephole LSTM  (Graves 2013; Chung et al. 2014)          ops rnnbench_fast::peephole_lstm_{fwd,bwd}
//   GRU, reset gate before W_hh (Cho / Chung et al. 2014)    ops rnnbench_fast::gru_reset_before_{fwd,bwd}
//   GRU, reset gate after W_hh (cuDNN / torch.nn.GRU)         ops rnnbench_fast::gru_reset_after_{fwd,bwd}
//   LSTM without peepholes (torch.nn.LSTM)                     ops rnnbench_fast::lstm_{fwd,bwd}
//   peephole LSTM with a linear block input or output (Greff et al. 2015's NIAF, NOAF)
//                                                              ops rnnbench_fast::lstm_{niaf,noaf}_*_stacked
//   peephole LSTM with full gate recurrence (Greff et al. 2015's FGR)  ops rnnbench_fast::lstm_fgr_*_stacked
//   tanh RNN (Elman; torch.nn.RNN)                             ops rnnbench_fast::tanh_rnn_{fwd,bwd}
//
// Python (rnnbench/cells/compiled.py) computes the input projection of all steps, xw = x W_ih^T + b, with
// one autograd-tracked matmul and hands xw to these loops; the loops return d xw, so autograd does the
// rest. Per step: one small matrix product (two for the reset-before GRU), then one pass of plain C++
// over the gates that the compiler vectorises. The gradient of W_hh is one matrix product over all
// steps after the loop.
//
// Layout: time major, (T, B, G) contiguous, G = gates * H, so each step reads and writes one
// contiguous block (measured 1.5x faster than batch-first rows for the gate pass). The hidden and
// cell states live in (T+1, B, H) buffers whose slot 0 is the initial state: slot t is step t's
// previous state, and slots 1..T are the outputs (returned as a view).
//
// K models at once (ops *_stacked, for rnnbench/cells/compiled.py): every argument stacked on a leading
// dim of K models, and each model's own number of steps; the K one-model loops run in parallel over the
// CPU threads, each on views of the stacked tensors. One step's products are too small to split between
// threads, but K models' loops are independent.
//
// float uses a Cephes-style exp (<= 2 ulp) so the gate pass vectorises; double uses std::exp and
// std::tanh, so float64 results match the step-by-step autograd reference to rounding.
// Only per-operator ATen headers are included: the file compiles in seconds, not a minute.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <numeric>
#include <thread>
#include <vector>

namespace {

using at::Tensor;

// ---- activations ---------------------------------------------------------------------------------
inline float fast_exp(float x) {
  // exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln2 / 2; exp(r) by the Cephes expf polynomial.
  x = x < -87.33654f ? -87.33654f : x;
  x = x > 88.0f ? 88.0f : x;  // exp(88) < FLT_MAX; beyond it sigmoid and tanh are saturated anyway
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (round to nearest)
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]: a normal float
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float exp_(float x) { return fast_exp(x); }
inline double exp_(double x) { return std::exp(x); }
inline float sigm(float x) { return 1.0f / (1.0f + fast_exp(-x)); }
inline double sigm(double x) { return 1.0 / (1.0 + std::exp(-x)); }

inline float tanh_(float x) {
  // Cephes tanhf: an odd polynomial near 0 (no cancellation), 1 - 2 / (e^{2|x|} + 1) beyond.
  float a = x < 0.0f ? -x : x;
  float s = x * x;
  float small = ((((-5.70498872745e-3f * s + 2.06390887954e-2f) * s - 5.37397155531e-2f) * s +
                  1.33314422036e-1f) * s - 3.33332819422e-1f) * s * x + x;
  float big = 1.0f - 2.0f / (fast_exp(2.0f * a) + 1.0f);
  big = x < 0.0f ? -big : big;
  return a < 0.625f ? small : big;
}
inline double tanh_(double x) { return std::tanh(x); }

// log(1 + e) for e in [0, 1] (e = exp(-|z|) in softplus): the Cephes logf polynomial on the mantissa of
// 1 + e, branch-free so that a loop over it vectorises; <= 2 ulp of the result. For 1 + e < sqrt(2)
// the polynomial's argument is e itself (not (1 + e) - 1), so small e keep their digits.
inline float log1p_unit(float e) {
  const bool up = e > 0.41421356f;      // 1 + e >= sqrt(2): 1 + e = 2 (1 + x), x = (e - 1) / 2 in (-0.29, 0]
  const float x = up ? (e - 1.0f) * 0.5f : e;
  const float k = up ? 1.0f : 0.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z + k * -2.12194440e-4f - 0.5f * z;
  return x + y + k * 0.693359375f;
}
inline double log1p_unit(double e) { return std::log1p(e); }

// ---- small matrix products ------------------------------------------------------------------------
// The per-step products are tiny (32 x 36 x 144): ATen's dispatch costs about as much as the work.
// When the BLAS inside libtorch_cpu exports sgemm_/dgemm_ (the pip wheels: MKL) they are called
// directly; the weak declarations are null otherwise and ATen's mm computes the same product.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
// MKL splits even these tiny products between threads, and the hand-off costs more than the product:
// measured 2.3x slower loops with 2 threads than with 1 on the 2-core CPU. Each loop below therefore
// asks MKL for one thread on its own thread for its duration (MKL's thread-local setting; a no-op
// where the BLAS is not MKL); the large weight-gradient products after the loops keep all threads.
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // the C interface (lower case is Fortran's, by pointer)
}

struct OneBlasThread {
  int previous = 0;
  OneBlasThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);  // 0: the global setting again
  }
};

#ifdef RNNBENCH_NO_BLAS  // tests build this variant (RNNBENCH_FAST_NO_BLAS=1) to check ATen's path
inline bool have_blas(float*) { return false; }
inline bool have_blas(double*) { return false; }
#else
inline bool have_blas(float*) { return sgemm_ != nullptr; }
inline bool have_blas(double*) { return dgemm_ != nullptr; }
#endif
inline void blas_gemm(const char* ta, const char* tb, int m, int n, int k, float alpha, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_gemm(const char* ta, const char* tb, int m, int n, int k, double alpha, const double* a, int lda,
                      const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// c (M, N), row-major = beta * c + A op(W): A (M, Kd) at `a` with row stride lda; op(W) = W^T for W (N, Kd)
// when trans, else W (Kd, N); W contiguous rows. Raw pointers, not Tensors: a view per step costs ~3 us
// of ATen bookkeeping, as much as a 8 x 46 x 138 product. Without BLAS symbols, ATen's mm on views.
template <typename T_>
void gemm(T_* c, int64_t M, int64_t N, const T_* a, int64_t Kd, int64_t lda, const Tensor& W, bool trans, double beta) {
  if (have_blas(c) && W.stride(1) == 1) {
    // Column-major view: c^T (N, M) = op(W)^T (N, Kd) A^T (Kd, M).
    blas_gemm(trans ? "T" : "N", "N", static_cast<int>(N), static_cast<int>(M), static_cast<int>(Kd), T_(1),
              W.data_ptr<T_>(), static_cast<int>(W.stride(0)), a, static_cast<int>(std::max<int64_t>(lda, 1)),
              static_cast<T_>(beta), c, static_cast<int>(N));
    return;
  }
  Tensor A = at::from_blob(const_cast<T_*>(a), {M, Kd}, {lda, 1}, W.options());
  Tensor out = at::from_blob(c, {M, N}, W.options());
  if (beta == 0.0)
    at::mm_out(out, A, trans ? W.t() : W);
  else
    out.addmm_(A, trans ? W.t() : W);
}

// ---- threads ------------------------------------------------------------------------------------
// Two kinds of independent work run in parallel: the rows of a batch (row b of h_t depends only on row b
// of h_{t-1}, so a chunk of rows runs its whole time loop without waiting for the others) and, in the
// *_stacked ops, K models. The threads are std::threads, as many as torch's intra-op setting
// (torch.set_num_threads): ATen's parallel_for is OpenMP pragmas in a header, which this file (built
// without -fopenmp, to stay clear of a second OpenMP runtime beside torch's) would run serially. Each
// thread takes the next item not yet taken (items may differ in size), runs MKL single-threaded and
// carries the caller's thread-local state (grad mode: no autograd inside the loops); an exception on
// any thread is re-raised on the caller's. Work started from inside a worker (a model's row chunks)
// runs serially on that worker.
//
// The forward loops cut a batch into chunks of 16 rows where one row's product per step is large
// (G x H >= 16384: the LSTM from H = 64, the GRUs from H = 74, tanh from H = 128). Measured on this
// project's 2 cores, batch 32, LSTM at H = 100: forward 15.8 ms on 1 thread, 8.5 ms on 2. Below that
// size a chunk's product is so small that the BLAS call costs more than the work, and two threads ran
// no faster than one (plus ~0.2 ms to start them). The backward loops run the whole batch on one
// thread: in chunks on 2 threads they were ~1 ms slower at H = 100 (memory-bound there). The cut depends
// on the shapes only, never on the thread count, so the numbers do not either.
constexpr int64_t kRowsPerChunk = 16;
inline int64_t rows_per_chunk(int64_t B, int64_t G, int64_t H) { return G * H >= 16384 ? kRowsPerChunk : std::max<int64_t>(B, 1); }
inline int64_t chunks_of(int64_t B, int64_t G, int64_t H) {
  const int64_t r = rows_per_chunk(B, G, H);
  return (B + r - 1) / r;
}

thread_local bool t_in_worker = false;

template <typename F>
void in_parallel(int64_t n_items, const F& f) {
  const int64_t n = t_in_worker ? 1 : std::max<int64_t>(1, std::min<int64_t>(n_items, at::get_num_threads()));
  if (n == 1) {
    for (int64_t k = 0; k < n_items; ++k) f(k);
    return;
  }
  std::vector<std::exception_ptr> errors(n);
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState caller;  // grad mode and the like: a new thread starts with the defaults
  auto work = [&](int64_t w) {
    const bool was_worker = t_in_worker;
    t_in_worker = true;
    try {
      at::ThreadLocalStateGuard same_state_as_caller(caller);
      OneBlasThread one_blas_thread;
      for (int64_t k = next++; k < n_items; k = next++) f(k);
    } catch (...) {
      errors[w] = std::current_exception();
    }
    t_in_worker = was_worker;
  };
  std::vector<std::thread> threads;
  for (int64_t w = 1; w < n; ++w) threads.emplace_back(work, w);
  work(0);
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// f(b0, b1) for each chunk of rows [b0, b1) of a batch of B whose step product is (G, H), chunks in parallel.
template <typename F>
void over_rows(int64_t B, int64_t G, int64_t H, const F& f) {
  const int64_t r = rows_per_chunk(B, G, H);
  in_parallel(chunks_of(B, G, H), [&](int64_t i) { f(i * r, std::min(B, (i + 1) * r)); });
}

void check(std::initializer_list<const Tensor*> ts, const char* op) {
  for (const Tensor* t : ts) {
    TORCH_CHECK(t->device().is_cpu(), "rnnbench_fast::", op, ": tensors must be on the CPU");
    TORCH_CHECK(t->is_contiguous(), "rnnbench_fast::", op, ": tensors must be contiguous");
    TORCH_CHECK(t->scalar_type() == ts.begin()[0]->scalar_type(), "rnnbench_fast::", op, ": mixed dtypes");
  }
  auto st = ts.begin()[0]->scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "rnnbench_fast::", op, ": float32 or float64 only");
}

// Rows of a batch that are still running at step t, where sequences end at their own lengths: `act`
// (nullptr: all B) holds act[t], the number of rows whose length exceeds t, the rows sorted longest
// first, so the rows still running are always the first act[t]. A loop computes only those; a row's
// outputs after its end are zeros and its state buffer slots there are zeros too (the final states are
// read at each row's own end, and a zero slot adds nothing to the weight gradients' products). The
// backward leaves a finished row's dh (and dc) untouched, so the final-state gradient it starts with
// enters at that row's own last step.
inline int64_t rows_at(const int64_t* act, int64_t t, int64_t B) { return act == nullptr ? B : act[t]; }

template <typename T_>
void zero_rows(T_* base, int64_t r0, int64_t r1, int64_t width) {
  if (r1 > r0) std::memset(base + r0 * width, 0, (r1 - r0) * width * sizeof(T_));
}

// Output i of a one-model op: a new tensor, or the caller's buffer (`into`: the stacked ops hand each
// model views of their stacked outputs, so nothing is copied into them afterwards).
using Outs = std::vector<Tensor>*;
Tensor out_or(Outs into, size_t i, at::IntArrayRef shape, const at::TensorOptions& o) {
  if (into == nullptr) return at::empty(shape, o);
  const Tensor& t = (*into)[i];
  TORCH_CHECK(t.sizes() == shape && t.is_contiguous(), "rnnbench_fast: output buffer ", i, " has the wrong shape");
  return t;
}

// ==== peephole LSTM ================================================================================
// xw (T,B,4H), gate order i,f,g,o; h0, c0 (B,H); whh (4H,H); wci, wcf, wco (H).
// Returns hbuf (T+1,B,H) (slot 0 = h0, slots 1..T = h_t), cbuf (T+1,B,H) likewise, gates (T,B,4H) = the
// i, f, g, o activations, tcs (T,B,H) = tanh(c_t).
// Peep = false: the plain LSTM of torch.nn.LSTM (same gate order; the peephole terms are compiled out and
// wci, wcf, wco are not read). Act: which of the two tanh activations are the identity instead
// (Greff et al. 2015's ablations; tcs then holds the output activation's value, c_t itself for NOAF).
// Full = true: Greff et al. 2015's FGR, whose gates also read the previous step's gate values. The
// recurrent state is then z_t = [h_t, i_t, f_t, o_t] (width Z = 4H instead of H): hbuf is (T+1,B,4H),
// whh (4H,4H) is [W_hh | R] with R's rows of the block input g zero (the caller builds it), and h0 is
// z_0. The backward takes and returns gradients of z (dhs (T,B,4H), dhT, dh0 (B,4H)) and dwhh (4H,4H).
enum Act : int { kTanhBoth = 0, kLinearInput = 1, kLinearOutput = 2 };

template <typename T_, bool Peep, int A = kTanhBoth, bool Full = false>
void lstm_fwd(const Tensor& xw, const Tensor& whh, const Tensor& wci, const Tensor& wcf, const Tensor& wco,
              Tensor& hbuf, Tensor& cbuf, Tensor& gates, Tensor& tcs, Tensor& gh, int64_t b0, int64_t b1,
              const int64_t* act) {
  OneBlasThread one_blas_thread;
  const int64_t T = xw.size(0), B = xw.size(1), H = cbuf.size(2), G = 4 * H, BH = B * H, Z = Full ? G : H;
  const T_* __restrict__ pci = Peep ? wci.data_ptr<T_>() : nullptr;
  const T_* __restrict__ pcf = Peep ? wcf.data_ptr<T_>() : nullptr;
  const T_* __restrict__ pco = Peep ? wco.data_ptr<T_>() : nullptr;
  const T_* __restrict__ pgh = gh.data_ptr<T_>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t e = std::max(b0, std::min(b1, rows_at(act, t, B)));  // rows [b0, e) still run
    zero_rows(hbuf.data_ptr<T_>() + (t + 1) * B * Z, e, b1, Z);
    zero_rows(cbuf.data_ptr<T_>() + (t + 1) * BH, e, b1, H);
    if (e == b0) continue;
    gemm<T_>(gh.data_ptr<T_>() + b0 * G, e - b0, G, hbuf.data_ptr<T_>() + t * B * Z + b0 * Z, Z, Z, whh, true, 0.0);
    const T_* __restrict__ px = xw.data_ptr<T_>() + t * B * G;
    const T_* __restrict__ pcp = cbuf.data_ptr<T_>() + t * BH;
    T_* __restrict__ pc = cbuf.data_ptr<T_>() + (t + 1) * BH;
    T_* __restrict__ ph = hbuf.data_ptr<T_>() + (t + 1) * B * Z;
    T_* __restrict__ pg = gates.data_ptr<T_>() + t * B * G;
    T_* __restrict__ ptc = tcs.data_ptr<T_>() + t * BH;
    for (int64_t b = b0; b < e; ++b) {
      const T_* __restrict__ ax = px + b * G;
      const T_* __restrict__ ah = pgh + b * G;
      const T_* __restrict__ cp = pcp + b * H;
      T_* __restrict__ g = pg + b * G;
      T_* __restrict__ c = pc + b * H;
      T_* __restrict__ tc = ptc + b * H;
      T_* __restrict__ h = ph + b * Z;
#pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) {
        T_ ai = ax[j] + ah[j], af = ax[H + j] + ah[H + j], ao = ax[3 * H + j] + ah[3 * H + j];
        if (Peep) {
          ai += pci[j] * cp[j];
          af += pcf[j] * cp[j];
        }
        const T_ i = sigm(ai);
        const T_ f = sigm(af);
        const T_ ag = ax[2 * H + j] + ah[2 * H + j];
        const T_ gg = A == kLinearInput ? ag : tanh_(ag);
        const T_ cn = f * cp[j] + i * gg;
        if (Peep) ao += pco[j] * cn;
        const T_ o = sigm(ao);
        const T_ tcn = A == kLinearOutput ? cn : tanh_(cn);
        g[j] = i;
        g[H + j] = f;
        g[2 * H + j] = gg;
        g[3 * H + j] = o;
        c[j] = cn;
        tc[j] = tcn;
        h[j] = o * tcn;
        if (Full) {  // the gate values the next step's gates read
          h[H + j] = i;
          h[2 * H + j] = f;
          h[3 * H + j] = o;
        }
      }
    }
  }
}

// The ops of both LSTMs (Peep = false: wci, wcf, wco are not read; the caller passes any tensors).
template <bool Peep, int A = kTanhBoth, bool Full = false>
std::vector<Tensor> lstm_forward(const char* op, const Tensor& xw, const Tensor& h0, const Tensor& c0, const Tensor& whh,
                                 const Tensor& wci, const Tensor& wcf, const Tensor& wco, Outs into = nullptr,
                                 const int64_t* act = nullptr) {
  check({&xw, &h0, &c0, &whh, &wci, &wcf, &wco}, op);
  const int64_t T = xw.size(0), B = xw.size(1), H = c0.size(1), Z = Full ? 4 * H : H;
  TORCH_CHECK(xw.dim() == 3 && T >= 1 && xw.size(2) == 4 * H && h0.size(0) == B && h0.size(1) == Z &&
              whh.size(0) == 4 * H && whh.size(1) == Z, op, ": shapes");
  auto o = xw.options();
  Tensor hbuf = out_or(into, 0, {T + 1, B, Z}, o), cbuf = out_or(into, 1, {T + 1, B, H}, o);
  Tensor gates = out_or(into, 2, {T, B, 4 * H}, o), tcs = out_or(into, 3, {T, B, H}, o);
  hbuf.select(0, 0).copy_(h0);
  cbuf.select(0, 0).copy_(c0);
  Tensor gh = at::empty({B, 4 * H}, o);
  over_rows(B, 4 * H, H, [&](int64_t b0, int64_t b1) {
    if (xw.scalar_type() == at::kFloat)
      lstm_fwd<float, Peep, A, Full>(xw, whh, wci, wcf, wco, hbuf, cbuf, gates, tcs, gh, b0, b1, act);
    else
      lstm_fwd<double, Peep, A, Full>(xw, whh, wci, wcf, wco, hbuf, cbuf, gates, tcs, gh, b0, b1, act);
  });
  return {hbuf, cbuf, gates, tcs};
}

std::vector<Tensor> peephole_lstm_fwd(const Tensor& xw, const Tensor& h0, const Tensor& c0, const Tensor& whh,
                                      const Tensor& wci, const Tensor& wcf, const Tensor& wco) {
  return lstm_forward<true>("peephole_lstm_fwd", xw, h0, c0, whh, wci, wcf, wco);
}

// dhs (T,B,H) = dL/dh_t from the outputs; dhT, dcT (B,H) from the final state.
// Returns d xw (T,B,4H), dh0, dc0 (B,H), d whh (4H,H), d wci, d wcf, d wco (H).
template <typename T_, bool Peep, int A = kTanhBoth, bool Full = false>
void lstm_bwd(const Tensor& dhs, const Tensor& whh, const Tensor& wci, const Tensor& wcf, const Tensor& wco,
              const Tensor& cbuf, const Tensor& gates, const Tensor& tcs, Tensor& dxw, Tensor& dh, Tensor& dc,
              Tensor& acc, const int64_t* act) {
  OneBlasThread one_blas_thread;
  const int64_t T = dhs.size(0), B = dhs.size(1), H = cbuf.size(2), G = 4 * H, BH = B * H, Z = Full ? G : H;
  const T_* __restrict__ pci = Peep ? wci.data_ptr<T_>() : nullptr;
  const T_* __restrict__ pcf = Peep ? wcf.data_ptr<T_>() : nullptr;
  const T_* __restrict__ pco = Peep ? wco.data_ptr<T_>() : nullptr;
  T_* __restrict__ pdh = dh.data_ptr<T_>();
  T_* __restrict__ pdc = dc.data_ptr<T_>();
  // peephole gradients summed in double whatever T_ is: 6400 terms per unit lose nothing
  double* __restrict__ aci = Peep ? acc.data_ptr<double>() : nullptr;
  double* __restrict__ acf = Peep ? aci + H : nullptr;
  double* __restrict__ aco = Peep ? aci + 2 * H : nullptr;
  for (int64_t t = T - 1; t >= 0; --t) {
    const T_* __restrict__ pg = gates.data_ptr<T_>() + t * B * G;
    const T_* __restrict__ pc = cbuf.data_ptr<T_>() + (t + 1) * BH;
    const T_* __restrict__ pcp = cbuf.data_ptr<T_>() + t * BH;
    const T_* __restrict__ ptc = tcs.data_ptr<T_>() + t * BH;
    const T_* __restrict__ pdo = dhs.data_ptr<T_>() + t * B * Z;
    T_* __restrict__ pda = dxw.data_ptr<T_>() + t * B * G;
    const int64_t e = rows_at(act, t, B);
    zero_rows(pda, e, B, G);
    for (int64_t b = 0; b < e; ++b) {
      const T_* __restrict__ g = pg + b * G;
      const T_* __restrict__ c = pc + b * H;
      const T_* __restrict__ cp = pcp + b * H;
      const T_* __restrict__ tc = ptc + b * H;
      const T_* __restrict__ dho = pdo + b * Z;
      T_* __restrict__ da = pda + b * G;
      T_* __restrict__ dhb = pdh + b * Z;
      T_* __restrict__ dcb = pdc + b * H;
#pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) {
        const T_ i = g[j], f = g[H + j], gg = g[2 * H + j], o = g[3 * H + j];
        const T_ dht = dhb[j] + dho[j];
        // FGR: the gradients of this step's gate values through the next step's gates (and the outputs')
        const T_ ei = Full ? dhb[H + j] + dho[H + j] : T_(0);
        const T_ ef = Full ? dhb[2 * H + j] + dho[2 * H + j] : T_(0);
        const T_ eo = Full ? dhb[3 * H + j] + dho[3 * H + j] : T_(0);
        const T_ dao = (dht * tc[j] + eo) * (o * (1 - o));
        T_ dct = dcb[j] + dht * o * (A == kLinearOutput ? T_(1) : 1 - tc[j] * tc[j]);
        if (Peep) dct += dao * pco[j];
        const T_ dai = (dct * gg + ei) * (i * (1 - i));
        const T_ dag = dct * i * (A == kLinearInput ? T_(1) : 1 - gg * gg);
        const T_ daf = (dct * cp[j] + ef) * (f * (1 - f));
        dcb[j] = Peep ? dct * f + dai * pci[j] + daf * pcf[j] : dct * f;
        da[j] = dai;
        da[H + j] = daf;
        da[2 * H + j] = dag;
        da[3 * H + j] = dao;
        if (Peep) {
          aci[j] += static_cast<double>(dai * cp[j]);
          acf[j] += static_cast<double>(daf * cp[j]);
          aco[j] += static_cast<double>(dao * c[j]);
        }
      }
    }
    if (e > 0) gemm<T_>(pdh, e, Z, dxw.data_ptr<T_>() + t * B * G, G, G, whh, false, 0.0);  // dh_{t-1} = dA_t W_hh
  }
}

template <bool Peep, int A = kTanhBoth, bool Full = false>
std::vector<Tensor> lstm_backward(const char* op, const Tensor& dhs, const Tensor& dhT, const Tensor& dcT,
                                  const Tensor& whh, const Tensor& wci, const Tensor& wcf, const Tensor& wco,
                                  const Tensor& hbuf, const Tensor& cbuf, const Tensor& gates, const Tensor& tcs,
                                  Outs into = nullptr, const int64_t* act = nullptr) {
  check({&dhs, &dhT, &dcT, &whh, &wci, &wcf, &wco, &hbuf, &cbuf, &gates, &tcs}, op);
  const int64_t T = dhs.size(0), B = dhs.size(1), H = dcT.size(1), Z = Full ? 4 * H : H;
  TORCH_CHECK(dhs.size(2) == Z && dhT.size(1) == Z && hbuf.size(2) == Z, op, ": shapes");
  auto o = dhs.options();
  Tensor dxw = out_or(into, 0, {T, B, 4 * H}, o);
  Tensor dh = out_or(into, 1, {B, Z}, o), dc = out_or(into, 2, {B, H}, o);
  dh.copy_(dhT);
  dc.copy_(dcT);
  Tensor acc = at::zeros({Peep ? 3 : 0, H}, o.dtype(at::kDouble));
  if (dhs.scalar_type() == at::kFloat)
    lstm_bwd<float, Peep, A, Full>(dhs, whh, wci, wcf, wco, cbuf, gates, tcs, dxw, dh, dc, acc, act);
  else
    lstm_bwd<double, Peep, A, Full>(dhs, whh, wci, wcf, wco, cbuf, gates, tcs, dxw, dh, dc, acc, act);
  Tensor dwhh = out_or(into, 3, {4 * H, Z}, o);
  at::mm_out(dwhh, dxw.view({T * B, 4 * H}).t(), hbuf.narrow(0, 0, T).reshape({T * B, Z}));
  if (!Peep) return {dxw, dh, dc, dwhh};
  std::vector<Tensor> grads = {dxw, dh, dc, dwhh};
  for (int64_t i = 0; i < 3; ++i) grads.push_back(out_or(into, 4 + i, {H}, o).copy_(acc[i]));
  return grads;
}

std::vector<Tensor> peephole_lstm_bwd(const Tensor& dhs, const Tensor& dhT, const Tensor& dcT, const Tensor& whh,
                                      const Tensor& wci, const Tensor& wcf, const Tensor& wco, const Tensor& hbuf,
                                      const Tensor& cbuf, const Tensor& gates, const Tensor& tcs) {
  return lstm_backward<true>("peephole_lstm_bwd", dhs, dhT, dcT, whh, wci, wcf, wco, hbuf, cbuf, gates, tcs);
}

// ==== LSTM without peepholes (torch.nn.LSTM) =======================================================
// The ops above with the peephole terms compiled out. xw (T,B,4H) = x W_ih^T + b_ih + b_hh, order i, f,
// g, o; h0, c0 (B,H); whh (4H,H). Returns hbuf, cbuf, gates, tcs as peephole_lstm_fwd; the backward
// d xw, dh0, dc0, d whh.
std::vector<Tensor> lstm_fwd_op(const Tensor& xw, const Tensor& h0, const Tensor& c0, const Tensor& whh) {
  return lstm_forward<false>("lstm_fwd", xw, h0, c0, whh, whh, whh, whh);
}

std::vector<Tensor> lstm_bwd_op(const Tensor& dhs, const Tensor& dhT, const Tensor& dcT, const Tensor& whh,
                                const Tensor& hbuf, const Tensor& cbuf, const Tensor& gates, const Tensor& tcs) {
  return lstm_backward<false>("lstm_bwd", dhs, dhT, dcT, whh, whh, whh, whh, hbuf, cbuf, gates, tcs);
}

// ==== tanh RNN (Elman; torch.nn.RNN) ===============================================================
// xw (T,B,H) = x W_ih^T + b_ih + b_hh; h0 (B,H); whh (H,H).  h_t = tanh(xw_t + W_hh h_{t-1}).
// Returns hbuf (T+1,B,H); the backward d xw, dh0, d whh.
template <typename T_>
void tanh_fwd(const Tensor& xw, const Tensor& whh, Tensor& hbuf, int64_t b0, int64_t b1, const int64_t* act) {
  OneBlasThread one_blas_thread;
  const int64_t T = xw.size(0), B = xw.size(1), H = hbuf.size(2), BH = B * H;
  for (int64_t t = 0; t < T; ++t) {
    T_* __restrict__ ph = hbuf.data_ptr<T_>() + (t + 1) * BH;
    const int64_t e = std::max(b0, std::min(b1, rows_at(act, t, B)));
    zero_rows(ph, e, b1, H);
    if (e == b0) continue;
    gemm<T_>(ph + b0 * H, e - b0, H, hbuf.data_ptr<T_>() + t * BH + b0 * H, H, H, whh, true, 0.0);  // W_hh h_{t-1}, then in place
    const T_* __restrict__ px = xw.data_ptr<T_>() + t * BH;
#pragma GCC ivdep
    for (int64_t j = b0 * H; j < e * H; ++j) ph[j] = tanh_(px[j] + ph[j]);
  }
}

std::vector<Tensor> tanh_rnn_fwd_into(const Tensor& xw, const Tensor& h0, const Tensor& whh, Outs into,
                                      const int64_t* act = nullptr) {
  check({&xw, &h0, &whh}, "tanh_rnn_fwd");
  const int64_t T = xw.size(0), B = xw.size(1), H = h0.size(1);
  TORCH_CHECK(xw.dim() == 3 && T >= 1 && xw.size(2) == H && h0.size(0) == B, "tanh_rnn_fwd: shapes");
  Tensor hbuf = out_or(into, 0, {T + 1, B, H}, xw.options());
  hbuf.select(0, 0).copy_(h0);
  over_rows(B, H, H, [&](int64_t b0, int64_t b1) {
    if (xw.scalar_type() == at::kFloat)
      tanh_fwd<float>(xw, whh, hbuf, b0, b1, act);
    else
      tanh_fwd<double>(xw, whh, hbuf, b0, b1, act);
  });
  return {hbuf};
}

template <typename T_>
void tanh_bwd(const Tensor& dhs, const Tensor& whh, const Tensor& hbuf, Tensor& dxw, Tensor& dh, const int64_t* act) {
  OneBlasThread one_blas_thread;
  const int64_t T = dhs.size(0), B = dhs.size(1), H = dhs.size(2), BH = B * H;
  T_* __restrict__ pdh = dh.data_ptr<T_>();
  for (int64_t t = T - 1; t >= 0; --t) {
    const T_* __restrict__ h = hbuf.data_ptr<T_>() + (t + 1) * BH;
    const T_* __restrict__ dho = dhs.data_ptr<T_>() + t * BH;
    T_* __restrict__ da = dxw.data_ptr<T_>() + t * BH;
    const int64_t e = rows_at(act, t, B);
    zero_rows(da, e, B, H);
#pragma GCC ivdep
    for (int64_t j = 0; j < e * H; ++j) da[j] = (pdh[j] + dho[j]) * (1 - h[j] * h[j]);
    if (e > 0) gemm<T_>(pdh, e, H, da, H, H, whh, false, 0.0);  // dh_{t-1} = dA_t W_hh
  }
}

std::vector<Tensor> tanh_rnn_bwd_into(const Tensor& dhs, const Tensor& dhT, const Tensor& whh, const Tensor& hbuf,
                                      Outs into, const int64_t* act = nullptr) {
  check({&dhs, &dhT, &whh, &hbuf}, "tanh_rnn_bwd");
  const int64_t T = dhs.size(0), B = dhs.size(1), H = dhs.size(2);
  Tensor dxw = out_or(into, 0, {T, B, H}, dhs.options());
  Tensor dh = out_or(into, 1, {B, H}, dhs.options());
  dh.copy_(dhT);
  if (dhs.scalar_type() == at::kFloat)
    tanh_bwd<float>(dhs, whh, hbuf, dxw, dh, act);
  else
    tanh_bwd<double>(dhs, whh, hbuf, dxw, dh, act);
  Tensor dwhh = out_or(into, 2, {H, H}, dhs.options());
  at::mm_out(dwhh, dxw.view({T * B, H}).t(), hbuf.narrow(0, 0, T).reshape({T * B, H}));
  return {dxw, dh, dwhh};
}
std::vector<Tensor> tanh_rnn_fwd(const Tensor& xw, const Tensor& h0, const Tensor& whh) { return tanh_rnn_fwd_into(xw, h0, whh, nullptr); }
std::vector<Tensor> tanh_rnn_bwd(const Tensor& dhs, const Tensor& dhT, const Tensor& whh, const Tensor& hbuf) {
  return tanh_rnn_bwd_into(dhs, dhT, whh, hbuf, nullptr);
}

// ==== GRU, reset before (Chung et al. 2014) =======================================================
// xw (T,B,3H) order r, z, h~; h0 (B,H); whh (3H,H) = [U_r; U_z; U_h].
//   r = σ(a_r + U_r h), z = σ(a_z + U_z h), h~ = tanh(a_h + U_h (r h)), h' = (1 - z) h + z h~
// Returns hbuf (T+1,B,H), gates (T,B,3H) = r, z, h~, rh (T,B,H) = r_t * h_{t-1}.
template <typename T_>
void grub_fwd(const Tensor& xw, const Tensor& whh, Tensor& hbuf, Tensor& gates, Tensor& rh, const Tensor& u_rz,
              const Tensor& u_h, Tensor& grz, Tensor& gh, int64_t b0, int64_t b1, const int64_t* act) {
  OneBlasThread one_blas_thread;
  const int64_t T = xw.size(0), B = xw.size(1), H = hbuf.size(2), G = 3 * H, BH = B * H;
  const T_* __restrict__ pgrz = grz.data_ptr<T_>();
  const T_* __restrict__ pgh = gh.data_ptr<T_>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t e = std::max(b0, std::min(b1, rows_at(act, t, B)));
    zero_rows(hbuf.data_ptr<T_>() + (t + 1) * BH, e, b1, H);
    zero_rows(rh.data_ptr<T_>() + t * BH, e, b1, H);  // read whole by the weight gradient's product
    if (e == b0) continue;
    gemm<T_>(grz.data_ptr<T_>() + b0 * 2 * H, e - b0, 2 * H, hbuf.data_ptr<T_>() + t * BH + b0 * H, H, H, u_rz, true, 0.0);
    const T_* __restrict__ px = xw.data_ptr<T_>() + t * B * G;
    const T_* __restrict__ php = hbuf.data_ptr<T_>() + t * BH;
    T_* __restrict__ ph = hbuf.data_ptr<T_>() + (t + 1) * BH;
    T_* __restrict__ pg = gates.data_ptr<T_>() + t * B * G;
    T_* __restrict__ prh = rh.data_ptr<T_>() + t * BH;
    for (int64_t b = b0; b < e; ++b) {
      const T_* __restrict__ ax = px + b * G;
      const T_* __restrict__ ah = pgrz + b * 2 * H;
      const T_* __restrict__ hp = php + b * H;
      T_* __restrict__ g = pg + b * G;
      T_* __restrict__ r_h = prh + b * H;
#pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) {
        const T_ r = sigm(ax[j] + ah[j]);
        g[j] = r;
        g[H + j] = sigm(ax[H + j] + ah[H + j]);
        r_h[j] = r * hp[j];
      }
    }
    gemm<T_>(gh.data_ptr<T_>() + b0 * H, e - b0, H, rh.data_ptr<T_>() + t * BH + b0 * H, H, H, u_h, true, 0.0);
    for (int64_t b = b0; b < e; ++b) {
      const T_* __restrict__ ax = px + b * G;
      const T_* __restrict__ ah = pgh + b * H;
      const T_* __restrict__ hp = php + b * H;
      T_* __restrict__ g = pg + b * G;
      T_* __restrict__ h = ph + b * H;
#pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) {
        const T_ ht = tanh_(ax[2 * H + j] + ah[j]);
        const T_ z = g[H + j];
        g[2 * H + j] = ht;
        h[j] = (1 - z) * hp[j] + z * ht;
      }
    }
  }
}

std::vector<Tensor> gru_reset_before_fwd_into(const Tensor& xw, const Tensor& h0, const Tensor& whh, Outs into,
                                              const int64_t* act = nullptr) {
  check({&xw, &h0, &whh}, "gru_reset_before_fwd");
  const int64_t T = xw.size(0), B = xw.size(1), H = h0.size(1);
  TORCH_CHECK(xw.dim() == 3 && T >= 1 && xw.size(2) == 3 * H && h0.size(0) == B, "gru_reset_before_fwd: shapes");
  auto o = xw.options();
  Tensor hbuf = out_or(into, 0, {T + 1, B, H}, o), gates = out_or(into, 1, {T, B, 3 * H}, o), rh = out_or(into, 2, {T, B, H}, o);
  hbuf.select(0, 0).copy_(h0);
  Tensor u_rz = whh.narrow(0, 0, 2 * H), u_h = whh.narrow(0, 2 * H, H);
  Tensor grz = at::empty({B, 2 * H}, o), gh = at::empty({B, H}, o);
  over_rows(B, 3 * H, H, [&](int64_t b0, int64_t b1) {
    if (xw.scalar_type() == at::kFloat)
      grub_fwd<float>(xw, whh, hbuf, gates, rh, u_rz, u_h, grz, gh, b0, b1, act);
    else
      grub_fwd<double>(xw, whh, hbuf, gates, rh, u_rz, u_h, grz, gh, b0, b1, act);
  });
  return {hbuf, gates, rh};
}
std::vector<Tensor> gru_reset_before_fwd(const Tensor& xw, const Tensor& h0, const Tensor& whh) {
  return gru_reset_before_fwd_into(xw, h0, whh, nullptr);
}

template <typename T_>
void grub_bwd(const Tensor& dhs, const Tensor& whh, const Tensor& hbuf, const Tensor& gates, Tensor& dxw,
              Tensor& dh, const int64_t* act) {
  OneBlasThread one_blas_thread;
  const int64_t T = dhs.size(0), B = dhs.size(1), H = dhs.size(2), G = 3 * H, BH = B * H;
  Tensor u_rz = whh.narrow(0, 0, 2 * H), u_h = whh.narrow(0, 2 * H, H);
  Tensor drh = at::empty({B, H}, dhs.options());
  const T_* __restrict__ pdrh = drh.data_ptr<T_>();
  T_* __restrict__ pdh = dh.data_ptr<T_>();
  for (int64_t t = T - 1; t >= 0; --t) {
    const T_* __restrict__ pg = gates.data_ptr<T_>() + t * B * G;
    const T_* __restrict__ php = hbuf.data_ptr<T_>() + t * BH;
    const T_* __restrict__ pdo = dhs.data_ptr<T_>() + t * BH;
    T_* __restrict__ pda = dxw.data_ptr<T_>() + t * B * G;
    const int64_t e = rows_at(act, t, B);
    zero_rows(pda, e, B, G);
    if (e == 0) continue;
    for (int64_t b = 0; b < e; ++b) {
      const T_* __restrict__ g = pg + b * G;
      const T_* __restrict__ hp = php + b * H;
      const T_* __restrict__ dho = pdo + b * H;
      T_* __restrict__ da = pda + b * G;
      T_* __restrict__ dhb = pdh + b * H;
#pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) {
        const T_ z = g[H + j], ht = g[2 * H + j];
        const T_ dht = dhb[j] + dho[j];
        da[H + j] = dht * (ht - hp[j]) * (z * (1 - z));
        da[2 * H + j] = dht * z * (1 - ht * ht);
        dhb[j] = dht * (1 - z);  // the direct path; the two matrix paths are added below
      }
    }
    T_* pdat = dxw.data_ptr<T_>() + t * B * G;
    gemm<T_>(drh.data_ptr<T_>(), e, H, pdat + 2 * H, H, G, u_h, false, 0.0);  // d(r h_{t-1}) = dA_h U_h
    for (int64_t b = 0; b < e; ++b) {
      const T_* __restrict__ g = pg + b * G;
      const T_* __restrict__ hp = php + b * H;
      const T_* __restrict__ d = pdrh + b * H;
      T_* __restrict__ da = pda + b * G;
      T_* __restrict__ dhb = pdh + b * H;
#pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) {
        const T_ r = g[j];
        da[j] = d[j] * hp[j] * (r * (1 - r));
        dhb[j] += d[j] * r;
      }
    }
    gemm<T_>(pdh, e, H, pdat, 2 * H, G, u_rz, false, 1.0);  // + [dA_r, dA_z] [U_r; U_z]
  }
}

std::vector<Tensor> gru_reset_before_bwd_into(const Tensor& dhs, const Tensor& dhT, const Tensor& whh,
                                              const Tensor& hbuf, const Tensor& gates, const Tensor& rh, Outs into,
                                              const int64_t* act = nullptr) {
  check({&dhs, &dhT, &whh, &hbuf, &gates, &rh}, "gru_reset_before_bwd");
  const int64_t T = dhs.size(0), B = dhs.size(1), H = dhs.size(2);
  Tensor dxw = out_or(into, 0, {T, B, 3 * H}, dhs.options());
  Tensor dh = out_or(into, 1, {B, H}, dhs.options());
  dh.copy_(dhT);
  if (dhs.scalar_type() == at::kFloat)
    grub_bwd<float>(dhs, whh, hbuf, gates, dxw, dh, act);
  else
    grub_bwd<double>(dhs, whh, hbuf, gates, dxw, dh, act);
  Tensor da = dxw.view({T * B, 3 * H});
  Tensor dwhh = out_or(into, 2, {3 * H, H}, dhs.options());
  Tensor top = dwhh.narrow(0, 0, 2 * H), bottom = dwhh.narrow(0, 2 * H, H);
  at::mm_out(top, da.narrow(1, 0, 2 * H).t(), hbuf.narrow(0, 0, T).reshape({T * B, H}));
  at::mm_out(bottom, da.narrow(1, 2 * H, H).t(), rh.view({T * B, H}));
  return {dxw, dh, dwhh};
}
std::vector<Tensor> gru_reset_before_bwd(const Tensor& dhs, const Tensor& dhT, const Tensor& whh,
                                         const Tensor& hbuf, const Tensor& gates, const Tensor& rh) {
  return gru_reset_before_bwd_into(dhs, dhT, whh, hbuf, gates, rh, nullptr);
}

// ==== GRU, reset after (torch.nn.GRU) ==============================================================
// gi (T,B,3H) = x W_ih^T + b_ih, order r, z, n; h0 (B,H); whh (3H,H); bhh (3H).
//   r = σ(gi_r + (W_hr h + b_hr)), z = σ(gi_z + (W_hz h + b_hz)), hn = W_hn h + b_hn,
//   n = tanh(gi_n + r hn), h' = (h - n) z + n        (ATen's GRU cell, term for term)
// Returns hbuf (T+1,B,H), gates (T,B,4H) = r, z, n, hn.
template <typename T_>
void grua_fwd(const Tensor& gi, const Tensor& whh, const Tensor& bhh, Tensor& hbuf, Tensor& gates, Tensor& gh,
              int64_t b0, int64_t b1, const int64_t* act) {
  OneBlasThread one_blas_thread;
  const int64_t T = gi.size(0), B = gi.size(1), H = hbuf.size(2), G = 3 * H, BH = B * H;
  const T_* __restrict__ pgh = gh.data_ptr<T_>();
  const T_* __restrict__ pb = bhh.data_ptr<T_>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t e = std::max(b0, std::min(b1, rows_at(act, t, B)));
    zero_rows(hbuf.data_ptr<T_>() + (t + 1) * BH, e, b1, H);
    if (e == b0) continue;
    gemm<T_>(gh.data_ptr<T_>() + b0 * G, e - b0, G, hbuf.data_ptr<T_>() + t * BH + b0 * H, H, H, whh, true, 0.0);
    const T_* __restrict__ px = gi.data_ptr<T_>() + t * B * G;
    const T_* __restrict__ php = hbuf.data_ptr<T_>() + t * BH;
    T_* __restrict__ ph = hbuf.data_ptr<T_>() + (t + 1) * BH;
    T_* __restrict__ pg = gates.data_ptr<T_>() + t * B * 4 * H;
    for (int64_t b = b0; b < e; ++b) {
      const T_* __restrict__ ax = px + b * G;
      const T_* __restrict__ ah = pgh + b * G;
      const T_* __restrict__ hp = php + b * H;
      T_* __restrict__ g = pg + b * 4 * H;
      T_* __restrict__ h = ph + b * H;
#pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) {
        const T_ r = sigm((ah[j] + pb[j]) + ax[j]);
        const T_ z = sigm((ah[H + j] + pb[H + j]) + ax[H + j]);
        const T_ hn = ah[2 * H + j] + pb[2 * H + j];
        const T_ n = tanh_(ax[2 * H + j] + hn * r);
        g[j] = r;
        g[H + j] = z;
        g[2 * H + j] = n;
        g[3 * H + j] = hn;
        h[j] = (hp[j] - n) * z + n;
      }
    }
  }
}

std::vector<Tensor> gru_reset_after_fwd_into(const Tensor& gi, const Tensor& h0, const Tensor& whh, const Tensor& bhh,
                                             Outs into, const int64_t* act = nullptr) {
  check({&gi, &h0, &whh, &bhh}, "gru_reset_after_fwd");
  const int64_t T = gi.size(0), B = gi.size(1), H = h0.size(1);
  TORCH_CHECK(gi.dim() == 3 && T >= 1 && gi.size(2) == 3 * H && h0.size(0) == B, "gru_reset_after_fwd: shapes");
  auto o = gi.options();
  Tensor hbuf = out_or(into, 0, {T + 1, B, H}, o), gates = out_or(into, 1, {T, B, 4 * H}, o);
  hbuf.select(0, 0).copy_(h0);
  Tensor gh = at::empty({B, 3 * H}, o);
  over_rows(B, 3 * H, H, [&](int64_t b0, int64_t b1) {
    if (gi.scalar_type() == at::kFloat)
      grua_fwd<float>(gi, whh, bhh, hbuf, gates, gh, b0, b1, act);
    else
      grua_fwd<double>(gi, whh, bhh, hbuf, gates, gh, b0, b1, act);
  });
  return {hbuf, gates};
}
std::vector<Tensor> gru_reset_after_fwd(const Tensor& gi, const Tensor& h0, const Tensor& whh, const Tensor& bhh) {
  return gru_reset_after_fwd_into(gi, h0, whh, bhh, nullptr);
}

template <typename T_>
void grua_bwd(const Tensor& dhs, const Tensor& whh, const Tensor& hbuf, const Tensor& gates, Tensor& dgi,
              Tensor& dgh, Tensor& dh, const int64_t* act) {
  OneBlasThread one_blas_thread;
  const int64_t T = dhs.size(0), B = dhs.size(1), H = dhs.size(2), G = 3 * H, BH = B * H;
  T_* __restrict__ pdh = dh.data_ptr<T_>();
  for (int64_t t = T - 1; t >= 0; --t) {
    const T_* __restrict__ pg = gates.data_ptr<T_>() + t * B * 4 * H;
    const T_* __restrict__ php = hbuf.data_ptr<T_>() + t * BH;
    const T_* __restrict__ pdo = dhs.data_ptr<T_>() + t * BH;
    T_* __restrict__ pdi = dgi.data_ptr<T_>() + t * B * G;
    T_* __restrict__ pdg = dgh.data_ptr<T_>() + t * B * G;
    const int64_t e = rows_at(act, t, B);
    zero_rows(pdi, e, B, G);
    zero_rows(pdg, e, B, G);  // read whole by the weight gradients' product and sum
    if (e == 0) continue;
    for (int64_t b = 0; b < e; ++b) {
      const T_* __restrict__ g = pg + b * 4 * H;
      const T_* __restrict__ hp = php + b * H;
      const T_* __restrict__ dho = pdo + b * H;
      T_* __restrict__ di = pdi + b * G;
      T_* __restrict__ dg = pdg + b * G;
      T_* __restrict__ dhb = pdh + b * H;
#pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) {
        const T_ r = g[j], z = g[H + j], n = g[2 * H + j], hn = g[3 * H + j];
        const T_ dht = dhb[j] + dho[j];
        const T_ dan = dht * (1 - z) * (1 - n * n);
        const T_ daz = dht * (hp[j] - n) * (z * (1 - z));
        const T_ dar = dan * hn * (r * (1 - r));
        di[j] = dar;
        di[H + j] = daz;
        di[2 * H + j] = dan;
        dg[j] = dar;
        dg[H + j] = daz;
        dg[2 * H + j] = dan * r;
        dhb[j] = dht * z;
      }
    }
    gemm<T_>(pdh, e, H, dgh.data_ptr<T_>() + t * B * G, G, G, whh, false, 1.0);  // + d gh_t W_hh
  }
}

std::vector<Tensor> gru_reset_after_bwd_into(const Tensor& dhs, const Tensor& dhT, const Tensor& whh,
                                             const Tensor& hbuf, const Tensor& gates, Outs into,
                                             const int64_t* act = nullptr) {
  check({&dhs, &dhT, &whh, &hbuf, &gates}, "gru_reset_after_bwd");
  const int64_t T = dhs.size(0), B = dhs.size(1), H = dhs.size(2);
  auto o = dhs.options();
  Tensor dgi = out_or(into, 0, {T, B, 3 * H}, o), dgh = at::empty({T, B, 3 * H}, o);
  Tensor dh = out_or(into, 1, {B, H}, o);
  dh.copy_(dhT);
  if (dhs.scalar_type() == at::kFloat)
    grua_bwd<float>(dhs, whh, hbuf, gates, dgi, dgh, dh, act);
  else
    grua_bwd<double>(dhs, whh, hbuf, gates, dgi, dgh, dh, act);
  Tensor dgh2 = dgh.view({T * B, 3 * H});
  Tensor dwhh = out_or(into, 2, {3 * H, H}, o), dbhh = out_or(into, 3, {3 * H}, o);
  at::mm_out(dwhh, dgh2.t(), hbuf.narrow(0, 0, T).reshape({T * B, H}));
  at::sum_out(dbhh, dgh2, {0});
  return {dgi, dh, dwhh, dbhh};
}
std::vector<Tensor> gru_reset_after_bwd(const Tensor& dhs, const Tensor& dhT, const Tensor& whh,
                                        const Tensor& hbuf, const Tensor& gates) {
  return gru_reset_after_bwd_into(dhs, dhT, whh, hbuf, gates, nullptr);
}

// ==== K models at once =============================================================================
// The *_stacked ops take K models' tensors stacked on a leading dim, member-major and contiguous: xw
// (K, T, B, G), states (K, B, H), weights (K, ...), and lengths: either K numbers, lengths[k] the steps
// model k runs (1..T), or K x B, each sequence's own length (model k's rows sorted longest first; model k
// runs its longest, and each row stops at its own end: `rows_at`). They
// return stacked outputs: the buffers (K, T+1, B, H) / (K, T, B, ...) and the per-model gradients
// (K, ...). Model k's loop reads and writes only its own rows, views of the stacked tensors (nothing is
// copied in or out), so the K models run in parallel (`in_parallel` above); each model's row chunks run
// one after another on its thread. The first output's slots after model k's own steps are zeros: hs (the
// slots 1..T of the first forward output) and d xw are read whole by the layers around the loop.
Tensor first_steps(const Tensor& t, int64_t k, int64_t n) { return t.select(0, k).narrow(0, 0, n); }

std::vector<Tensor> stacked_empty(int64_t K, std::initializer_list<std::vector<int64_t>> shapes, const at::TensorOptions& o) {
  std::vector<Tensor> outs;
  for (const auto& s : shapes) {
    std::vector<int64_t> full = {K};
    full.insert(full.end(), s.begin(), s.end());
    outs.push_back(at::empty(full, o));
  }
  return outs;
}

// f(k, n, views, act): model k's loop over its n steps into `views` of `outs` (the first n_timed outputs
// have a time dim of T or T+1 after K: the view holds the first n or n+1 slots; the others: the whole row
// k), act its rows running at each step (nullptr: all).
template <typename F>
std::vector<Tensor> over_models(const char* op, const Tensor& xw, at::IntArrayRef lengths, std::vector<Tensor> outs,
                                size_t n_timed, std::initializer_list<const Tensor*> stacked, const F& f) {
  TORCH_CHECK(xw.dim() == 4, "rnnbench_fast::", op, ": xw must be (K, T, B, G)");
  const int64_t K = xw.size(0), T = xw.size(1), B = xw.size(2), L = static_cast<int64_t>(lengths.size());
  TORCH_CHECK(L == K || L == K * B, "rnnbench_fast::", op, ": give one length per model or one per sequence (K x B)");
  for (int64_t n : lengths) TORCH_CHECK(n >= 1 && n <= T, "rnnbench_fast::", op, ": lengths must lie in 1..T");
  const bool per_row = L == K * B && B > 1;
  std::vector<std::vector<int64_t>> act(per_row ? K : 0);
  for (int64_t k = 0; per_row && k < K; ++k) {
    const int64_t* rows = lengths.data() + k * B;
    for (int64_t b = 1; b < B; ++b)
      TORCH_CHECK(rows[b] <= rows[b - 1], "rnnbench_fast::", op, ": each model's sequence lengths must be sorted longest first");
    act[k].assign(rows[0], 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < rows[b]; ++t) ++act[k][t];
  }
  for (const Tensor* t : stacked)
    TORCH_CHECK(t->dim() >= 1 && t->size(0) == K && t->is_contiguous(), "rnnbench_fast::", op,
                ": every tensor needs one contiguous row per model");
  in_parallel(K, [&](int64_t k) {
    const int64_t n = per_row ? lengths[k * B] : lengths[L == K ? k : k * B];
    std::vector<Tensor> views;
    for (size_t i = 0; i < outs.size(); ++i)
      views.push_back(i < n_timed ? first_steps(outs[i], k, n + outs[i].size(1) - T) : outs[i].select(0, k));
    f(k, n, &views, per_row ? act[k].data() : nullptr);
    Tensor mine = outs[0].select(0, k);
    const int64_t used = n + mine.size(0) - T, slot = mine.stride(0) * mine.element_size();
    std::memset(static_cast<char*>(mine.data_ptr()) + used * slot, 0, (mine.size(0) - used) * slot);
  });
  return outs;
}

// The peephole LSTM's stacked ops, and those of its linear-activation ablations (A: Act above).
template <int A, bool Full = false>
std::vector<Tensor> peephole_fwd_stacked(const char* op, const Tensor& xw, at::IntArrayRef lengths, const Tensor& h0,
                                         const Tensor& c0, const Tensor& whh, const Tensor& wci, const Tensor& wcf,
                                         const Tensor& wco) {
  const int64_t K = xw.size(0), T = xw.size(1), B = xw.size(2), H = c0.size(-1), Z = h0.size(-1);
  auto outs = stacked_empty(K, {{T + 1, B, Z}, {T + 1, B, H}, {T, B, 4 * H}, {T, B, H}}, xw.options());
  return over_models(op, xw, lengths, outs, 4, {&xw, &h0, &c0, &whh, &wci, &wcf, &wco},
                     [&](int64_t k, int64_t n, Outs into, const int64_t* act) {
    lstm_forward<true, A, Full>(op, first_steps(xw, k, n), h0[k], c0[k], whh[k], wci[k], wcf[k], wco[k], into, act);
  });
}

template <int A, bool Full = false>
std::vector<Tensor> peephole_bwd_stacked(const char* op, const Tensor& dhs, at::IntArrayRef lengths, const Tensor& dhT,
                                         const Tensor& dcT, const Tensor& whh, const Tensor& wci, const Tensor& wcf,
                                         const Tensor& wco, const Tensor& hbuf, const Tensor& cbuf, const Tensor& gates,
                                         const Tensor& tcs) {
  const int64_t K = dhs.size(0), T = dhs.size(1), B = dhs.size(2), H = dcT.size(-1), Z = dhs.size(3);
  auto outs = stacked_empty(K, {{T, B, 4 * H}, {B, Z}, {B, H}, {4 * H, Z}, {H}, {H}, {H}}, dhs.options());
  return over_models(op, dhs, lengths, outs, 1,
                     {&dhs, &dhT, &dcT, &whh, &wci, &wcf, &wco, &hbuf, &cbuf, &gates, &tcs}, [&](int64_t k, int64_t n, Outs into, const int64_t* act) {
    lstm_backward<true, A, Full>(op, first_steps(dhs, k, n), dhT[k], dcT[k], whh[k], wci[k], wcf[k], wco[k],
                           first_steps(hbuf, k, n + 1), first_steps(cbuf, k, n + 1), first_steps(gates, k, n),
                           first_steps(tcs, k, n), into, act);
  });
}

// xw (K, T, B, 4H), lengths, h0, c0 (K, B, H), whh (K, 4H, H), wci, wcf, wco (K, H): as peephole_lstm_fwd per model.
// FGR (Full): h0 (K, B, 4H) is z_0 and whh (K, 4H, 4H) (see lstm_fwd).
#define RNNBENCH_PEEPHOLE_OPS(name, A, Full)                                                                       \
  std::vector<Tensor> name##_fwd_stacked(const Tensor& xw, at::IntArrayRef lengths, const Tensor& h0,           \
                                         const Tensor& c0, const Tensor& whh, const Tensor& wci,                \
                                         const Tensor& wcf, const Tensor& wco) {                                \
    return peephole_fwd_stacked<A, Full>(#name "_fwd_stacked", xw, lengths, h0, c0, whh, wci, wcf, wco);              \
  }                                                                                                             \
  std::vector<Tensor> name##_bwd_stacked(const Tensor& dhs, at::IntArrayRef lengths, const Tensor& dhT,         \
                                         const Tensor& dcT, const Tensor& whh, const Tensor& wci,               \
                                         const Tensor& wcf, const Tensor& wco, const Tensor& hbuf,              \
                                         const Tensor& cbuf, const Tensor& gates, const Tensor& tcs) {          \
    return peephole_bwd_stacked<A, Full>(#name "_bwd_stacked", dhs, lengths, dhT, dcT, whh, wci, wcf, wco, hbuf,      \
                                   cbuf, gates, tcs);                                                          \
  }
RNNBENCH_PEEPHOLE_OPS(peephole_lstm, kTanhBoth, false)
RNNBENCH_PEEPHOLE_OPS(lstm_niaf, kLinearInput, false)
RNNBENCH_PEEPHOLE_OPS(lstm_noaf, kLinearOutput, false)
RNNBENCH_PEEPHOLE_OPS(lstm_fgr, kTanhBoth, true)
#undef RNNBENCH_PEEPHOLE_OPS

std::vector<Tensor> lstm_fwd_stacked(const Tensor& xw, at::IntArrayRef lengths, const Tensor& h0, const Tensor& c0,
                                     const Tensor& whh) {
  const int64_t K = xw.size(0), T = xw.size(1), B = xw.size(2), H = h0.size(-1);
  auto outs = stacked_empty(K, {{T + 1, B, H}, {T + 1, B, H}, {T, B, 4 * H}, {T, B, H}}, xw.options());
  return over_models("lstm_fwd_stacked", xw, lengths, outs, 4, {&xw, &h0, &c0, &whh}, [&](int64_t k, int64_t n, Outs into, const int64_t* act) {
    lstm_forward<false>("lstm_fwd", first_steps(xw, k, n), h0[k], c0[k], whh[k], whh[k], whh[k], whh[k], into, act);
  });
}

std::vector<Tensor> lstm_bwd_stacked(const Tensor& dhs, at::IntArrayRef lengths, const Tensor& dhT, const Tensor& dcT,
                                     const Tensor& whh, const Tensor& hbuf, const Tensor& cbuf, const Tensor& gates,
                                     const Tensor& tcs) {
  const int64_t K = dhs.size(0), T = dhs.size(1), B = dhs.size(2), H = dhs.size(3);
  auto outs = stacked_empty(K, {{T, B, 4 * H}, {B, H}, {B, H}, {4 * H, H}}, dhs.options());
  return over_models("lstm_bwd_stacked", dhs, lengths, outs, 1, {&dhs, &dhT, &dcT, &whh, &hbuf, &cbuf, &gates, &tcs},
                     [&](int64_t k, int64_t n, Outs into, const int64_t* act) {
    lstm_backward<false>("lstm_bwd", first_steps(dhs, k, n), dhT[k], dcT[k], whh[k], whh[k], whh[k], whh[k],
                         first_steps(hbuf, k, n + 1), first_steps(cbuf, k, n + 1), first_steps(gates, k, n),
                         first_steps(tcs, k, n), into, act);
  });
}

std::vector<Tensor> gru_reset_before_fwd_stacked(const Tensor& xw, at::IntArrayRef lengths, const Tensor& h0, const Tensor& whh) {
  const int64_t K = xw.size(0), T = xw.size(1), B = xw.size(2), H = h0.size(-1);
  auto outs = stacked_empty(K, {{T + 1, B, H}, {T, B, 3 * H}, {T, B, H}}, xw.options());
  return over_models("gru_reset_before_fwd_stacked", xw, lengths, outs, 3, {&xw, &h0, &whh}, [&](int64_t k, int64_t n, Outs into, const int64_t* act) {
    gru_reset_before_fwd_into(first_steps(xw, k, n), h0[k], whh[k], into, act);
  });
}

std::vector<Tensor> gru_reset_before_bwd_stacked(const Tensor& dhs, at::IntArrayRef lengths, const Tensor& dhT, const Tensor& whh,
                                                 const Tensor& hbuf, const Tensor& gates, const Tensor& rh) {
  const int64_t K = dhs.size(0), T = dhs.size(1), B = dhs.size(2), H = dhs.size(3);
  auto outs = stacked_empty(K, {{T, B, 3 * H}, {B, H}, {3 * H, H}}, dhs.options());
  return over_models("gru_reset_before_bwd_stacked", dhs, lengths, outs, 1, {&dhs, &dhT, &whh, &hbuf, &gates, &rh},
                     [&](int64_t k, int64_t n, Outs into, const int64_t* act) {
    gru_reset_before_bwd_into(first_steps(dhs, k, n), dhT[k], whh[k], first_steps(hbuf, k, n + 1), first_steps(gates, k, n),
                              first_steps(rh, k, n), into, act);
  });
}

std::vector<Tensor> gru_reset_after_fwd_stacked(const Tensor& gi, at::IntArrayRef lengths, const Tensor& h0, const Tensor& whh,
                                                const Tensor& bhh) {
  const int64_t K = gi.size(0), T = gi.size(1), B = gi.size(2), H = h0.size(-1);
  auto outs = stacked_empty(K, {{T + 1, B, H}, {T, B, 4 * H}}, gi.options());
  return over_models("gru_reset_after_fwd_stacked", gi, lengths, outs, 2, {&gi, &h0, &whh, &bhh}, [&](int64_t k, int64_t n, Outs into, const int64_t* act) {
    gru_reset_after_fwd_into(first_steps(gi, k, n), h0[k], whh[k], bhh[k], into, act);
  });
}

std::vector<Tensor> gru_reset_after_bwd_stacked(const Tensor& dhs, at::IntArrayRef lengths, const Tensor& dhT, const Tensor& whh,
                                                const Tensor& hbuf, const Tensor& gates) {
  const int64_t K = dhs.size(0), T = dhs.size(1), B = dhs.size(2), H = dhs.size(3);
  auto outs = stacked_empty(K, {{T, B, 3 * H}, {B, H}, {3 * H, H}, {3 * H}}, dhs.options());
  return over_models("gru_reset_after_bwd_stacked", dhs, lengths, outs, 1, {&dhs, &dhT, &whh, &hbuf, &gates},
                     [&](int64_t k, int64_t n, Outs into, const int64_t* act) {
    gru_reset_after_bwd_into(first_steps(dhs, k, n), dhT[k], whh[k], first_steps(hbuf, k, n + 1), first_steps(gates, k, n), into, act);
  });
}

std::vector<Tensor> tanh_rnn_fwd_stacked(const Tensor& xw, at::IntArrayRef lengths, const Tensor& h0, const Tensor& whh) {
  const int64_t K = xw.size(0), T = xw.size(1), B = xw.size(2), H = h0.size(-1);
  auto outs = stacked_empty(K, {{T + 1, B, H}}, xw.options());
  return over_models("tanh_rnn_fwd_stacked", xw, lengths, outs, 1, {&xw, &h0, &whh}, [&](int64_t k, int64_t n, Outs into, const int64_t* act) {
    tanh_rnn_fwd_into(first_steps(xw, k, n), h0[k], whh[k], into, act);
  });
}

std::vector<Tensor> tanh_rnn_bwd_stacked(const Tensor& dhs, at::IntArrayRef lengths, const Tensor& dhT, const Tensor& whh,
                                         const Tensor& hbuf) {
  const int64_t K = dhs.size(0), T = dhs.size(1), B = dhs.size(2), H = dhs.size(3);
  auto outs = stacked_empty(K, {{T, B, H}, {B, H}, {H, H}}, dhs.options());
  return over_models("tanh_rnn_bwd_stacked", dhs, lengths, outs, 1, {&dhs, &dhT, &whh, &hbuf}, [&](int64_t k, int64_t n, Outs into, const int64_t* act) {
    tanh_rnn_bwd_into(first_steps(dhs, k, n), dhT[k], whh[k], first_steps(hbuf, k, n + 1), into, act);
  });
}

// ==== per-model linear maps over each sequence's own steps =========================================
// x (K, T, B, D) with any strides but a unit last one (the layer's input as it is: a permuted view of
// the batch, or the layer below's outputs), lengths (K x B, member-major): sequence b of model k has
// lengths[k B + b] steps; W (K, O, D), b (K, O). y (K, T, B, O) contiguous: y[k, t, b] = W_k x[k, t, b]
// + b_k for t < its length, 0 after. One strided product per sequence (its steps are evenly spaced in
// both x and y), the models in parallel: the input projection of sequences of unequal lengths computes
// no padded step and copies no input.

// Row-major C (M, N; row stride ldc) = beta C + op(A) op(Bm): op(A) (M, Kd) from A stored (M, Kd) with row
// stride lda, or stored (Kd, M) when ta; op(Bm) (Kd, N) likewise (tb: stored (N, Kd)).
template <typename T_>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t Kd, const T_* A, int64_t lda, const T_* Bm, int64_t ldb,
             double beta, T_* C, int64_t ldc, const at::TensorOptions& o) {
  if (M == 0 || N == 0) return;
  if (have_blas(C)) {  // column-major C^T = op(Bm)^T op(A)^T
    blas_gemm(tb ? "T" : "N", ta ? "T" : "N", static_cast<int>(N), static_cast<int>(M), static_cast<int>(Kd), T_(1), Bm,
              static_cast<int>(ldb), A, static_cast<int>(lda), static_cast<T_>(beta), C, static_cast<int>(ldc));
    return;
  }
  Tensor a = ta ? at::from_blob(const_cast<T_*>(A), {Kd, M}, {lda, 1}, o).t() : at::from_blob(const_cast<T_*>(A), {M, Kd}, {lda, 1}, o);
  Tensor bm = tb ? at::from_blob(const_cast<T_*>(Bm), {N, Kd}, {ldb, 1}, o).t() : at::from_blob(const_cast<T_*>(Bm), {Kd, N}, {ldb, 1}, o);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, o);
  if (beta == 0.0)
    c.copy_(at::mm(a, bm));
  else
    c.add_(at::mm(a, bm));
}

void check_steps_linear(const Tensor& x, at::IntArrayRef lengths, const Tensor& W, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && W.device().is_cpu(), "rnnbench_fast::", op, ": tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == W.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "rnnbench_fast::", op, ": float32 or float64, one dtype");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && W.dim() == 3 && W.is_contiguous() && W.size(0) == x.size(0) &&
                  W.size(2) == x.size(3), "rnnbench_fast::", op, ": shapes");
  TORCH_CHECK(static_cast<int64_t>(lengths.size()) == x.size(0) * x.size(2), "rnnbench_fast::", op, ": one length per sequence");
  for (int64_t n : lengths) TORCH_CHECK(n >= 0 && n <= x.size(1), "rnnbench_fast::", op, ": lengths must lie in 0..T");
}

template <typename T_>
void steps_fwd(const Tensor& x, at::IntArrayRef lengths, const Tensor& W, const Tensor& bias, Tensor& y, int64_t k) {
  const int64_t T = x.size(1), B = x.size(2), D = x.size(3), O = W.size(1);
  const T_* __restrict__ pb = bias.data_ptr<T_>() + k * O;
  const T_* Wk = W.data_ptr<T_>() + k * O * D;
  T_* yk = y.data_ptr<T_>() + k * T * B * O;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lengths[k * B + b];
    T_* yb = yk + b * O;
    for (int64_t t = 0; t < L; ++t) std::memcpy(yb + t * B * O, pb, O * sizeof(T_));
    for (int64_t t = L; t < T; ++t) std::memset(yb + t * B * O, 0, O * sizeof(T_));
    const T_* xb = x.data_ptr<T_>() + k * x.stride(0) + b * x.stride(2);
    gemm_rm<T_>(false, true, L, O, D, xb, x.stride(1), Wk, D, 1.0, yb, B * O, x.options());  // + x W_k^T
  }
}

Tensor steps_linear_fwd(const Tensor& x, at::IntArrayRef lengths, const Tensor& W, const Tensor& b) {
  check_steps_linear(x, lengths, W, "steps_linear_fwd");
  TORCH_CHECK(b.is_contiguous() && b.dim() == 2 && b.size(0) == W.size(0) && b.size(1) == W.size(1) &&
                  b.scalar_type() == W.scalar_type(), "rnnbench_fast::steps_linear_fwd: bias shape");
  Tensor y = at::empty({x.size(0), x.size(1), x.size(2), W.size(1)}, x.options());
  in_parallel(x.size(0), [&](int64_t k) {
    OneBlasThread one_blas_thread;
    if (x.scalar_type() == at::kFloat)
      steps_fwd<float>(x, lengths, W, b, y, k);
    else
      steps_fwd<double>(x, lengths, W, b, y, k);
  });
  return y;
}

template <typename T_>
void steps_bwd(const Tensor& dy, const Tensor& x, at::IntArrayRef lengths, const Tensor& W, Tensor& dx, Tensor& dW,
               Tensor& db, int64_t k) {
  const int64_t T = x.size(1), B = x.size(2), D = x.size(3), O = W.size(1);
  const T_* Wk = W.data_ptr<T_>() + k * O * D;
  const T_* dyk = dy.data_ptr<T_>() + k * T * B * O;
  T_* dWk = dW.data_ptr<T_>() + k * O * D;
  std::vector<double> acc(O, 0.0);  // db_k: the steps' sum, in double whatever T_ is
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lengths[k * B + b];
    const T_* g = dyk + b * O;
    const T_* xb = x.data_ptr<T_>() + k * x.stride(0) + b * x.stride(2);
    gemm_rm<T_>(true, false, O, D, L, g, B * O, xb, x.stride(1), 1.0, dWk, D, x.options());  // dW_k += dy_b^T x_b
    if (dx.defined())
      gemm_rm<T_>(false, false, L, D, O, g, B * O, Wk, D, 0.0, dx.data_ptr<T_>() + k * T * B * D + b * D, B * D,
                  x.options());  // dx_b = dy_b W_k
    for (int64_t t = 0; t < L; ++t)
      for (int64_t o = 0; o < O; ++o) acc[o] += static_cast<double>(g[t * B * O + o]);
  }
  T_* pdb = db.data_ptr<T_>() + k * O;
  for (int64_t o = 0; o < O; ++o) pdb[o] = static_cast<T_>(acc[o]);
}

// dy (K, T, B, O) contiguous -> dx (K, T, B, D) contiguous (0 after each sequence's end; an empty tensor
// when need_dx is false: x is data), dW (K, O, D), db (K, O).
std::vector<Tensor> steps_linear_bwd(const Tensor& dy, const Tensor& x, at::IntArrayRef lengths, const Tensor& W,
                                     bool need_dx) {
  check_steps_linear(x, lengths, W, "steps_linear_bwd");
  TORCH_CHECK(dy.is_contiguous() && dy.dim() == 4 && dy.size(0) == x.size(0) && dy.size(1) == x.size(1) &&
                  dy.size(2) == x.size(2) && dy.size(3) == W.size(1) && dy.scalar_type() == x.scalar_type(),
              "rnnbench_fast::steps_linear_bwd: shapes");
  Tensor dx = need_dx ? at::zeros({x.size(0), x.size(1), x.size(2), x.size(3)}, x.options()) : Tensor();
  Tensor dW = at::zeros({W.size(0), W.size(1), W.size(2)}, W.options()), db = at::empty({W.size(0), W.size(1)}, W.options());
  in_parallel(x.size(0), [&](int64_t k) {
    OneBlasThread one_blas_thread;
    if (x.scalar_type() == at::kFloat)
      steps_bwd<float>(dy, x, lengths, W, dx, dW, db, k);
    else
      steps_bwd<double>(dy, x, lengths, W, dx, dW, db, k);
  });
  return {need_dx ? dx : at::empty({0}, x.options()), dW, db};
}

// ==== per-model linear maps over rows ===============================================================
// x (R, D) rows; model k owns rows [starts[k], starts[k] + counts[k]) (disjoint, in any order); W (K, O, D),
// b (K, O). y (R, O): y_r = W_k x_r + b_k on model k's rows, 0 on rows no model owns. The population's
// output layer over the packed valid steps uses it: one product per model, the models in parallel.
// With `coords` (R, x.dim() - 1) int64 (not empty), row r is x's row at those coordinates instead, x any
// (..., D) tensor with a unit last stride: the rows are read where they lie (e.g. the loop's member- and
// time-major outputs, seen batch-major), each model's gathered into a buffer of its own that stays in
// cache, where a gather beforehand would write and read all of them once more.
struct Rows {
  int64_t R = 0, D = 0;
  std::vector<int64_t> x_off;  // element offset of each row in x (empty: row r at r * D, x (R, D) contiguous)
};

std::vector<int64_t> row_offsets(const Tensor& coords, at::IntArrayRef sizes, at::IntArrayRef strides, const char* op) {
  const int64_t R = coords.size(0), n = coords.size(1);
  const int64_t* c = coords.data_ptr<int64_t>();
  std::vector<int64_t> off(R);
  for (int64_t r = 0; r < R; ++r) {
    int64_t o = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t v = c[r * n + j];
      TORCH_CHECK(v >= 0 && v < sizes[j], "rnnbench_fast::", op, ": row coordinates out of range");
      o += v * strides[j];
    }
    off[r] = o;
  }
  return off;
}

Rows check_rows(const Tensor& x, const Tensor& coords, at::IntArrayRef starts, at::IntArrayRef counts, const Tensor& W,
                const char* op) {
  check({&W}, op);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == W.scalar_type(), "rnnbench_fast::", op, ": x must be W's dtype on the CPU");
  Rows rows;
  rows.D = x.size(-1);
  TORCH_CHECK(x.dim() >= 2 && W.dim() == 3 && W.size(2) == rows.D, "rnnbench_fast::", op, ": shapes");
  if (coords.numel() == 0) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "rnnbench_fast::", op, ": x must be (R, D) contiguous without coordinates");
    rows.R = x.size(0);
  } else {
    TORCH_CHECK(coords.device().is_cpu() && coords.scalar_type() == at::kLong && coords.is_contiguous() && coords.dim() == 2 &&
                    coords.size(1) == x.dim() - 1, "rnnbench_fast::", op, ": coordinates must be (R, x.dim() - 1) int64");
    TORCH_CHECK(x.stride(-1) == 1, "rnnbench_fast::", op, ": x must have a unit last stride");
    rows.R = coords.size(0);
    rows.x_off = row_offsets(coords, x.sizes(), x.strides(), op);
  }
  TORCH_CHECK(static_cast<int64_t>(starts.size()) == W.size(0) && static_cast<int64_t>(counts.size()) == W.size(0),
              "rnnbench_fast::", op, ": one start and one count per model");
  for (size_t k = 0; k < starts.size(); ++k)
    TORCH_CHECK(starts[k] >= 0 && counts[k] >= 0 && starts[k] + counts[k] <= rows.R, "rnnbench_fast::", op,
                ": rows out of range");
  return rows;
}

// Rows [0, R) that no model owns are zeroed, and only those: the owned ones are written whole.
template <typename T_>
void zero_unowned(T_* base, int64_t R, int64_t width, at::IntArrayRef starts, at::IntArrayRef counts) {
  std::vector<std::pair<int64_t, int64_t>> owned;
  for (size_t k = 0; k < starts.size(); ++k)
    if (counts[k] > 0) owned.emplace_back(starts[k], starts[k] + counts[k]);
  std::sort(owned.begin(), owned.end());
  int64_t next = 0;
  for (const auto& [a, b] : owned) {
    zero_rows(base, next, a, width);
    next = std::max(next, b);
  }
  zero_rows(base, next, R, width);
}

void zero_unowned_rows(Tensor& y, at::IntArrayRef starts, at::IntArrayRef counts) {
  if (y.scalar_type() == at::kFloat)
    zero_unowned<float>(y.data_ptr<float>(), y.size(0), y.size(1), starts, counts);
  else
    zero_unowned<double>(y.data_ptr<double>(), y.size(0), y.size(1), starts, counts);
}

// Model k's rows of x: a pointer to them where they are consecutive, else gathered into `buf`.
template <typename T_>
const T_* model_rows(const Tensor& x, const Rows& rows, int64_t start, int64_t count, std::vector<T_>& buf) {
  const T_* px = x.data_ptr<T_>();
  if (rows.x_off.empty()) return px + start * rows.D;
  buf.resize(count * rows.D);
  for (int64_t r = 0; r < count; ++r) std::memcpy(buf.data() + r * rows.D, px + rows.x_off[start + r], rows.D * sizeof(T_));
  return buf.data();
}

// The workers below use the BLAS (one thread each) and plain loops only: an ATen elementwise op on a
// worker thread would start its own OpenMP team there.
template <typename T_>
void rows_fwd(const Tensor& x, const Rows& rows, const Tensor& Wk, const Tensor& bk, Tensor& y, int64_t start, int64_t count) {
  const int64_t D = rows.D, O = Wk.size(0);
  T_* __restrict__ py = y.data_ptr<T_>() + start * O;
  const T_* __restrict__ pb = bk.data_ptr<T_>();
  for (int64_t r = 0; r < count; ++r) std::memcpy(py + r * O, pb, O * sizeof(T_));
  std::vector<T_> buf;
  gemm<T_>(py, count, O, model_rows<T_>(x, rows, start, count, buf), D, D, Wk, true, 1.0);
}

Tensor rows_linear_fwd(const Tensor& x, const Tensor& coords, at::IntArrayRef starts, at::IntArrayRef counts, const Tensor& W,
                       const Tensor& b) {
  const Rows rows = check_rows(x, coords, starts, counts, W, "rows_linear_fwd");
  check({&W, &b}, "rows_linear_fwd");
  TORCH_CHECK(b.dim() == 2 && b.size(0) == W.size(0) && b.size(1) == W.size(1), "rnnbench_fast::rows_linear_fwd: bias shape");
  Tensor y = at::empty({rows.R, W.size(1)}, W.options());
  zero_unowned_rows(y, starts, counts);
  in_parallel(W.size(0), [&](int64_t k) {
    if (counts[k] == 0) return;
    OneBlasThread one_blas_thread;
    if (x.scalar_type() == at::kFloat)
      rows_fwd<float>(x, rows, W[k], b[k], y, starts[k], counts[k]);
    else
      rows_fwd<double>(x, rows, W[k], b[k], y, starts[k], counts[k]);
  });
  return y;
}

template <typename T_>
void rows_bwd(const Tensor& dy, const Tensor& x, const Rows& rows, const std::vector<int64_t>& dx_off, const Tensor& Wk,
              Tensor& dx, Tensor& dWk, Tensor& dbk, int64_t start, int64_t count) {
  const int64_t D = rows.D, O = Wk.size(0);
  const T_* __restrict__ g = dy.data_ptr<T_>() + start * O;
  std::vector<T_> buf;
  const T_* xk = model_rows<T_>(x, rows, start, count, buf);
  // dW_k = dy^T x (O, D), over the model's rows
  Tensor xr = at::from_blob(const_cast<T_*>(xk), {count, D}, dWk.options());
  at::mm_out(dWk, dy.narrow(0, start, count).t(), xr);
  if (dx.defined()) {  // dx = dy W_k, on x's rows (scattered back where they lie)
    if (dx_off.empty()) {
      gemm<T_>(dx.data_ptr<T_>() + start * D, count, D, g, O, O, Wk, false, 0.0);
    } else {
      buf.resize(count * D);
      gemm<T_>(buf.data(), count, D, g, O, O, Wk, false, 0.0);
      T_* pdx = dx.data_ptr<T_>();
      for (int64_t r = 0; r < count; ++r) std::memcpy(pdx + dx_off[start + r], buf.data() + r * D, D * sizeof(T_));
    }
  }
  std::vector<double> acc(O, 0.0);  // db_k = the rows' sum, in double whatever T_ is
  for (int64_t r = 0; r < count; ++r)
    for (int64_t o = 0; o < O; ++o) acc[o] += static_cast<double>(g[r * O + o]);
  T_* __restrict__ pdb = dbk.data_ptr<T_>();
  for (int64_t o = 0; o < O; ++o) pdb[o] = static_cast<T_>(acc[o]);
}

// A dense tensor of x's sizes whose dims lie in x's order (by stride): the gradient of a strided view in
// the layout of the tensor it views, so that the op before it reads it without a copy.
Tensor dense_like(const Tensor& x) {
  std::vector<int64_t> order(x.dim());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
  std::vector<int64_t> strides(x.dim());
  int64_t s = 1;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    strides[*it] = s;
    s *= x.size(*it);
  }
  return at::empty_strided(x.sizes(), strides, x.options()).zero_();
}

// dy (R, O) -> dx (0 on rows no model owns; an empty tensor when need_dx is false: x is data) of x's
// sizes (with coordinates: dense, in x's order of dims), dW (K, O, D), db (K, O).
std::vector<Tensor> rows_linear_bwd(const Tensor& dy, const Tensor& x, const Tensor& coords, at::IntArrayRef starts,
                                    at::IntArrayRef counts, const Tensor& W, bool need_dx) {
  const Rows rows = check_rows(x, coords, starts, counts, W, "rows_linear_bwd");
  check({&dy, &W}, "rows_linear_bwd");
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == rows.R && dy.size(1) == W.size(1), "rnnbench_fast::rows_linear_bwd: shapes");
  Tensor dx;
  std::vector<int64_t> dx_off;
  if (need_dx && rows.x_off.empty()) {
    dx = at::empty({rows.R, rows.D}, W.options());
    zero_unowned_rows(dx, starts, counts);
  } else if (need_dx) {
    dx = dense_like(x);  // zeros: rows not read get no gradient
    dx_off = row_offsets(coords, dx.sizes(), dx.strides(), "rows_linear_bwd");
  }
  Tensor dW = at::zeros({W.size(0), W.size(1), W.size(2)}, W.options());
  Tensor db = at::zeros({W.size(0), W.size(1)}, W.options());
  in_parallel(W.size(0), [&](int64_t k) {
    if (counts[k] == 0) return;
    OneBlasThread one_blas_thread;
    Tensor dWk = dW[k], dbk = db[k];
    if (x.scalar_type() == at::kFloat)
      rows_bwd<float>(dy, x, rows, dx_off, W[k], dx, dWk, dbk, starts[k], counts[k]);
    else
      rows_bwd<double>(dy, x, rows, dx_off, W[k], dx, dWk, dbk, starts[k], counts[k]);
  });
  return {need_dx ? dx : at::empty({0}, W.options()), dW, db};
}

// ==== the music tasks' loss: Bernoulli NLL of logits, summed over keys ==============================
// z, y (R, D) contiguous: logits and 0/1 targets. Forward: nll[r] = sum_d softplus(z) - y z (= -log of
// the Bernoulli likelihood, what binary_cross_entropy_with_logits computes per element), in one pass
// (torch's takes four over R x D, and a population's R x D is tens of MB, out of cache). Backward:
// dz = g[r] (sigmoid(z) - y), one pass. Each row's D terms are summed in double (a vectorised sum:
// the order of its terms is the compiler's, which rounding in double does not see). Rows in chunks on the
// threads only when the caller says `parallel` (loops.bernoulli_nll: for a population's R x D; started
// for one model's 32 x 200 x 88 logits, a second thread cost more than it saved).
constexpr int64_t kLossRowsPerChunk = 512;

template <typename T_>
void bnll_rows(const T_* __restrict__ z, const T_* __restrict__ y, const int64_t* y_rows, T_* __restrict__ out, int64_t r0,
               int64_t r1, int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const T_* zr = z + r * D;
    const T_* yr = y + (y_rows ? y_rows[r] : r) * D;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < D; ++d) {
      const T_ a = zr[d];
      const T_ m = a > T_(0) ? a : T_(0);
      sum += static_cast<double>(m + log1p_unit(exp_(-(a > T_(0) ? a : -a))) - yr[d] * a);
    }
    out[r] = static_cast<T_>(sum);
  }
}

template <typename T_>
void bnll_grad_rows(const T_* __restrict__ g, const T_* __restrict__ z, const T_* __restrict__ y, const int64_t* y_rows,
                    T_* __restrict__ dz, int64_t r0, int64_t r1, int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const T_ gr = g[r];
    const T_* zr = z + r * D;
    const T_* yr = y + (y_rows ? y_rows[r] : r) * D;
    T_* dr = dz + r * D;
#pragma GCC ivdep
    for (int64_t d = 0; d < D; ++d) dr[d] = gr * (sigm(zr[d]) - yr[d]);
  }
}

template <typename F>
void over_loss_rows(int64_t R, bool parallel, const F& f) {
  if (!parallel) {
    f(int64_t(0), R);
    return;
  }
  in_parallel((R + kLossRowsPerChunk - 1) / kLossRowsPerChunk,
              [&](int64_t i) { f(i * kLossRowsPerChunk, std::min(R, (i + 1) * kLossRowsPerChunk)); });
}

// y_rows (R,) int64, or empty: row r's targets are y's row y_rows[r] (y (N, D)), read where they lie
// (a population's targets are tens of MB: gathering them first cost as much as the loss), else y's row r.
const int64_t* target_rows(const Tensor& z, const Tensor& y, const Tensor& y_rows, const char* op) {
  TORCH_CHECK(z.dim() == 2 && y.dim() == 2 && y.size(1) == z.size(1), "rnnbench_fast::", op, ": z and y must be (R, D), (N, D)");
  if (y_rows.numel() == 0) {
    TORCH_CHECK(y.size(0) == z.size(0), "rnnbench_fast::", op, ": z and y must have the same rows");
    return nullptr;
  }
  TORCH_CHECK(y_rows.device().is_cpu() && y_rows.scalar_type() == at::kLong && y_rows.is_contiguous() && y_rows.dim() == 1 &&
                  y_rows.size(0) == z.size(0), "rnnbench_fast::", op, ": y_rows must be (R,) int64");
  const int64_t* p = y_rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < y_rows.size(0); ++r)
    TORCH_CHECK(p[r] >= 0 && p[r] < y.size(0), "rnnbench_fast::", op, ": y_rows out of range");
  return p;
}

Tensor bernoulli_nll_fwd(const Tensor& z, const Tensor& y, const Tensor& y_rows, bool parallel) {
  check({&z, &y}, "bernoulli_nll_fwd");
  const int64_t* rows = target_rows(z, y, y_rows, "bernoulli_nll_fwd");
  const int64_t R = z.size(0), D = z.size(1);
  Tensor out = at::empty({R}, z.options());
  over_loss_rows(R, parallel, [&](int64_t r0, int64_t r1) {
    if (z.scalar_type() == at::kFloat)
      bnll_rows<float>(z.data_ptr<float>(), y.data_ptr<float>(), rows, out.data_ptr<float>(), r0, r1, D);
    else
      bnll_rows<double>(z.data_ptr<double>(), y.data_ptr<double>(), rows, out.data_ptr<double>(), r0, r1, D);
  });
  return out;
}

Tensor bernoulli_nll_bwd(const Tensor& g, const Tensor& z, const Tensor& y, const Tensor& y_rows, bool parallel) {
  check({&g, &z, &y}, "bernoulli_nll_bwd");
  const int64_t* rows = target_rows(z, y, y_rows, "bernoulli_nll_bwd");
  TORCH_CHECK(g.dim() == 1 && g.size(0) == z.size(0), "rnnbench_fast::bernoulli_nll_bwd: shapes");
  const int64_t R = z.size(0), D = z.size(1);
  Tensor dz = at::empty({R, D}, z.options());
  over_loss_rows(R, parallel, [&](int64_t r0, int64_t r1) {
    if (z.scalar_type() == at::kFloat)
      bnll_grad_rows<float>(g.data_ptr<float>(), z.data_ptr<float>(), y.data_ptr<float>(), rows, dz.data_ptr<float>(), r0, r1, D);
    else
      bnll_grad_rows<double>(g.data_ptr<double>(), z.data_ptr<double>(), y.data_ptr<double>(), rows, dz.data_ptr<double>(), r0,
                             r1, D);
  });
  return dz;
}

}  // namespace

TORCH_LIBRARY(rnnbench_fast, m) {
  m.def("peephole_lstm_fwd", &peephole_lstm_fwd);
  m.def("peephole_lstm_bwd", &peephole_lstm_bwd);
  m.def("gru_reset_before_fwd", &gru_reset_before_fwd);
  m.def("gru_reset_before_bwd", &gru_reset_before_bwd);
  m.def("gru_reset_after_fwd", &gru_reset_after_fwd);
  m.def("gru_reset_after_bwd", &gru_reset_after_bwd);
  m.def("lstm_fwd", &lstm_fwd_op);
  m.def("lstm_bwd", &lstm_bwd_op);
  m.def("tanh_rnn_fwd", &tanh_rnn_fwd);
  m.def("tanh_rnn_bwd", &tanh_rnn_bwd);
  m.def("rows_linear_fwd", &rows_linear_fwd);
  m.def("rows_linear_bwd", &rows_linear_bwd);
  m.def("steps_linear_fwd", &steps_linear_fwd);
  m.def("steps_linear_bwd", &steps_linear_bwd);
  m.def("peephole_lstm_fwd_stacked", &peephole_lstm_fwd_stacked);
  m.def("peephole_lstm_bwd_stacked", &peephole_lstm_bwd_stacked);
  m.def("gru_reset_before_fwd_stacked", &gru_reset_before_fwd_stacked);
  m.def("gru_reset_before_bwd_stacked", &gru_reset_before_bwd_stacked);
  m.def("gru_reset_after_fwd_stacked", &gru_reset_after_fwd_stacked);
  m.def("gru_reset_after_bwd_stacked", &gru_reset_after_bwd_stacked);
  m.def("lstm_fwd_stacked", &lstm_fwd_stacked);
  m.def("lstm_bwd_stacked", &lstm_bwd_stacked);
  m.def("tanh_rnn_fwd_stacked", &tanh_rnn_fwd_stacked);
  m.def("tanh_rnn_bwd_stacked", &tanh_rnn_bwd_stacked);
  m.def("lstm_niaf_fwd_stacked", &lstm_niaf_fwd_stacked);
  m.def("lstm_niaf_bwd_stacked", &lstm_niaf_bwd_stacked);
  m.def("lstm_noaf_fwd_stacked", &lstm_noaf_fwd_stacked);
  m.def("lstm_noaf_bwd_stacked", &lstm_noaf_bwd_stacked);
  m.def("lstm_fgr_fwd_stacked", &lstm_fgr_fwd_stacked);
  m.def("lstm_fgr_bwd_stacked", &lstm_fgr_bwd_stacked);
  m.def("bernoulli_nll_fwd", &bernoulli_nll_fwd);
  m.def("bernoulli_nll_bwd", &bernoulli_nll_bwd);
}

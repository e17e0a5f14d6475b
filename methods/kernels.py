"""A skinny matrix product for CPU decoding: out[M, N] = x[M, K] @ W[N, K]ᵀ, 16 rows of x a pass.

Decoding and verification multiply 1-16 rows by every weight matrix. BLAS libraries pack the
weight for each such call and reach about half the memory bandwidth there (DESIGN.md §3; on the
2-core EPYC a 2-row LM-head product costs twice a 1-row one). This kernel streams the weight once,
in its row-major torch layout (no copy), and for each weight row keeps one 8-lane AVX2 accumulator
per input row; several weight rows are handled together (8 for one input row, 2-4 for a few) so
each input load serves several FMAs, and the weight rows one block ahead (two for several input
rows) are prefetched. Input rows beyond 8 take another pass over each 64 weight rows while those
are in cache, and beyond 16 another call.

Every output element is computed by the same sequence of operations whatever M is (lane-wise FMAs
in k order, then a fixed-order lane sum), so a k-row product is bit-identical to k 1-row products:
verifying k tokens gives exactly the numbers that decoding them one by one would.

Threads: the kernel has its own small pool (pthreads, not OpenMP). Workers spin for 0.2 ms after
a product, which covers the gaps between the products of one decoding step, then sleep, so an
idle process costs nothing and no pool spins against another library's (OpenMP or OpenBLAS pools
that spin on a 2-core machine slow every product by a scheduler time slice). The environment
variable SPEC_BENCH_KERNEL_SPIN_NS sets the spin in nanoseconds (default 200000).

The C source below is compiled once per machine with the system C compiler (`cc -O3
-march=native -pthread`) into the cache, and called through ctypes, which releases the GIL. On a
machine without a C compiler, AVX2 or FMA, `load()` returns None with the reason in
`unavailable_reason()`, and the runtime keeps its other paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

MAX_ROWS = 16
MAX_WEIGHTS = 8
SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

/* Lane sum in a fixed order, the same for every row count. */
static inline float lane_sum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

/* R weight rows from row n against M input rows. */
#define BLOCK(R, M, PF)                                                                      \
static void block_##R##_##M(const float *x, const float *w, float *out, long N, long K, long n) { \
    __m256 acc[R][M];                                                                        \
    for (int r = 0; r < R; r++) for (int j = 0; j < M; j++) acc[r][j] = _mm256_setzero_ps(); \
    for (long k = 0; k < K; k += 8) {                                                        \
        __m256 xv[M];                                                                        \
        for (int j = 0; j < M; j++) xv[j] = _mm256_loadu_ps(x + j * K + k);                  \
        for (int r = 0; r < R; r++) {                                                        \
            if (PF) _mm_prefetch((const char *)(w + (n + r + PF * R) * K + k), _MM_HINT_T0); \
            __m256 wv = _mm256_loadu_ps(w + (n + r) * K + k);                                \
            for (int j = 0; j < M; j++) acc[r][j] = _mm256_fmadd_ps(wv, xv[j], acc[r][j]);   \
        }                                                                                    \
    }                                                                                        \
    for (int r = 0; r < R; r++) for (int j = 0; j < M; j++) out[j * N + n + r] = lane_sum(acc[r][j]); \
}
BLOCK(8, 1, 1) BLOCK(4, 2, 2) BLOCK(3, 3, 2) BLOCK(2, 4, 2) BLOCK(2, 5, 2) BLOCK(2, 6, 2) BLOCK(1, 7, 2)
BLOCK(1, 8, 2) BLOCK(1, 1, 0) BLOCK(1, 2, 0) BLOCK(1, 3, 0) BLOCK(1, 4, 0) BLOCK(1, 5, 0) BLOCK(1, 6, 0)

typedef void (*block_fn)(const float *, const float *, float *, long, long, long);
static const block_fn WIDE[9] = {0, block_8_1, block_4_2, block_3_3, block_2_4, block_2_5, block_2_6,
                                 block_1_7, block_1_8};
static const long WIDTH[9] = {0, 8, 4, 3, 2, 2, 2, 1, 1};
static const block_fn ONE[9] = {0, block_1_1, block_1_2, block_1_3, block_1_4, block_1_5, block_1_6,
                                block_1_7, block_1_8};

/* Weight rows [n0, n1) against all M input rows; out has row stride N. More than 8 input rows take
   several passes over each 64 weight rows while those are in cache. */
static void rows_range(const float *x, const float *w, float *out, long M, long N, long K, long n0, long n1) {
    for (long b0 = n0; b0 < n1; b0 += 64) {
        long b1 = b0 + 64 < n1 ? b0 + 64 : n1;
        for (long m = 0; m < M; m += 8) {
            long rows = M - m < 8 ? M - m : 8, width = WIDTH[rows], n = b0;
            for (; n + width <= b1; n += width) WIDE[rows](x + m * K, w, out + m * N, N, K, n);
            for (; n < b1; n++) ONE[rows](x + m * K, w, out + m * N, N, K, n);
        }
    }
}

/* ---- a small thread pool ------------------------------------------------------------------
   A product is cut into chunks of weight rows. The caller publishes it by bumping a ticket whose
   high half is the product's generation and low half the next unclaimed chunk; the caller and the
   workers claim chunks with compare-and-swap until none is left, and the caller waits until every
   chunk is done. Workers spin for a while after a product (decoding issues one every few tens of
   microseconds), then sleep on a condition variable, so an idle process costs no CPU. */

#define MAX_WORKERS 255
#define MAX_WEIGHTS 8
/* One product: x against `count` weights side by side (out [M, N], N the sum of their rows). The
   chunks of weight s are numbered from first_chunk[s]; each covers `chunk` of its rows (fewer at
   its end), so no chunk straddles two weights. */
static struct {
    const float *x, *w[MAX_WEIGHTS];
    float *out;
    long M, N, K, rows[MAX_WEIGHTS], offset[MAX_WEIGHTS], chunk, chunks, first_chunk[MAX_WEIGHTS + 1];
} job;
static _Atomic unsigned long long ticket;
static atomic_long done;
static unsigned generation;
static int workers;  /* worker threads started (callers also work) */
static int sleepers;
static long spin_ns = 200000;  /* how long an idle worker spins before it sleeps */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void run_chunks(unsigned gen) {
    for (;;) {
        unsigned long long v = atomic_load(&ticket);
        for (;;) {
            if ((unsigned)(v >> 32) != gen || (long)(v & 0xffffffffu) >= job.chunks) return;
            if (atomic_compare_exchange_weak(&ticket, &v, v + 1)) break;
        }
        long c = (long)(v & 0xffffffffu);
        int s = 0;
        while (c >= job.first_chunk[s + 1]) s++;
        long n0 = (c - job.first_chunk[s]) * job.chunk;
        long n1 = n0 + job.chunk < job.rows[s] ? n0 + job.chunk : job.rows[s];
        rows_range(job.x, job.w[s], job.out + job.offset[s], job.M, job.N, job.K, n0, n1);
        atomic_fetch_add(&done, 1);
    }
}

static void *worker_main(void *unused) {
    (void)unused;
    unsigned seen = (unsigned)(atomic_load(&ticket) >> 32);
    for (;;) {
        unsigned gen = (unsigned)(atomic_load(&ticket) >> 32);
        if (gen == seen) {
            long started = now_ns();
            int spins = 0;
            while ((gen = (unsigned)(atomic_load(&ticket) >> 32)) == seen) {
                _mm_pause();
                if (++spins % 256 == 0 && now_ns() - started > spin_ns) {
                    pthread_mutex_lock(&lock);
                    sleepers++;
                    while ((gen = (unsigned)(atomic_load(&ticket) >> 32)) == seen) pthread_cond_wait(&wake, &lock);
                    sleepers--;
                    pthread_mutex_unlock(&lock);
                    break;
                }
            }
        }
        seen = gen;
        run_chunks(gen);
    }
    return 0;
}

static void reset_after_fork(void) {  /* a forked child has no workers; it starts its own */
    workers = 0;
    sleepers = 0;
    pthread_mutex_init(&lock, 0);
    pthread_cond_init(&wake, 0);
}

static void start_workers(int count) {
    static int registered;
    if (!registered) { pthread_atfork(0, 0, reset_after_fork); registered = 1; }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (; workers < count && workers < MAX_WORKERS; workers++) {
        pthread_t thread;
        if (pthread_create(&thread, &attr, worker_main, 0) != 0) break;
    }
    pthread_attr_destroy(&attr);
}

void set_spin_ns(long ns) { spin_ns = ns; }

/* out[M, N] = x[M, K] @ [w_0; w_1; ...]^T: the weights w_i [rows_i, K] side by side, N the sum of
   their rows; 1 <= M <= 16, K % 8 == 0, 1 <= count <= 8, all row-major and contiguous, on
   `threads` threads (the caller and threads - 1 workers). Not reentrant: one caller at a time.
   Returns 0, or 1 for an unsupported shape. */
int skinny_matmul(const float *x, const float *const *w, const long *rows, int count, float *out, long M, long K,
                  int threads) {
    if (M < 1 || M > 16 || K % 8 != 0 || threads < 1 || count < 1 || count > MAX_WEIGHTS) return 1;
    long N = 0;
    for (int s = 0; s < count; s++) N += rows[s];
    if (threads == 1 || N <= 64) {
        for (long s = 0, offset = 0; s < count; offset += rows[s], s++)
            rows_range(x, w[s], out + offset, M, N, K, 0, rows[s]);
        return 0;
    }
    if (threads - 1 > workers) start_workers(threads - 1);
    long per_thread = (N + threads - 1) / threads;
    long chunk = (per_thread + 7) / 8;  /* about 8 chunks per thread, */
    chunk = (chunk + 63) / 64 * 64;     /* whole blocks of 64 rows */
    job.x = x; job.out = out; job.M = M; job.N = N; job.K = K; job.chunk = chunk;
    job.first_chunk[0] = 0;
    for (int s = 0; s < count; s++) {
        job.w[s] = w[s];
        job.rows[s] = rows[s];
        job.offset[s] = s ? job.offset[s - 1] + rows[s - 1] : 0;
        job.first_chunk[s + 1] = job.first_chunk[s] + (rows[s] + chunk - 1) / chunk;
    }
    job.chunks = job.first_chunk[count];
    atomic_store(&done, 0);
    unsigned gen = ++generation;
    atomic_store(&ticket, (unsigned long long)gen << 32);
    pthread_mutex_lock(&lock);
    if (sleepers) pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    run_chunks(gen);
    while (atomic_load(&done) < job.chunks) _mm_pause();
    return 0;
}
"""
FLAGS = ["-O3", "-march=native", "-pthread", "-shared", "-fPIC"]

_function = None
_reason: str | None = None
_loaded = False
_threads: int | None = None
_lock = threading.Lock()


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spec-bench-harness" / "kernels"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _machine_key() -> str:
    """The compiled library is specific to this CPU (-march=native) and compiler."""
    flags = " ".join(sorted(_cpu_flags()))
    compiler = shutil.which("cc") or ""
    text = "\n".join([SOURCE, " ".join(FLAGS), platform.machine(), flags, compiler])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _build() -> Path:
    target = cache_dir() / f"skinny-{_machine_key()}.so"
    if target.exists():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        source = Path(folder) / "skinny.c"
        source.write_text(SOURCE)
        built = Path(folder) / "skinny.so"
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(source)], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"compiling the kernel failed: {result.stderr.strip()[:500]}")
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    return target


def load():
    """The compiled kernel function, or None where it cannot run here (see unavailable_reason)."""
    global _function, _reason, _loaded
    if _loaded:
        return _function
    _loaded = True
    if platform.machine().lower() not in ("x86_64", "amd64") or not {"avx2", "fma"} <= _cpu_flags():
        _reason = "needs an x86-64 CPU with AVX2 and FMA"
        return None
    try:
        library = ctypes.CDLL(str(_build()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        _reason = str(error)
        return None
    function = library.skinny_matmul
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                         ctypes.c_long, ctypes.c_long, ctypes.c_int]
    library.set_spin_ns.argtypes = [ctypes.c_long]
    library.set_spin_ns(int(os.environ.get("SPEC_BENCH_KERNEL_SPIN_NS", "200000")))
    _function = function
    return _function


def unavailable_reason() -> str | None:
    load()
    return _reason


def threads() -> int:
    """Threads a product uses: the CPUs this process may run on (read once)."""
    global _threads
    if _threads is None:
        _threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return _threads


def accepts(weight: torch.Tensor) -> bool:
    """Whether the kernel can multiply by this weight [N, K]: float32, contiguous, on the CPU, K a
    multiple of 8."""
    return (weight.dim() == 2 and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and weight.is_contiguous() and weight.shape[1] % 8 == 0)


class Product:
    """x [M, K] @ [w_0; w_1; ...]ᵀ -> [M, N_0 + N_1 + ...] through the kernel: one call streams
    several weights that take the same input (q/k/v, gate/up) without copying them side by side.
    The weights must be float32, contiguous, on the CPU, with K a multiple of 8; the
    product keeps references to them."""

    def __init__(self, *weights: torch.Tensor):
        if load() is None:
            raise RuntimeError(f"the skinny kernel is unavailable: {_reason}")
        if not 1 <= len(weights) <= MAX_WEIGHTS:
            raise ValueError(f"a product takes 1-{MAX_WEIGHTS} weights, not {len(weights)}")
        inner = weights[0].shape[-1]
        for weight in weights:
            if not accepts(weight) or weight.shape[1] != inner:
                raise ValueError(f"unsupported weight for the kernel: {tuple(weight.shape)} {weight.dtype} on "
                                 f"{weight.device} (float32, contiguous, CPU, inner size {inner} a multiple of 8)")
        self.weights = weights
        self.inner = inner
        self.out_features = sum(weight.shape[0] for weight in weights)
        self._pointers = (ctypes.c_void_p * len(weights))(*(weight.data_ptr() for weight in weights))
        self._rows = (ctypes.c_long * len(weights))(*(weight.shape[0] for weight in weights))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N_0 + N_1 + ...]; more than 16 rows take one pass per 16 (each row is
        computed exactly as it would be alone)."""
        if (x.dim() != 2 or x.shape[0] < 1 or x.shape[1] != self.inner or x.dtype != torch.float32
                or x.device.type != "cpu"):
            raise ValueError(f"unsupported input for the kernel: {tuple(x.shape)} {x.dtype} on {x.device} "
                             f"(float32 on the CPU, rows of {self.inner})")
        x = x.contiguous()
        rows = x.shape[0]
        out = torch.empty(rows, self.out_features, dtype=torch.float32)
        row_in, row_out = 4 * self.inner, 4 * self.out_features  # bytes per row
        with _lock:  # the C side serves one caller at a time
            for first in range(0, rows, MAX_ROWS):
                count = min(MAX_ROWS, rows - first)
                code = _function(x.data_ptr() + first * row_in, self._pointers, self._rows, len(self.weights),
                                 out.data_ptr() + first * row_out, count, self.inner, threads())
                if code != 0:
                    raise ValueError(f"the kernel refused x {tuple(x.shape)}")
        return out


def skinny_matmul(x: np.ndarray, *weights: np.ndarray) -> np.ndarray:
    """x [M, K] @ [w_0; w_1; ...]ᵀ -> [M, N_0 + N_1 + ...] in float32 through the kernel, on numpy
    arrays (see Product)."""
    product = Product(*(torch.from_numpy(weight) for weight in weights))
    return product(torch.from_numpy(np.ascontiguousarray(x))).numpy()

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
PANEL = 64
SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <math.h>
#include <string.h>
#include <time.h>

#define PANEL 64   /* output columns per panel */
#define KC 32      /* inner steps per pass: a 8 KiB slice of a panel, in L1 while every row group uses it */
#define MAX_ROWS 16

/* One row against a panel slice [c, ce): eight 8-lane accumulators, one FMA per element and step. */
static void rows1(const float *x, const float *wp, float *o, long K, long c, long ce, const char *pf) {
    __m256 a0, a1, a2, a3, a4, a5, a6, a7;
    if (c == 0) {
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = _mm256_setzero_ps();
    } else {
        a0 = _mm256_loadu_ps(o); a1 = _mm256_loadu_ps(o + 8); a2 = _mm256_loadu_ps(o + 16);
        a3 = _mm256_loadu_ps(o + 24); a4 = _mm256_loadu_ps(o + 32); a5 = _mm256_loadu_ps(o + 40);
        a6 = _mm256_loadu_ps(o + 48); a7 = _mm256_loadu_ps(o + 56);
    }
    (void)K;
    for (long k = c; k < ce; k++) {
        const float *wk = wp + k * PANEL;
        if (pf) {
            const char *q = pf + (k - c) * PANEL * 4;
            _mm_prefetch(q, _MM_HINT_T1); _mm_prefetch(q + 64, _MM_HINT_T1);
            _mm_prefetch(q + 128, _MM_HINT_T1); _mm_prefetch(q + 192, _MM_HINT_T1);
        }
        __m256 b = _mm256_broadcast_ss(x + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wk), b, a0); a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wk + 8), b, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wk + 16), b, a2); a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wk + 24), b, a3);
        a4 = _mm256_fmadd_ps(_mm256_loadu_ps(wk + 32), b, a4); a5 = _mm256_fmadd_ps(_mm256_loadu_ps(wk + 40), b, a5);
        a6 = _mm256_fmadd_ps(_mm256_loadu_ps(wk + 48), b, a6); a7 = _mm256_fmadd_ps(_mm256_loadu_ps(wk + 56), b, a7);
    }
    _mm256_storeu_ps(o, a0); _mm256_storeu_ps(o + 8, a1); _mm256_storeu_ps(o + 16, a2);
    _mm256_storeu_ps(o + 24, a3); _mm256_storeu_ps(o + 32, a4); _mm256_storeu_ps(o + 40, a5);
    _mm256_storeu_ps(o + 48, a6); _mm256_storeu_ps(o + 56, a7);
}

#ifdef __AVX512F__
/* R rows (2-4) against a panel slice: 4 x 16-lane accumulators per row, each weight load serving R FMAs. */
#define ROWS512(R)                                                                                  \
static void rows512_##R(const float *x, const float *wp, float *o, long ostride, long K, long c, long ce, \
                        const char *pf) {                                                           \
    __m512 a[R][4];                                                                                 \
    for (int r = 0; r < R; r++)                                                                     \
        for (int v = 0; v < 4; v++)                                                                 \
            a[r][v] = c == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(o + r * ostride + v * 16);     \
    for (long k = c; k < ce; k++) {                                                                 \
        const float *wk = wp + k * PANEL;                                                           \
        if (pf) {                                                                                   \
            const char *q = pf + (k - c) * PANEL * 4;                                               \
            _mm_prefetch(q, _MM_HINT_T1); _mm_prefetch(q + 64, _MM_HINT_T1);                        \
            _mm_prefetch(q + 128, _MM_HINT_T1); _mm_prefetch(q + 192, _MM_HINT_T1);                 \
        }                                                                                           \
        __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);                             \
        __m512 w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);                        \
        for (int r = 0; r < R; r++) {                                                               \
            __m512 b = _mm512_set1_ps(x[r * K + k]);                                                \
            a[r][0] = _mm512_fmadd_ps(w0, b, a[r][0]); a[r][1] = _mm512_fmadd_ps(w1, b, a[r][1]);   \
            a[r][2] = _mm512_fmadd_ps(w2, b, a[r][2]); a[r][3] = _mm512_fmadd_ps(w3, b, a[r][3]);   \
        }                                                                                           \
    }                                                                                               \
    for (int r = 0; r < R; r++)                                                                     \
        for (int v = 0; v < 4; v++) _mm512_storeu_ps(o + r * ostride + v * 16, a[r][v]);            \
}
ROWS512(2) ROWS512(3) ROWS512(4)
#endif

/* All M rows against panels [p0, p1) of the packed weight wp [P][K][PANEL]; out [M, N]. Each panel is
   read from memory once: its slices of KC steps are used by every group of rows while they are in
   L1 (a group's accumulators go back to `out` between slices, which changes no value: every output
   element is the FMA chain over k in order, from zero). With several groups, the first prefetches
   the stream two slices ahead into L2 so that memory keeps streaming while the others compute. */
static void panels(const float *x, const float *w, float *out, long M, long N, long K, long p0, long p1) {
    float tail[MAX_ROWS * PANEL];
    long groups = (M + 3) / 4;
    for (long p = p0; p < p1; p++) {
        const float *wp = w + p * K * PANEL;
        int partial = (p + 1) * PANEL > N;  /* the last panel, padded with zero columns */
        float *op = partial ? tail : out + p * PANEL;
        long stride = partial ? PANEL : N;
        for (long c = 0; c < K; c += KC) {
            long ce = c + KC < K ? c + KC : K;
            const char *pf = groups > 1 ? (const char *)(wp + (c + 2 * KC) * PANEL) : 0;
            for (long g = 0, j = 0; g < groups; g++) {
                long r = (M - j) / (groups - g);  /* rows in this group: as even as possible */
#ifdef __AVX512F__
                if (r == 4) rows512_4(x + j * K, wp, op + j * stride, stride, K, c, ce, pf);
                else if (r == 3) rows512_3(x + j * K, wp, op + j * stride, stride, K, c, ce, pf);
                else if (r == 2) rows512_2(x + j * K, wp, op + j * stride, stride, K, c, ce, pf);
                else rows1(x + j * K, wp, op + j * stride, K, c, ce, pf);
#else
                for (long i = 0; i < r; i++) rows1(x + (j + i) * K, wp, op + (j + i) * stride, K, c, ce, i ? 0 : pf);
#endif
                pf = 0;
                j += r;
            }
        }
        if (partial)
            for (long j = 0; j < M; j++) memcpy(out + j * N + p * PANEL, tail + j * PANEL, (N - p * PANEL) * 4);
    }
}

/* Pack the weights w_s [rows_s, K] (row-major, stacked in order: N rows in all) into panels
   packed [ceil(N / PANEL)][K][PANEL], the columns past N zero. Panels [p0, p1) only. */
void pack(const float *const *w, const long *rows, int count, long K, float *packed, long p0, long p1) {
    for (long p = p0; p < p1; p++) {
        float *dst = packed + p * K * PANEL;
        memset(dst, 0, K * PANEL * 4);
        long n = p * PANEL;
        long first = 0;
        for (int s = 0; s < count; first += rows[s], s++) {
            for (long i = n > first ? n - first : 0; i < rows[s] && first + i < n + PANEL; i++) {
                const float *src = w[s] + i * K;
                long col = first + i - n;
                for (long k = 0; k < K; k++) dst[k * PANEL + col] = src[k];
            }
        }
    }
}

/* ---- the small operations of a layer, fused -----------------------------------------------
   Each works row by row with a fixed order of operations, so a row's result does not depend on how
   many rows come with it. Compiled without FMA contraction: a * b + c is rounded twice, as torch's
   separate operations round it. */

/* Sum of squares of n floats in a fixed order: 8 lanes over the multiples of 8, a fixed lane sum,
   then the tail. */
static float sum_squares(const float *x, long n) {
    __m256 acc = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    float total = _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
    for (; i < n; i++) total += x[i] * x[i];
    return total;
}

/* out[r] = residual[r] + (x[r] * rsqrt(mean(x[r]^2) + eps)) * scale, for each of `rows` rows of
   `dim` (residual may be NULL). */
void rms_norm(const float *x, const float *scale, const float *residual, float *out, long rows, long dim, float eps) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        float inv = 1.0f / sqrtf(sum_squares(xr, dim) / (float)dim + eps);
        if (residual) {
            const float *res = residual + r * dim;
            for (long i = 0; i < dim; i++) o[i] = res[i] + (xr[i] * inv) * scale[i];
        } else {
            for (long i = 0; i < dim; i++) o[i] = (xr[i] * inv) * scale[i];
        }
    }
}

/* Attention heads out of a projection, normed (when scale is not NULL) and rotated (RoPE):
   src holds B * T rows (row b * T + t at src + (b * T + t) * stride), each with `heads` heads of
   `dim` from its start; dst is [B, heads, T, dim]; cos and sin are [T, dim]. Per element:
   y = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[dim/2:], x[:dim/2]). */
void heads_norm_rope(const float *src, long stride, long B, long T, long heads, long dim, const float *scale,
                     float eps, const float *cos, const float *sin, float *dst) {
    long half = dim / 2;
    float normed[dim];
    for (long b = 0; b < B; b++)
        for (long t = 0; t < T; t++) {
            const float *row = src + (b * T + t) * stride, *c = cos + t * dim, *s = sin + t * dim;
            for (long h = 0; h < heads; h++) {
                const float *x = row + h * dim;
                if (scale) {
                    float inv = 1.0f / sqrtf(sum_squares(x, dim) / (float)dim + eps);
                    for (long i = 0; i < dim; i++) normed[i] = (x[i] * inv) * scale[i];
                    x = normed;
                }
                float *y = dst + ((b * heads + h) * T + t) * dim;
                for (long i = 0; i < half; i++) y[i] = x[i] * c[i] + (-x[i + half]) * s[i];
                for (long i = half; i < dim; i++) y[i] = x[i] * c[i] + x[i - half] * s[i];
            }
        }
}

/* Attention of T queries per head over L cached keys: q [B, heads, T, dim]; keys and values are a
   layer of the KV cache [B, kv_heads, slots, dim], read from slot `low` on (L slots); mask [T, L]
   additive or NULL; out [B, T, heads * dim]. Query head h reads KV head h / (heads / kv_heads).
   Scores are dot products in a fixed order times `scale` plus the mask, then a softmax (max, exp,
   sum, divide) and the probability-weighted sum of the values in slot order. */
void attention(const float *q, long B, long heads, long T, long dim, const float *keys, const float *values,
               long kv_heads, long slots, long low, long L, const float *mask, float scale, float *out) {
    float scores[L];
    long group = heads / kv_heads;
    for (long b = 0; b < B; b++)
        for (long h = 0; h < heads; h++) {
            long base = ((b * kv_heads + h / group) * slots + low) * dim;
            const float *kh = keys + base, *vh = values + base;
            for (long t = 0; t < T; t++) {
                const float *qr = q + ((b * heads + h) * T + t) * dim;
                float top = -INFINITY;
                for (long l = 0; l < L; l++) {
                    const float *kr = kh + l * dim;
                    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  /* four chains, summed in order */
                    long i = 0;
                    for (; i + 32 <= dim; i += 32) {
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i), _mm256_loadu_ps(kr + i), a0);
                        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i + 8), _mm256_loadu_ps(kr + i + 8), a1);
                        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i + 16), _mm256_loadu_ps(kr + i + 16), a2);
                        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i + 24), _mm256_loadu_ps(kr + i + 24), a3);
                    }
                    for (; i + 8 <= dim; i += 8)
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i), _mm256_loadu_ps(kr + i), a0);
                    __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
                    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
                    __m128 u = _mm_add_ps(s, _mm_movehl_ps(s, s));
                    float dot = _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)));
                    for (; i < dim; i++) dot += qr[i] * kr[i];
                    float score = dot * scale;
                    if (mask) score += mask[t * L + l];
                    scores[l] = score;
                    if (score > top) top = score;
                }
                float total = 0.0f;
                for (long l = 0; l < L; l++) {
                    float e = scores[l] == -INFINITY ? 0.0f : expf(scores[l] - top);
                    scores[l] = e;
                    total += e;
                }
                for (long l = 0; l < L; l++) scores[l] /= total;
                float *o = out + (b * T + t) * heads * dim + h * dim;
                long d = 0;
                for (; d + 64 <= dim; d += 64) {
                    __m256 a[8];
                    for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
                    for (long l = 0; l < L; l++) {
                        __m256 p = _mm256_set1_ps(scores[l]);
                        const float *vr = vh + l * dim + d;
                        for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * j), a[j]);
                    }
                    for (int j = 0; j < 8; j++) _mm256_storeu_ps(o + d + 8 * j, a[j]);
                }
                for (; d < dim; d++) {
                    float acc = 0.0f;
                    for (long l = 0; l < L; l++) acc += scores[l] * vh[l * dim + d];
                    o[d] = acc;
                }
            }
        }
}

/* ---- a small thread pool ------------------------------------------------------------------
   A product is cut into chunks of panels. The caller publishes it by bumping a ticket whose high
   half is the product's generation and low half the next unclaimed chunk; the caller and the
   workers claim chunks with compare-and-swap until none is left, and the caller waits until every
   chunk is done. Workers spin for a while after a product (decoding issues one every few tens of
   microseconds), then sleep on a condition variable, so an idle process costs no CPU. */

#define MAX_WORKERS 255
static struct {
    const float *x, *w;
    float *out;
    long M, N, K, panels, chunk, chunks;
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
        long p0 = c * job.chunk, p1 = p0 + job.chunk < job.panels ? p0 + job.chunk : job.panels;
        panels(job.x, job.w, job.out, job.M, job.N, job.K, p0, p1);
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

/* out[M, N] = x[M, K] @ W^T for the weight W [N, K] packed by `pack`; 1 <= M <= 16, on `threads`
   threads (the caller and threads - 1 workers). Not reentrant: one caller at a time. Returns 0, or 1
   for an unsupported shape. */
int panel_matmul(const float *x, const float *packed, float *out, long M, long N, long K, int threads) {
    if (M < 1 || M > MAX_ROWS || N < 1 || K < 1 || threads < 1) return 1;
    long count = (N + PANEL - 1) / PANEL;
    if (threads == 1 || count == 1) {
        panels(x, packed, out, M, N, K, 0, count);
        return 0;
    }
    if (threads - 1 > workers) start_workers(threads - 1);
    long chunk = (count + 8 * threads - 1) / (8 * threads);  /* about 8 chunks per thread */
    job.x = x; job.w = packed; job.out = out; job.M = M; job.N = N; job.K = K;
    job.panels = count; job.chunk = chunk; job.chunks = (count + chunk - 1) / chunk;
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
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-pthread", "-shared", "-fPIC", "-lm"]

_library = None
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
    """The compiled kernel library, or None where it cannot run here (see unavailable_reason)."""
    global _library, _reason, _loaded
    if _loaded:
        return _library
    _loaded = True
    if platform.machine().lower() not in ("x86_64", "amd64") or not {"avx2", "fma"} <= _cpu_flags():
        _reason = "needs an x86-64 CPU with AVX2 and FMA"
        return None
    try:
        library = ctypes.CDLL(str(_build()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        _reason = str(error)
        return None
    library.panel_matmul.restype = ctypes.c_int
    library.panel_matmul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                                     ctypes.c_long, ctypes.c_long, ctypes.c_int]
    library.pack.restype = None
    library.pack.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p,
                             ctypes.c_long, ctypes.c_long]
    library.rms_norm.restype = None
    library.rms_norm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_long, ctypes.c_float]
    library.heads_norm_rope.restype = None
    library.heads_norm_rope.argtypes = ([ctypes.c_void_p] + [ctypes.c_long] * 5
                                        + [ctypes.c_void_p, ctypes.c_float] + [ctypes.c_void_p] * 3)
    library.attention.restype = None
    library.attention.argtypes = ([ctypes.c_void_p] + [ctypes.c_long] * 4 + [ctypes.c_void_p] * 2
                                  + [ctypes.c_long] * 4 + [ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p])
    library.set_spin_ns.argtypes = [ctypes.c_long]
    library.set_spin_ns(int(os.environ.get("SPEC_BENCH_KERNEL_SPIN_NS", "200000")))
    _library = library
    return _library


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
    """Whether the kernel can multiply by this weight [N, K]: a float32 matrix on the CPU."""
    return weight.dim() == 2 and weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.numel() > 0


def _key(weight: torch.Tensor) -> tuple:
    """What identifies a weight's current values: its storage and (outside inference mode) the
    version counter that in-place updates bump."""
    return weight.data_ptr(), (None if weight.is_inference() else weight._version)


class Product:
    """x [M, K] @ [w_0; w_1; ...]ᵀ -> [M, N_0 + N_1 + ...] through the kernel, on a packed copy of the
    weights side by side (q/k/v, gate/up: one product streams them all). The copy is made here; a
    weight replaced or changed in place since is noticed by `is_current`."""

    def __init__(self, *weights: torch.Tensor):
        library = load()
        if library is None:
            raise RuntimeError(f"the skinny kernel is unavailable: {_reason}")
        if not 1 <= len(weights) <= MAX_WEIGHTS:
            raise ValueError(f"a product takes 1-{MAX_WEIGHTS} weights, not {len(weights)}")
        inner = weights[0].shape[-1]
        for weight in weights:
            if not accepts(weight) or weight.shape[1] != inner:
                raise ValueError(f"unsupported weight for the kernel: {tuple(weight.shape)} {weight.dtype} on "
                                 f"{weight.device} (a float32 matrix on the CPU, inner size {inner})")
        self.weights = weights
        self.keys = [_key(weight) for weight in weights]
        self.inner = inner
        self.out_features = sum(weight.shape[0] for weight in weights)
        count = -(-self.out_features // PANEL)
        sources = [weight.detach().contiguous() for weight in weights]
        pointers = (ctypes.c_void_p * len(sources))(*(source.data_ptr() for source in sources))
        rows = (ctypes.c_long * len(sources))(*(source.shape[0] for source in sources))
        self.packed = torch.empty(count, inner, PANEL, dtype=torch.float32)
        library.pack(pointers, rows, len(sources), inner, self.packed.data_ptr(), 0, count)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * 4

    def is_current(self, weights: list[torch.Tensor]) -> bool:
        """Whether these are the weights packed, with the values they had then (called before every
        product, so kept cheap)."""
        if len(weights) != len(self.keys):
            return False
        for weight, (pointer, version) in zip(weights, self.keys):
            if weight.data_ptr() != pointer or (version is not None and weight._version != version):
                return False
        return True

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
                code = _library.panel_matmul(x.data_ptr() + first * row_in, self.packed.data_ptr(),
                                             out.data_ptr() + first * row_out, count, self.out_features,
                                             self.inner, threads())
                if code != 0:
                    raise ValueError(f"the kernel refused x {tuple(x.shape)}")
        return out


def skinny_matmul(x: np.ndarray, *weights: np.ndarray) -> np.ndarray:
    """x [M, K] @ [w_0; w_1; ...]ᵀ -> [M, N_0 + N_1 + ...] in float32 through the kernel, on numpy
    arrays (see Product)."""
    product = Product(*(torch.from_numpy(weight) for weight in weights))
    return product(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def _usable(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            return False
    return True


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """residual + (x * rsqrt(mean(x²) + eps)) * scale over the last dimension, in one call; x, scale
    and residual float32, contiguous, on the CPU (no autograd). Row by row: a row's result does not
    depend on the other rows."""
    if not (_usable(x, scale) and (residual is None or (_usable(residual) and residual.shape == x.shape))
            and scale.shape == x.shape[-1:]):
        raise ValueError(f"rms_norm takes contiguous float32 CPU tensors, x [..., D] with scale [D]: "
                         f"x {tuple(x.shape)} {x.dtype}, scale {tuple(scale.shape)} {scale.dtype}")
    out = torch.empty_like(x)
    dim = x.shape[-1]
    _library.rms_norm(x.data_ptr(), scale.data_ptr(), None if residual is None else residual.data_ptr(),
                      out.data_ptr(), x.numel() // dim, dim, eps)
    return out


def heads_norm_rope(projection: torch.Tensor, first: int, heads: int, head_dim: int, cos: torch.Tensor,
                    sin: torch.Tensor, scale: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """Heads [first, first + heads) of each row of `projection` [B, T, F] (contiguous float32 on the
    CPU; a head is head_dim wide and columns are counted in heads), RMS-normed with `scale` when
    given, then rotated by RoPE with cos, sin [T, head_dim]: returns [B, heads, T, head_dim]."""
    B, T, features = projection.shape
    if not (_usable(projection, cos, sin) and (scale is None or _usable(scale))
            and cos.shape == sin.shape == (T, head_dim) and (first + heads) * head_dim <= features
            and head_dim % 2 == 0):
        raise ValueError(f"heads_norm_rope: unsupported input {tuple(projection.shape)} {projection.dtype}, "
                         f"heads {first}..{first + heads} of {head_dim}, cos {tuple(cos.shape)}")
    out = torch.empty(B, heads, T, head_dim, dtype=torch.float32)
    _library.heads_norm_rope(projection.data_ptr() + 4 * first * head_dim, features, B, T, heads, head_dim,
                             None if scale is None else scale.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(),
                             out.data_ptr())
    return out


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, low: int, end: int,
              mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of q [B, heads, T, dim] over slots [low, end) of one layer's cache keys and values
    [B, kv_heads, slots, dim] (contiguous float32 on the CPU), with an additive mask [T, end - low]
    or None: returns [B, T, heads * dim], each query computed alone."""
    B, heads, T, dim = q.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    L = end - low
    if not (_usable(q, keys, values) and keys.shape == values.shape and keys.shape[0] == B and keys.shape[3] == dim
            and heads % kv_heads == 0 and 0 <= low < end <= slots
            and (mask is None or (_usable(mask) and mask.shape == (T, L)))):
        raise ValueError(f"attention: unsupported input q {tuple(q.shape)}, cache {tuple(keys.shape)}, "
                         f"slots {low}..{end}, mask {None if mask is None else tuple(mask.shape)}")
    out = torch.empty(B, T, heads * dim, dtype=torch.float32)
    _library.attention(q.data_ptr(), B, heads, T, dim, keys.data_ptr(), values.data_ptr(), kv_heads, slots, low, L,
                       None if mask is None else mask.data_ptr(), scale, out.data_ptr())
    return out

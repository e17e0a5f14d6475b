"""A skinny matrix product for CPU decoding: out[M, N] = x[M, K] @ W[N, K]ᵀ for M <= 16 rows.

Decoding and verification multiply 1-16 rows by every weight matrix. BLAS libraries pack the
weight for each such call and reach about half the memory bandwidth there (DESIGN.md §3; on the
2-core EPYC a 2-row LM-head product costs twice a 1-row one). This kernel streams the weight once,
in its row-major torch layout (no copy), and for each weight row keeps one 8-lane AVX2 accumulator
per input row; 2-4 weight rows are handled together so each input load serves several FMAs. Rows
beyond 8 are done in groups of 8 over the same cached weight block.

Every output element is computed by the same sequence of operations whatever M is (lane-wise FMAs
in k order, then a fixed-order lane sum), so a k-row product is bit-identical to k 1-row products:
verifying k tokens gives exactly the numbers that decoding them one by one would.

The C source below is compiled once per machine with the system C compiler (`cc -O3
-march=native -fopenmp`) into the cache, and called through ctypes, which releases the GIL. On a
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
from pathlib import Path

import numpy as np

MAX_ROWS = 16
SOURCE = r"""
#include <immintrin.h>

/* Lane sum in a fixed order, the same for every row count. */
static inline float lane_sum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

/* R weight rows from row n against M input rows. */
#define BLOCK(R, M)                                                                          \
static void block_##R##_##M(const float *x, const float *w, float *out, long N, long K, long n) { \
    __m256 acc[R][M];                                                                        \
    for (int r = 0; r < R; r++) for (int j = 0; j < M; j++) acc[r][j] = _mm256_setzero_ps(); \
    for (long k = 0; k < K; k += 8) {                                                        \
        __m256 xv[M];                                                                        \
        for (int j = 0; j < M; j++) xv[j] = _mm256_loadu_ps(x + j * K + k);                  \
        for (int r = 0; r < R; r++) {                                                        \
            __m256 wv = _mm256_loadu_ps(w + (n + r) * K + k);                                \
            for (int j = 0; j < M; j++) acc[r][j] = _mm256_fmadd_ps(wv, xv[j], acc[r][j]);   \
        }                                                                                    \
    }                                                                                        \
    for (int r = 0; r < R; r++) for (int j = 0; j < M; j++) out[j * N + n + r] = lane_sum(acc[r][j]); \
}
BLOCK(4, 1) BLOCK(4, 2) BLOCK(3, 3) BLOCK(2, 4) BLOCK(2, 5) BLOCK(2, 6) BLOCK(1, 7) BLOCK(1, 8)
BLOCK(1, 1) BLOCK(1, 2) BLOCK(1, 3) BLOCK(1, 4) BLOCK(1, 5) BLOCK(1, 6)

typedef void (*block_fn)(const float *, const float *, float *, long, long, long);
static const block_fn WIDE[9] = {0, block_4_1, block_4_2, block_3_3, block_2_4, block_2_5, block_2_6,
                                 block_1_7, block_1_8};
static const long WIDTH[9] = {0, 4, 4, 3, 2, 2, 2, 1, 1};
static const block_fn ONE[9] = {0, block_1_1, block_1_2, block_1_3, block_1_4, block_1_5, block_1_6,
                                block_1_7, block_1_8};

/* out[M, N] = x[M, K] @ w[N, K]^T; 1 <= M <= 16, K % 8 == 0, all row-major and contiguous.
   Returns 0, or 1 for an unsupported shape. */
int skinny_matmul(const float *x, const float *w, float *out, long M, long N, long K, int threads) {
    if (M < 1 || M > 16 || K % 8 != 0) return 1;
    long blocks = (N + 63) / 64;  /* 64 weight rows per task: enough tasks for 2+ threads on small N */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++) {
        long n0 = b * 64, n1 = n0 + 64 < N ? n0 + 64 : N;
        for (long m = 0; m < M; m += 8) {
            long rows = M - m < 8 ? M - m : 8, width = WIDTH[rows], n = n0;
            for (; n + width <= n1; n += width) WIDE[rows](x + m * K, w, out + m * N, N, K, n);
            for (; n < n1; n++) ONE[rows](x + m * K, w, out + m * N, N, K, n);
        }
    }
    return 0;
}
"""
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_function = None
_reason: str | None = None
_loaded = False


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
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                         ctypes.c_long, ctypes.c_int]
    _function = function
    return _function


def unavailable_reason() -> str | None:
    load()
    return _reason


def threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def supports(x: np.ndarray, weight: np.ndarray) -> bool:
    return (x.dtype == np.float32 and weight.dtype == np.float32 and 1 <= x.shape[0] <= MAX_ROWS
            and x.shape[1] % 8 == 0 and weight.flags.c_contiguous)


def skinny_matmul(x: np.ndarray, weight: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x [M, K] @ weight[N, K]ᵀ -> [M, N] in float32 through the kernel (which must be loaded)."""
    function = load()
    if function is None:
        raise RuntimeError(f"the skinny kernel is unavailable: {_reason}")
    x = np.ascontiguousarray(x)
    if not supports(x, weight):
        raise ValueError(f"unsupported shapes/dtypes for the kernel: x {x.shape} {x.dtype}, "
                         f"weight {weight.shape} {weight.dtype}")
    rows, inner = x.shape
    if weight.shape[1] != inner:
        raise ValueError(f"inner sizes differ: x {x.shape}, weight {weight.shape}")
    if out is None:
        out = np.empty((rows, weight.shape[0]), dtype=np.float32)
    code = function(x.ctypes.data, weight.ctypes.data, out.ctypes.data, rows, weight.shape[0], inner, threads())
    if code != 0:
        raise ValueError(f"the kernel refused shapes x {x.shape}, weight {weight.shape}")
    return out

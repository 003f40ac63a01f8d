"""Bit-exact re-implementations of the random streams the reference consumes, in numba.

The reference corruptions draw from `np.random` (MT19937, legacy seeding), from numba's MT19937 (glass
blur) and from a PCG64 `Generator` (scikit-image's impulse noise). Reproducing those streams exactly is
what lets the fast engine be byte-identical to the reference for the same seed; doing it in numba makes
the generation vectorisable (a whole 624-word MT block is twisted and tempered at once) and lets the
kernels draw without NumPy's per-call overhead. Algorithms mirror NumPy's C sources (`mt19937.c`,
`legacy-distributions.c`, `pcg64.h`): a double = 53 bits from two words, `normal` = Marsaglia's polar
method with the second value kept for the next call, `randint` = masked rejection on one 32-bit word.
`tests/test_corruptions.py` checks each against NumPy.

A stream is three arrays — the MT state (624 words), a buffer of generated doubles (its last slot keeps
the second normal of a pair, as NumPy's `gauss` does) and `pos` = (cursor, has-kept-normal) — plain
arrays so that any `@njit` kernel can draw from it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

MT_N = 624
_MT_M = 397
_UPPER = np.uint32(0x80000000)
_LOWER = np.uint32(0x7FFFFFFF)
_MATRIX_A = np.uint32(0x9908B0DF)
_DOUBLES_PER_BLOCK = MT_N // 2  # doubles take word pairs and blocks are even: a block never splits a double
_CAPACITY = _DOUBLES_PER_BLOCK * 8  # doubles generated per refill; buf[_CAPACITY] holds the kept normal
_TWO53 = 9007199254740992.0
DoubleStream = tuple[np.ndarray, np.ndarray, np.ndarray]


@njit(cache=True)
def mt_seed(seed: int) -> np.ndarray:
    """MT19937 state after NumPy's legacy `RandomState(seed)` (Knuth's initialiser, 32-bit seed)."""
    mt = np.empty(MT_N, np.uint32)
    s = np.uint32(seed & 0xFFFFFFFF)
    for pos in range(MT_N):
        mt[pos] = s
        s = np.uint32(np.uint32(1812433253) * (s ^ (s >> np.uint32(30))) + np.uint32(pos + 1))
    return mt


# Loops index with uint64 so that numba emits no negative-index wraparound code and LLVM vectorises
# them (the twist, the tempering and the word -> double conversion all run 4-8 lanes wide).
_M = np.uint64(_MT_M)
_N_M = np.uint64(MT_N - _MT_M)
_ONE = np.uint64(1)


@njit(cache=True)
def _twist(mt: np.ndarray) -> None:
    for i in range(_N_M):
        y = (mt[i] & _UPPER) | (mt[i + _ONE] & _LOWER)
        mt[i] = mt[i + _M] ^ (y >> np.uint32(1)) ^ ((np.uint32(0) - (y & np.uint32(1))) & _MATRIX_A)
    for i in range(_N_M, np.uint64(MT_N - 1)):
        y = (mt[i] & _UPPER) | (mt[i + _ONE] & _LOWER)
        mt[i] = mt[i - _N_M] ^ (y >> np.uint32(1)) ^ ((np.uint32(0) - (y & np.uint32(1))) & _MATRIX_A)
    y = (mt[MT_N - 1] & _UPPER) | (mt[0] & _LOWER)
    mt[MT_N - 1] = mt[_MT_M - 1] ^ (y >> np.uint32(1)) ^ ((np.uint32(0) - (y & np.uint32(1))) & _MATRIX_A)


@njit(cache=True, inline="always")
def _temper(y: np.uint32) -> np.uint32:
    y ^= y >> np.uint32(11)
    y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    y ^= y >> np.uint32(18)
    return y


@njit(cache=True)
def fill_words(mt: np.ndarray, out: np.ndarray) -> None:
    """The next `out.size` (a multiple of 624) tempered 32-bit outputs."""
    for b in range(out.size // MT_N):
        _twist(mt)
        base = np.uint64(b * MT_N)
        for i in range(np.uint64(MT_N)):
            out[base + i] = _temper(mt[i])


@njit(cache=True)
def _refill_doubles(mt: np.ndarray, buf: np.ndarray) -> None:
    """Fill buf[:_CAPACITY] with the next doubles: (a >> 5, b >> 6) of two words -> 53 random bits."""
    words = np.empty(MT_N, np.uint32)
    for b in range(_CAPACITY // _DOUBLES_PER_BLOCK):
        fill_words(mt, words)
        base = np.uint64(b * _DOUBLES_PER_BLOCK)
        for i in range(np.uint64(_DOUBLES_PER_BLOCK)):
            hi = np.int32(words[i + i] >> np.uint32(5))
            lo = np.int32(words[i + i + _ONE] >> np.uint32(6))
            buf[base + i] = (hi * 67108864.0 + lo) / _TWO53


@njit(cache=True)
def double_stream(seed: int) -> DoubleStream:
    """A fresh legacy stream for `seed`: (state, double buffer, cursor)."""
    return mt_seed(seed), np.empty(_CAPACITY + 1, np.float64), np.array([_CAPACITY, 0], np.int64)


def next_double(mt: np.ndarray, buf: np.ndarray, pos: np.ndarray) -> float:
    """One `RandomState.random_sample()` (Python-side, for scalar draws between array draws)."""
    out = np.empty(1)
    uniform_fill(mt, buf, pos, out, 0.0, 1.0)
    return float(out[0])


# The fills below keep the cursor in a local and refill inline: a call with array arguments inside a
# hot loop (even an inlined one) costs numba two atomic reference-count updates per array per draw,
# which made the draws ~10x slower than the generator itself.

@njit(cache=True)
def uniform_fill(mt: np.ndarray, buf: np.ndarray, pos: np.ndarray, out: np.ndarray, low: float, high: float) -> None:
    """`out.flat[:] = RandomState.uniform(low, high, out.shape)`."""
    flat = out.reshape(-1)
    span = high - low
    i = pos[0]
    for k in range(flat.size):
        if i == _CAPACITY:
            _refill_doubles(mt, buf)
            i = 0
        flat[k] = low + span * buf[i]
        i += 1
    pos[0] = i


@njit(cache=True)
def normal_fill(mt: np.ndarray, buf: np.ndarray, pos: np.ndarray, out: np.ndarray, loc: float, scale: float) -> None:
    """`out.flat[:] = RandomState.normal(loc, scale, out.shape)`: Marsaglia's polar method on pairs of
    doubles, `f·x2` first, `f·x1` kept for the next draw (also across calls, like NumPy).

    Per buffer of doubles: all candidate pairs are screened at once (vectorised), the accepted ones
    compacted, and only those take the (scalar) logarithm — the same values in the same order."""
    flat = out.reshape(-1)
    n = flat.size
    k = 0
    if n > 0 and pos[1] == 1:
        flat[0] = loc + scale * buf[_CAPACITY]
        pos[1] = 0
        k = 1
    half = _CAPACITY // 2
    x1s = np.empty(half)
    x2s = np.empty(half)
    r2s = np.empty(half)
    logs = np.empty(half)
    idx = np.empty(half, np.int64)
    acc_r2 = np.empty(half)
    acc_x1 = np.empty(half)
    acc_x2 = np.empty(half)
    i = pos[0]
    while k < n:
        if i >= _CAPACITY - 1:
            if i == _CAPACITY - 1:  # a pair straddles a refill
                first = buf[i]
                _refill_doubles(mt, buf)
                x1 = 2.0 * first - 1.0
                x2 = 2.0 * buf[0] - 1.0
                i = 1
                r2 = x1 * x1 + x2 * x2
                if r2 < 1.0 and r2 != 0.0:
                    f = math.sqrt(-2.0 * math.log(r2) / r2)
                    flat[k] = loc + scale * (f * x2)
                    if k + 1 < n:
                        flat[k + 1] = loc + scale * (f * x1)
                    else:
                        buf[_CAPACITY] = f * x1
                        pos[1] = 1
                    k += 2
                continue
            _refill_doubles(mt, buf)
            i = 0
        m = (_CAPACITY - i) // 2
        start = np.uint64(i)
        for a in range(np.uint64(m)):
            x1 = 2.0 * buf[start + a + a] - 1.0
            x2 = 2.0 * buf[start + a + a + _ONE] - 1.0
            x1s[a] = x1
            x2s[a] = x2
            r2s[a] = x1 * x1 + x2 * x2
        count = 0
        for a in range(m):  # branch-free compaction of the accepted pairs
            r2 = r2s[a]
            idx[count] = a
            acc_r2[count] = r2
            acc_x1[count] = x1s[a]
            acc_x2[count] = x2s[a]
            count += 1 if (r2 < 1.0 and r2 != 0.0) else 0
        need = (n - k + 1) // 2
        use = min(count, need)
        for u in range(use):
            logs[u] = math.log(acc_r2[u])
        full = use if k + 2 * use <= n else use - 1  # pairs whose both values are written
        dst = np.uint64(k)
        for u in range(np.uint64(full)):
            f = math.sqrt(-2.0 * logs[u] / acc_r2[u])
            flat[dst + u + u] = loc + scale * (f * acc_x2[u])
            flat[dst + u + u + _ONE] = loc + scale * (f * acc_x1[u])
        if full < use:  # odd count: write f·x2, keep f·x1 for the next normal draw
            f = math.sqrt(-2.0 * logs[full] / acc_r2[full])
            flat[n - 1] = loc + scale * (f * acc_x2[full])
            buf[_CAPACITY] = f * acc_x1[full]
            pos[1] = 1
        k += 2 * use
        i += 2 * (idx[use - 1] + 1 if use == need else m)
    pos[0] = i


_LOGGAM_A = np.array([8.333333333333333e-02, -2.777777777777778e-03, 7.936507936507937e-04,
                      -5.952380952380952e-04, 8.417508417508418e-04, -1.917526917526918e-03,
                      6.410256410256410e-03, -2.955065359477124e-02, 1.796443723688307e-01,
                      -1.39243221690590e+00])
_LOGGAM_TABLE = 512  # log((k)!) for the counts PTRS meets at rates <= 60; larger k are computed


@njit(cache=True)
def loggam(x: float) -> float:
    """NumPy's `random_loggam` (SPECFUN's log-gamma), operation for operation: PTRS compares against
    it, so a last-bit difference would flip an accept/reject and shift the whole stream."""
    x0 = x
    n = 0
    if x == 1.0 or x == 2.0:
        return 0.0
    elif x <= 7.0:
        n = np.int64(7 - x)
        x0 = x + n
    x2 = 1.0 / (x0 * x0)
    xp = 2 * math.pi
    gl0 = _LOGGAM_A[9]
    for k in range(8, -1, -1):
        gl0 *= x2
        gl0 += _LOGGAM_A[k]
    gl = gl0 / x0 + 0.5 * math.log(xp) + (x0 - 0.5) * math.log(x0) - x0
    if x <= 7.0:
        for k in range(1, n + 1):
            gl -= math.log(x0 - 1.0)
            x0 -= 1.0
    return gl


_PTRS_KMAX = 192  # counts with a precomputed acceptance bound; covers rates <= 60 but for rare tails
_MARGIN = 1e-9  # relative: far above the few-ulp error of either side of the exact log test


@njit(cache=True)
def poisson_constants(rates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per rate, the constants NumPy's `random_poisson` recomputes on every call, with the same
    expressions: (lam, exp(-lam)) for the multiplication method, (a, b, log(invalpha), vr, log(lam),
    invalpha) for PTRS; `loggam(k + 1)` for small k; and for PTRS the acceptance bound
    exp(-lam + k·log(lam) - loggam(k + 1)) per count k, which lets the sampler decide almost every
    squeeze test by one division instead of two logarithms (see `poisson_fill`)."""
    consts = np.zeros((rates.size, 8))
    bounds = np.zeros((rates.size, _PTRS_KMAX))
    table = np.empty(_LOGGAM_TABLE)
    for k in range(_LOGGAM_TABLE):
        table[k] = loggam(k + 1.0)
    for j in range(rates.size):
        lam = rates[j]
        consts[j, 0] = lam
        if lam >= 10:
            slam = math.sqrt(lam)
            loglam = math.log(lam)
            b = 0.931 + 2.53 * slam
            a = -0.059 + 0.02483 * b
            invalpha = 1.1239 + 1.1328 / (b - 3.4)
            consts[j, 1] = a
            consts[j, 2] = b
            consts[j, 3] = math.log(invalpha)
            consts[j, 4] = 0.9277 - 3.6224 / (b - 2)
            consts[j, 5] = loglam
            consts[j, 7] = invalpha
            for k in range(_PTRS_KMAX):
                bounds[j, k] = math.exp(-lam + k * loglam - table[k])
        else:
            consts[j, 6] = math.exp(-lam)
    return consts, table, bounds


@njit(cache=True)
def poisson_fill(mt: np.ndarray, buf: np.ndarray, pos: np.ndarray, rate_index: np.ndarray, consts: np.ndarray,
                 loggam_table: np.ndarray, bounds: np.ndarray, out: np.ndarray) -> None:
    """`out.flat[:] = RandomState.poisson(rates[rate_index])`, draw for draw: NumPy's `random_poisson` —
    0 at rate 0, Knuth's multiplication method below 10, Hörmann's PTRS (transformed rejection) from 10
    on — consuming the legacy double stream exactly as the C loop does.

    PTRS's squeeze test `log(V) + log(invalpha) - log(w) <= -lam + k·log(lam) - loggam(k + 1)` is first
    decided in the linear domain, V·invalpha/w against the precomputed exp of the right side; only when
    the two are within a relative 1e-9 (the C expressions err by ~1e-13 at most, so outside that band
    both tests agree) is the C expression itself evaluated."""
    i = pos[0]
    for p in range(rate_index.size):
        j = rate_index[p]
        lam = consts[j, 0]
        if lam == 0:
            out[p] = 0
        elif lam < 10:
            # Knuth: count the running products of uniforms that stay above exp(-lam). The products
            # never increase, so four at a time the count is a sum of comparisons — the same
            # multiplications in the same order, with one (well-predicted) branch per four draws.
            enlam = consts[j, 6]
            x = 0
            prod = 1.0
            while True:
                if i + 4 <= _CAPACITY:
                    p1 = prod * buf[i]
                    p2 = p1 * buf[i + 1]
                    p3 = p2 * buf[i + 2]
                    p4 = p3 * buf[i + 3]
                    step = np.int64(p1 > enlam) + np.int64(p2 > enlam) + np.int64(p3 > enlam) + np.int64(p4 > enlam)
                    x += step
                    if step < 4:
                        i += step + 1
                        break
                    prod = p4
                    i += 4
                else:
                    if i == _CAPACITY:
                        _refill_doubles(mt, buf)
                        i = 0
                    prod *= buf[i]
                    i += 1
                    if prod > enlam:
                        x += 1
                    else:
                        break
            out[p] = x
        else:
            a = consts[j, 1]
            b = consts[j, 2]
            log_invalpha = consts[j, 3]
            vr = consts[j, 4]
            loglam = consts[j, 5]
            while True:
                if i == _CAPACITY:
                    _refill_doubles(mt, buf)
                    i = 0
                u = buf[i] - 0.5
                i += 1
                if i == _CAPACITY:
                    _refill_doubles(mt, buf)
                    i = 0
                v = buf[i]
                i += 1
                us = 0.5 - abs(u)
                k = np.int64(math.floor((2 * a / us + b) * u + lam + 0.43))
                if us >= 0.07 and v <= vr:
                    break
                if k < 0 or (us < 0.013 and v > us):
                    continue
                w = a / (us * us) + b
                if k < _PTRS_KMAX:
                    ratio = v * consts[j, 7] / w
                    bound = bounds[j, k]
                    if ratio < bound * (1.0 - _MARGIN):
                        break
                    if ratio > bound * (1.0 + _MARGIN):
                        continue
                lg = loggam_table[k] if k < _LOGGAM_TABLE else loggam(k + 1.0)
                if (math.log(v) + log_invalpha - math.log(w)) <= (-lam + k * loglam - lg):
                    break
            out[p] = k
    pos[0] = i


class WordStream:
    """Python-side legacy stream of 32-bit words, for the few scalar draws (frost's texture and crop)."""

    def __init__(self, seed: int) -> None:
        self._mt = mt_seed(seed)
        self._words = np.empty(MT_N, np.uint32)
        self._pos = MT_N

    def next32(self) -> int:
        if self._pos == MT_N:
            fill_words(self._mt, self._words)
            self._pos = 0
        self._pos += 1
        return int(self._words[self._pos - 1])

    def randint(self, low: int, high: int) -> int:
        """`RandomState.randint(low, high)` for ranges below 2**32: masked rejection sampling."""
        if high <= low:
            raise ValueError(f"randint: empty range [{low}, {high})")
        rng = high - 1 - low
        if rng == 0:
            return low
        mask = (1 << rng.bit_length()) - 1
        while True:
            value = self.next32() & mask
            if value <= rng:
                return low + value


# ------------------------------------------------------------------------------------------ PCG64
# scikit-image draws impulse noise from `np.random.default_rng(seed)` (PCG64, XSL-RR output). Its
# 128-bit LCG is emulated with 64-bit halves; a stream is split into interleaved lanes (each stepping
# by the multiplier's power) so that independent multiply chains overlap in the pipeline.

_PCG_MULT = (2549297995355413924 << 64) + 4865540595714422341
_MASK128 = (1 << 128) - 1
_LO32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


def pcg64_lanes(seed: int, start: int, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """States (hi, lo) of `lanes` interleaved lanes of `default_rng(seed)`'s stream, lane j producing
    draws start + j, start + j + lanes, ...; plus (mult_hi, mult_lo, inc_hi, inc_lo) of a `lanes` step."""
    bitgen = np.random.default_rng(seed).bit_generator
    if start:
        bitgen.advance(start)
    state = bitgen.state["state"]
    s, inc = state["state"], state["inc"]
    states = []
    for _ in range(lanes):  # a draw outputs the state after its step
        s = (s * _PCG_MULT + inc) & _MASK128
        states.append(s)
    mult = pow(_PCG_MULT, lanes, 1 << 128)
    step_inc = (inc * sum(pow(_PCG_MULT, k, 1 << 128) for k in range(lanes))) & _MASK128
    lane_states = np.array([[v >> 64, v & ((1 << 64) - 1)] for v in states], dtype=np.uint64)
    step = np.array([mult >> 64, mult & ((1 << 64) - 1), step_inc >> 64, step_inc & ((1 << 64) - 1)], np.uint64)
    return lane_states, step


@njit(cache=True, inline="always")
def _mulhi64(a: np.uint64, b: np.uint64) -> np.uint64:
    a0 = a & _LO32
    a1 = a >> _S32
    b0 = b & _LO32
    b1 = b >> _S32
    p00 = a0 * b0
    p01 = a0 * b1
    p10 = a1 * b0
    mid = (p00 >> _S32) + (p01 & _LO32) + (p10 & _LO32)
    return a1 * b1 + (p01 >> _S32) + (p10 >> _S32) + (mid >> _S32)


@njit(cache=True, inline="always")
def pcg64_double(hi: np.uint64, lo: np.uint64) -> float:
    """`Generator.random()` of the draw whose (post-step) state is (hi, lo): XSL-RR, top 53 bits."""
    x = hi ^ lo
    rot = hi >> np.uint64(58)
    r = (x >> rot) | (x << ((np.uint64(64) - rot) & np.uint64(63)))
    return np.float64(r >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True, inline="always")
def pcg64_step(hi: np.uint64, lo: np.uint64, mh: np.uint64, ml: np.uint64, ih: np.uint64,
               il: np.uint64) -> tuple[np.uint64, np.uint64]:
    """(hi, lo)·(mh, ml) + (ih, il) mod 2**128 (scalars only: no array arguments in hot loops)."""
    prod = lo * ml
    new_lo = prod + il
    carry = np.uint64(1) if new_lo < prod else np.uint64(0)
    return _mulhi64(lo, ml) + lo * mh + hi * ml + ih + carry, new_lo

"""Numba kernels that reproduce, operation for operation, the SciPy/NumPy routines the reference uses.

Bit-exactness is the point: the reference truncates float results to uint8 (`np.uint8(x)`), so any
re-association of a float sum moves values that sit next to an integer by one grey level, and a few
ops threshold intermediate fields (snow, spatter) where one ulp can switch a pixel. So these kernels
keep SciPy's evaluation order and dtypes (read from `scipy/ndimage/src/ni_filters.c` and
`ni_interpolation.c`) and only change the loop order, which does not change any per-element result:

* `gaussian_filter` = `scipy.ndimage.gaussian_filter` (and so `skimage.filters.gaussian`): per axis a
  symmetric correlation `x[i]·w0 + Σ_{d=r..1} (x[i-d] + x[i+d])·w_d` in float64, cast to the array
  dtype after each axis, axes in order, 'nearest' or 'reflect' borders.
* `zoom_linear` = `scipy.ndimage.zoom(order=1)` (align-corners grid, constant mode): per output
  element `((v00·wy0)·wx0 + (v01·wy0)·wx1) + (v10·wy1)·wx0 + (v11·wy1)·wx1` in float64.
* `map_linear_reflect` = `scipy.ndimage.map_coordinates(order=1, mode='reflect')` for per-pixel shifts.
* `motion_blur` = the fork's `_motion_blur`: a sum over the kernel taps, in tap order, of clamped
  shifts of the image, in float64.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np
from numba import njit

NEAREST, REFLECT = 0, 1
FLOAT, TO_U8, CLIP_TO_U8 = 0, 1, 2  # how a filter stores: as is / uint8(x·255) / uint8(clip(x, 0, 1)·255)
_SCRATCH = threading.local()
_SCRATCH_ENTRIES = 48
_SCRATCH_MAX_BYTES = 16 << 20  # bigger arrays (native-resolution builds) are not kept between calls


def scratch(tag: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A per-thread work array reused across calls (contents undefined; never returned to a caller).

    Fresh megabyte-sized temporaries are mmap'd and returned to the OS by glibc on every call, and the
    first-touch page faults then cost as much as the arithmetic (2x on the blur ops, measured in a VM).
    The pool keeps the most recently used arrays up to 16 MB each.
    """
    dtype = np.dtype(dtype)
    key = (tag, shape, dtype.char)
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    array = pool.pop(key, None)
    if array is None:
        array = np.empty(shape, dtype)
        if array.nbytes > _SCRATCH_MAX_BYTES:
            return array
        while len(pool) >= _SCRATCH_ENTRIES:
            pool.pop(next(iter(pool)))
    pool[key] = array  # most recently used last
    return array


@njit(cache=True)
def f32_div_255(image: np.ndarray, out: np.ndarray) -> None:
    """out = np.asarray(image, np.float32) / 255. — a float32 division, as NumPy evaluates it."""
    src = image.reshape(-1)
    dst = out.reshape(-1)
    for q in range(src.size):
        dst[q] = np.float32(src[q]) / np.float32(255.0)


@njit(cache=True)
def unit_from_u8(image: np.ndarray, out: np.ndarray) -> None:
    """out = image / 255. in float64 (the reference's first step of most ops)."""
    lut = np.empty(256)
    for v in range(256):
        lut[v] = v / 255.0
    src = image.reshape(-1)
    dst = out.reshape(-1)
    for q in range(src.size):
        dst[q] = lut[src[q]]


@lru_cache(maxsize=64)
def gaussian_weights(sigma: float, truncate: float) -> np.ndarray:
    """SciPy's `_gaussian_kernel1d(sigma, 0, int(truncate * sigma + 0.5))`, same expression, same bits."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    weights = phi / phi.sum()
    weights.setflags(write=False)
    return weights


@njit(cache=True, inline="always")
def _border(i: int, n: int, mode: int) -> int:
    if mode == NEAREST:
        return 0 if i < 0 else (n - 1 if i >= n else i)
    while i < 0 or i >= n:  # 'reflect' = half-sample symmetric: d c b a | a b c d | d c b a
        i = -i - 1 if i < 0 else 2 * n - i - 1
    return i


# Hot loops index flat arrays with uint64 offsets: numba then emits no negative-index wraparound
# check, and LLVM vectorises the contiguous loops (3-8x faster than signed offsets on these kernels).

@njit(cache=True)
def _correlate_rows(src: np.ndarray, w: np.ndarray, mode: int, out: np.ndarray) -> None:
    """Axis 0 of (H, K): each output row from whole input rows, so the inner loop is contiguous."""
    h, k = src.shape
    s = src.reshape(-1)
    o = out.reshape(-1)
    n = np.uint64(k)
    r = w.size // 2
    acc = np.empty(k)
    for i in range(h):
        base = np.uint64(i) * n
        wc = w[r]
        for q in range(n):
            acc[q] = s[base + q] * wc
        for d in range(r, 0, -1):
            lo = np.uint64(_border(i - d, h, mode)) * n
            hi = np.uint64(_border(i + d, h, mode)) * n
            above = s[lo:lo + n]
            below = s[hi:hi + n]
            wd = w[r - d]
            for q in range(n):
                acc[q] += (above[q] + below[q]) * wd
        for q in range(n):
            o[base + q] = acc[q]


@njit(cache=True)
def _correlate_cols(src: np.ndarray, w: np.ndarray, mode: int, how: int, out: np.ndarray) -> None:
    """Axis 1 of (H, W, C) through a padded line buffer (SciPy's line buffer, with its border); the
    result is stored per `how` (FLOAT, TO_U8 or CLIP_TO_U8) into `out`."""
    h, wd, c = src.shape
    s = src.reshape(-1)
    o = out.reshape(-1)
    r = w.size // 2
    n = np.uint64(wd * c)
    uc = np.uint64(c)
    pad = np.empty((wd + 2 * r) * c)
    acc = np.empty(wd * c)
    for i in range(h):
        row = np.uint64(i) * n
        inner = np.uint64(r) * uc
        for q in range(n):
            pad[inner + q] = s[row + q]
        for e in range(2 * r):  # the r border samples on each side
            x = e - r if e < r else wd + e - r
            src_off = row + np.uint64(_border(x, wd, mode)) * uc
            dst_off = np.uint64(x + r) * uc
            for ch in range(uc):
                pad[dst_off + ch] = s[src_off + ch]
        centre = np.uint64(r) * uc
        wc = w[r]
        for q in range(n):
            acc[q] = pad[centre + q] * wc
        for d in range(r, 0, -1):
            lo = np.uint64(r - d) * uc
            hi = np.uint64(r + d) * uc
            left = pad[lo:lo + n]  # separate views let LLVM vectorise (no same-array offset aliasing)
            right = pad[hi:hi + n]
            wdd = w[r - d]
            for q in range(n):
                acc[q] += (left[q] + right[q]) * wdd
        if how == FLOAT:
            for q in range(n):
                o[row + q] = acc[q]
        elif how == TO_U8:
            for q in range(n):
                o[row + q] = np.uint8(acc[q] * 255.0)
        else:
            for q in range(n):
                o[row + q] = np.uint8(min(max(acc[q], 0.0), 1.0) * 255.0)


def gaussian_filter(image: np.ndarray, sigma: tuple[float, float], mode: int = NEAREST, truncate: float = 4.0,
                    dtype: type = np.float64, out: np.ndarray | None = None, how: int = FLOAT) -> np.ndarray:
    """`scipy.ndimage.gaussian_filter` over both spatial axes (sigma > 0) of (H, W) or (H, W, C), computed
    in `dtype` (SciPy: the input's float dtype, the intermediate rounded to it too), stored into `out`
    (new if None) as is or quantised per `how`. uint8 input means `image / 255.` (read through a table)."""
    h, w = image.shape[:2]
    c = image.shape[2] if image.ndim == 3 else 1
    if image.dtype == np.uint8:
        x = scratch("gauss-in", (h, w, c), np.float64)
        unit_from_u8(image, x)
    else:
        x = np.ascontiguousarray(image, dtype=dtype).reshape(h, w, c)
    tmp = scratch("gauss-tmp", (h, w, c), dtype)
    _correlate_rows(x.reshape(h, w * c), gaussian_weights(sigma[0], truncate), mode, tmp.reshape(h, w * c))
    if out is None:
        out = np.empty(image.shape, dtype if how == FLOAT else np.uint8)
    _correlate_cols(tmp, gaussian_weights(sigma[1], truncate), mode, how, out.reshape(h, w, c))
    return out


class AxisMap:
    """Per-axis tables of `zoom(order=1)`: source indices, spline weights and constant-mode zeros."""

    def __init__(self, n_in: int, n_out: int) -> None:
        zoom = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0
        cc = np.arange(n_out, dtype=np.float64) * zoom
        self.zero = cc > n_in - 1  # constant mode: rounding can push the last sample just outside
        start = np.floor(cc)
        t = cc - start
        self.w0 = 1.0 - t
        self.w1 = 1.0 - self.w0
        self.i0 = np.minimum(start.astype(np.int64), n_in - 1)
        nxt = self.i0 + 1
        self.i1 = np.where(nxt < n_in, nxt, np.maximum(2 * n_in - 2 - nxt, 0))  # mirrored; its weight is 0

    def expanded(self, channels: int, keep: int) -> tuple[np.ndarray, ...]:
        """For the first `keep` outputs of a flat row of `channels`-interleaved values: source indices
        and weights per (column, channel), and the runs — rows (start, length, first source index of
        tap 0, of tap 1) over which both indices advance with the output index, which the kernel reads
        as contiguous memory instead of gathering (worth it when runs are long, i.e. zoom near 1)."""
        ch = np.arange(channels)
        i0 = (self.i0[:keep, None] * channels + ch).reshape(-1)
        i1 = (self.i1[:keep, None] * channels + ch).reshape(-1)
        q = np.arange(i0.size)
        d0, d1 = i0 - q, i1 - q
        breaks = np.flatnonzero((np.diff(d0) != 0) | (np.diff(d1) != 0)) + 1
        starts = np.r_[0, breaks]
        runs = np.stack([starts, np.diff(np.r_[starts, i0.size]), i0[starts], i1[starts]], axis=1).astype(np.int64)
        w0 = np.repeat(self.w0[:keep], channels)
        w1 = np.repeat(self.w1[:keep], channels)
        return runs, i0.astype(np.uint64), i1.astype(np.uint64), w0, w1


@lru_cache(maxsize=256)
def _axis_map(n_in: int, n_out: int) -> AxisMap:
    return AxisMap(n_in, n_out)


@njit(cache=True)
def _zoom_rows(src: np.ndarray, top: int, left: int, y0: np.ndarray, y1: np.ndarray, wy0: np.ndarray,
               wy1: np.ndarray, yzero: np.ndarray, runs: np.ndarray, x0: np.ndarray, x1: np.ndarray,
               wx0: np.ndarray, wx1: np.ndarray, taps0: np.ndarray, taps1: np.ndarray, out: np.ndarray,
               accumulate: bool) -> None:
    """out rows (+)= zoomed rows of the crop at row `top`, flat column `left`; `src` (H, W·C) and `out`
    (oh, ow·C) flat per row; x indices/weights per (column, channel).

    First each source row the output needs is gathered once into `taps0`/`taps1` (its values at the
    two x taps of every output column: copies run by run, or a gather when `runs` is empty); then
    every output row is a contiguous, vectorisable combination of four such rows."""
    oh, on = out.shape
    s = src.reshape(-1)
    o = out.reshape(-1)
    stride = np.uint64(src.shape[1])
    first = np.uint64(left)
    n = np.uint64(on)
    lo_row = y0[0]
    for r in range(taps0.shape[0]):
        base = np.uint64(top + lo_row + r) * stride + first
        g0 = taps0[r]
        g1 = taps1[r]
        if runs.shape[0] == 0:
            for q in range(n):
                g0[q] = s[base + x0[q]]
                g1[q] = s[base + x1[q]]
        else:
            for g in range(runs.shape[0]):
                q0 = np.uint64(runs[g, 0])
                j0 = base + np.uint64(runs[g, 2])
                j1 = base + np.uint64(runs[g, 3])
                for k in range(np.uint64(runs[g, 1])):
                    g0[q0 + k] = s[j0 + k]
                    g1[q0 + k] = s[j1 + k]
    for i in range(oh):
        row = np.uint64(i) * n
        if yzero[i]:
            if not accumulate:
                for q in range(n):
                    o[row + q] = 0.0
            continue
        a0 = taps0[y0[i] - lo_row]
        a1 = taps1[y0[i] - lo_row]
        b0 = taps0[y1[i] - lo_row]
        b1 = taps1[y1[i] - lo_row]
        wa = wy0[i]
        wb = wy1[i]
        for q in range(n):
            u = wx0[q]
            v = wx1[q]
            t = (((np.float64(a0[q]) * wa) * u + (np.float64(a1[q]) * wa) * v) + (np.float64(b0[q]) * wb) * u) \
                + (np.float64(b1[q]) * wb) * v
            if accumulate:
                o[row + q] += np.float32(t)  # the reference adds float32 layers
            else:
                o[row + q] = t


class ZoomPlan:
    """Everything `zoom_linear` needs for one (crop size, zoomed size, channels, kept window)."""

    def __init__(self, h: int, w: int, out_shape: tuple[int, int], channels: int, window: tuple[int, int]) -> None:
        oh, ow = window
        self.ym = _axis_map(h, out_shape[0])
        self.runs, self.x0, self.x1, self.wx0, self.wx1 = _axis_map(w, out_shape[1]).expanded(channels, ow)
        if self.runs.shape[0] * 8 > self.x0.size:  # short runs (strong zoom): gathering is cheaper
            self.runs = self.runs[:0]
        self.xzero = _axis_map(w, out_shape[1]).zero[:ow]
        self.any_xzero = bool(self.xzero.any())
        self.rows = int(max(self.ym.i0[:oh].max(), self.ym.i1[:oh].max()) - self.ym.i0[0] + 1)


@lru_cache(maxsize=256)
def _zoom_plan(h: int, w: int, out_shape: tuple[int, int], channels: int, window: tuple[int, int]) -> ZoomPlan:
    return ZoomPlan(h, w, out_shape, channels, window)


def zoom_linear(src: np.ndarray, box: tuple[int, int, int, int], out_shape: tuple[int, int], out: np.ndarray,
                accumulate: bool = False) -> None:
    """`scipy.ndimage.zoom(crop, (zy, zx, 1), order=1)` of the crop `box` = (top, left, h, w) of a
    contiguous (H, W, C) `src`, whose full output would be `out_shape`; writes its top-left
    `out.shape[:2]` window into the contiguous `out` (the fork's `clipped_zoom(...)[:H, :W]`) or,
    `accumulate`, adds it as float32 to a float32 `out`."""
    top, left, h, w = box
    c = src.shape[2]
    oh, ow = min(out.shape[0], out_shape[0]), min(out.shape[1], out_shape[1])
    plan = _zoom_plan(h, w, out_shape, c, (oh, ow))
    direct = ow == out.shape[1] and not plan.any_xzero
    target = out[:oh].reshape(oh, ow * c) if direct else np.zeros((oh, ow * c), out.dtype)
    taps0 = scratch("zoom-taps0", (src.shape[0], ow * c), src.dtype)[: plan.rows]  # one buffer for all layers
    taps1 = scratch("zoom-taps1", (src.shape[0], ow * c), src.dtype)[: plan.rows]
    ym = plan.ym
    _zoom_rows(src.reshape(src.shape[0], -1), top, left * c, ym.i0, ym.i1, ym.w0, ym.w1, ym.zero, plan.runs,
               plan.x0, plan.x1, plan.wx0, plan.wx1, taps0, taps1, target, accumulate)
    if not direct:
        window = target.reshape(oh, ow, c)
        window[:, plan.xzero] = 0.0  # constant mode outside the input
        if accumulate:
            out[:oh, :ow] += window
        else:
            out[:oh, :ow] = window


@njit(cache=True)
def motion_blur(src: np.ndarray, dys: np.ndarray, dxs: np.ndarray, weights: np.ndarray, to_u8: bool,
                out: np.ndarray) -> None:
    """out = Σ_i weights[i] · src shifted by (dys[i], dxs[i]) with edge replication, summed in tap
    order from 0.0 in float64 (the fork's `shift` + `blurred = blurred + kernel[i] * shifted`);
    `to_u8` stores `np.uint8(np.clip(sum, 0, 255))` instead of the float."""
    h, w, c = src.shape
    s = src.reshape(-1)
    o = out.reshape(-1)
    n = np.uint64(w * c)
    uc = np.uint64(c)
    acc = np.empty(w * c)
    for y in range(h):
        for q in range(n):
            acc[q] = 0.0
        for t in range(dys.size):
            row = np.uint64(min(max(y - dys[t], 0), h - 1)) * n
            k = weights[t]
            dx = dxs[t]
            lo = min(max(dx, 0), w)  # columns x < dx read column 0
            hi = max(min(w + dx, w), 0)  # columns x >= w + dx read column w - 1
            for x in range(lo):
                at = np.uint64(x) * uc
                for ch in range(uc):
                    acc[at + ch] += k * s[row + ch]
            start = np.uint64(lo) * uc
            from_ = row + np.uint64(lo - dx) * uc
            for q in range(np.uint64(hi - lo) * uc):
                acc[start + q] += k * s[from_ + q]
            last = row + np.uint64(w - 1) * uc
            for x in range(hi, w):
                at = np.uint64(x) * uc
                for ch in range(uc):
                    acc[at + ch] += k * s[last + ch]
        base = np.uint64(y) * n
        if to_u8:
            for q in range(n):
                o[base + q] = np.uint8(min(max(acc[q], 0.0), 255.0))
        else:
            for q in range(n):
                o[base + q] = acc[q]


@njit(cache=True, inline="always")
def _reflect_coordinate(x: float, n: int) -> float:
    """SciPy's `map_coordinate` for NI_EXTEND_REFLECT (coordinate level; support indices are then
    reflected the same way, half-sample symmetric)."""
    if x < 0:
        if n <= 1:
            return 0.0
        sz2 = 2 * n
        if x < -sz2:
            x = sz2 * int(-x / sz2) + x
        return x + sz2 if x < -n else (1e-15 if x > -1e-15 else -x) - 1
    if x > n - 1:
        if n <= 1:
            return 0.0
        sz2 = 2 * n
        x -= sz2 * int(x / sz2)
        if x >= n:
            x = sz2 - x - 1
    return x


@njit(cache=True)
def map_linear_reflect(src: np.ndarray, dy: np.ndarray, dx: np.ndarray, out: np.ndarray) -> None:
    """out[i, j, c] = `map_coordinates(src, [i + dy[i, j], j + dx[i, j], c], order=1, mode='reflect')`
    for float32 (H, W, C) `src`/`out` and float32 shift fields (coordinates formed in float64)."""
    h, w, c = src.shape
    s = src.reshape(-1)
    o = out.reshape(-1)
    fy = dy.reshape(-1)
    fx = dx.reshape(-1)
    uw = np.uint64(w)
    uc = np.uint64(c)
    for i in range(h):
        for j in range(w):
            p = np.uint64(i) * uw + np.uint64(j)
            at = p * uc
            yy = np.float64(i) + np.float64(fy[p])
            xx = np.float64(j) + np.float64(fx[p])
            if 0.0 <= yy < h - 1 and 0.0 <= xx < w - 1:  # inside: no border mapping (floor = int)
                y0 = int(yy)
                x0 = int(xx)
                wy0 = 1.0 - (yy - y0)
                wx0 = 1.0 - (xx - x0)
                r0 = np.uint64(y0) * uw
                r1 = r0 + uw
                c0 = np.uint64(x0)
                c1 = c0 + np.uint64(1)
            else:
                cy = _reflect_coordinate(yy, h)
                cx = _reflect_coordinate(xx, w)
                if cy <= -1.0 or cx <= -1.0:
                    for ch in range(uc):
                        o[at + ch] = 0.0
                    continue
                ry = np.floor(cy)
                rx = np.floor(cx)
                y0 = int(ry)
                x0 = int(rx)
                wy0 = 1.0 - (cy - ry)
                wx0 = 1.0 - (cx - rx)
                r0 = np.uint64(_border(y0, h, REFLECT)) * uw
                r1 = np.uint64(_border(y0 + 1, h, REFLECT)) * uw
                c0 = np.uint64(_border(x0, w, REFLECT))
                c1 = np.uint64(_border(x0 + 1, w, REFLECT))
            wy1 = 1.0 - wy0
            wx1 = 1.0 - wx0
            p00 = (r0 + c0) * uc
            p01 = (r0 + c1) * uc
            p10 = (r1 + c0) * uc
            p11 = (r1 + c1) * uc
            for ch in range(uc):
                t = ((np.float64(s[p00 + ch]) * wy0) * wx0 + (np.float64(s[p01 + ch]) * wy0) * wx1) \
                    + (np.float64(s[p10 + ch]) * wy1) * wx0
                o[at + ch] = t + (np.float64(s[p11 + ch]) * wy1) * wx1

"""Shape classes of the mini-world as polygons in unit coordinates (centre 0, radius ~1).

Every shape is a list of rings (outer boundary, then holes), so one rasteriser draws them all and
rotation/scale/translation apply uniformly. Shapes are chosen to stay distinguishable under the
small rotations (±20°) the renderer applies: the diamond is a narrow rhombus, not a turned square.
"""

from __future__ import annotations

import math

Ring = list[tuple[float, float]]


def _ngon(n: int, r: float = 1.0, phase: float = -math.pi / 2, sx: float = 1.0) -> Ring:
    return [(sx * r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(points: int = 5, inner: float = 0.45) -> Ring:
    ring = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * k / points
        ring.append((r * math.cos(a), r * math.sin(a)))
    return ring


def _heart(n: int = 40) -> Ring:
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x / 17.0, (y + 2.0) / 17.0))
    return pts


def _cross(arm: float = 0.34) -> Ring:
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


def _arrow() -> Ring:
    return [(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25), (-1, 0.25)]


def _crescent(n: int = 40) -> list[Ring]:
    """Outer disc with an offset disc removed (drawn as a hole)."""
    return [_ngon(n), [(x * 0.85 + 0.45, y * 0.85 - 0.1) for x, y in _ngon(n)]]


SHAPES: dict[str, list[Ring]] = {
    "circle": [_ngon(48)],
    "square": [_ngon(4, r=1.2, phase=math.pi / 4)],
    "triangle": [[(x, y + 0.2) for x, y in _ngon(3, r=1.15)]],
    "star": [_star()],
    "heart": [_heart()],
    "cross": [_cross()],
    "hexagon": [_ngon(6)],
    "crescent": _crescent(),
    "arrow": [_arrow()],
    "diamond": [_ngon(4, r=1.1, sx=0.55)],
    "ring": [_ngon(48), _ngon(48, r=0.55)],
    "pentagon": [_ngon(5)],
}


def transform(rings: list[Ring], cx: float, cy: float, radius: float, angle_deg: float) -> list[Ring]:
    """Rotate by `angle_deg`, scale by `radius` and move to (cx, cy) in pixel coordinates."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return [[(cx + radius * (c * x - s * y), cy + radius * (s * x + c * y)) for x, y in ring] for ring in rings]

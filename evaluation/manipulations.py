"""Seeded local manipulations of one frame, shared by tamper-detector training and evaluation.

Layer: evaluation (numpy + scipy.ndimage only). Issue 3 needs the same manipulation generator to
make training examples and to score the detector, so each manipulation is a plain function of
``(frame, rng)`` that returns the manipulated pixels together with the ground-truth mask.

Interface: ``fn(frame, rng, *, value_range) -> Manipulation`` (``splice`` also takes ``donor``).

- ``frame`` is ONE grey frame ``(H, W)`` in stored units at native dtype;
- ``rng`` is a seeded :class:`numpy.random.Generator`, the only source of randomness;
- ``value_range`` is the stored range ``(lo, hi)`` (``stored_range(meta, dtype)``); manipulated
  pixels are rounded (integer dtypes) and clipped to it.

``size`` (keyword, optional, every family): the side in pixels of the edit's bounding square (a
disc's diameter, a patch's side, an ellipse's major axis; its minor axis is drawn in 0.75-1x of
that), instead of the family's own draw; the random draws are the same either way, so without
``size`` every seeded result is unchanged (training data included). A size the frame cannot hold
raises :class:`UsageError`.

Every manipulation writes only where its (feathered) alpha is above zero and ``mask`` is exactly
that set, so pixels outside ``mask`` are bit-identical to the input. Sites are drawn only where the
frame has texture (local std above a low percentile) and is away from its minimum/maximum values
(flat or saturated background), so the change is visible; a frame with no such site raises
:class:`UsageError`. Sizes are in pixels of the given frame: the caller scales for resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from medsec_edge.runtime.errors import UsageError

_SITE_WINDOW_PX = 9
_SITE_STD_PERCENTILE = 10.0


@dataclass(frozen=True)
class Manipulation:
    """A manipulated frame and where it was manipulated.

    ``pixels`` has the input's shape and dtype in native stored units; ``mask`` is ``(H, W)`` bool,
    True where pixels were manipulated; ``size_px`` is the equivalent diameter of ``mask``
    (``2 * sqrt(area / pi)``) and ``size_bin`` its bin (``'<16'``, ``'16-32'``, ``'32-64'``,
    ``'>=64'``).
    """

    pixels: np.ndarray
    mask: np.ndarray
    kind: str
    size_px: int
    size_bin: str


def size_bin_of(size_px: float) -> str:
    """The reporting bin of an equivalent diameter in pixels."""
    if size_px < 16:
        return "<16"
    if size_px < 32:
        return "16-32"
    if size_px < 64:
        return "32-64"
    return ">=64"


# --- helpers ---------------------------------------------------------------------------------


def _check(frame: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 2:
        raise UsageError(f"manipulations take one grey frame (H, W), got shape {frame.shape}: pass frames one by one")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not lo < hi:
        raise UsageError(f"value_range must be (lo, hi) with lo < hi, got {value_range}")
    return frame.astype(np.float64)


def _valid_sites(f: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Pixels around which the frame is textured and not flat/saturated background."""
    mean = ndimage.uniform_filter(f, _SITE_WINDOW_PX, mode="reflect")
    sq = ndimage.uniform_filter(f * f, _SITE_WINDOW_PX, mode="reflect")
    local_std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    lo, hi = value_range
    saturated = (f <= f.min()) | (f >= f.max()) | (f <= lo) | (f >= hi)
    near_saturated = ndimage.maximum_filter(saturated, _SITE_WINDOW_PX)
    candidates = ~near_saturated & (local_std > 0)
    if not candidates.any():
        return candidates
    # Relative tolerance: rounding noise in uniform_filter must not count as texture.
    floor = max(np.percentile(local_std[candidates], _SITE_STD_PERCENTILE), 1e-9 * (hi - lo))
    return candidates & (local_std > floor)


def _pick_site(valid: np.ndarray, margin: int, rng: np.random.Generator, what: str) -> tuple[int, int]:
    h, w = valid.shape
    if h <= 2 * margin or w <= 2 * margin:
        raise UsageError(f"{what}: frame {h}x{w} is too small for a region {2 * margin} px across")
    inner = np.zeros_like(valid)
    inner[margin : h - margin, margin : w - margin] = valid[margin : h - margin, margin : w - margin]
    idx = np.flatnonzero(inner)
    if idx.size == 0:
        raise UsageError(
            f"{what}: no textured, unsaturated site in this frame (flat or constant image?): "
            "manipulations need visible content"
        )
    cy, cx = divmod(int(idx[rng.integers(idx.size)]), w)
    return cy, cx


def _sized(drawn: float, size: float | None, shape: tuple[int, int], what: str) -> float:
    """The family's own draw, or ``size`` when given (refused when the frame cannot hold it)."""
    if size is None:
        return drawn
    size = float(size)
    if not 4.0 <= size <= min(shape) / 2.0:
        raise UsageError(f"{what}: size {size:g} px needs 4 <= size <= half the frame's shorter side "
                         f"({min(shape) // 2} px here)")
    return size


def _box(cy: int, cx: int, ext: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    h, w = shape
    return max(cy - ext, 0), min(cy + ext + 1, h), max(cx - ext, 0), min(cx + ext + 1, w)


def _offsets(box: tuple[int, int, int, int], cy: float, cx: float) -> tuple[np.ndarray, np.ndarray]:
    y0, y1, x0, x1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1]
    return yy - cy, xx - cx


def _disc_alpha(dy: np.ndarray, dx: np.ndarray, radius: float, feather: float) -> np.ndarray:
    dist = np.hypot(dy, dx)
    return np.clip((radius - dist) / max(feather, 1e-6), 0.0, 1.0)


def _ellipse_alpha(dy, dx, a: float, b: float, theta: float, feather: float) -> np.ndarray:
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return np.clip((1.0 - rho) * min(a, b) / max(feather, 1e-6), 0.0, 1.0)


def _square_alpha(size: int, feather: float) -> np.ndarray:
    i = np.arange(size, dtype=np.float64)
    edge = np.minimum(i, size - 1 - i) + 1.0  # 1 at the outermost row: every pasted pixel counts
    ramp = np.clip(edge / max(feather, 1e-6), 0.0, 1.0)
    return np.minimum.outer(ramp, ramp)


def _robust_std(values: np.ndarray) -> float:
    med = np.median(values)
    return float(1.4826 * np.median(np.abs(values - med)))


def _residual_std(f: np.ndarray, cy: int, cx: int, ext: int) -> float:
    """Std of the high-pass (noise/texture) around a site, estimated robustly."""
    y0, y1, x0, x1 = _box(cy, cx, ext + 4, f.shape)
    region = f[y0:y1, x0:x1]
    high = region - ndimage.gaussian_filter(region, 1.5, mode="reflect")
    return _robust_std(high)


def _frame_std(f: np.ndarray, valid: np.ndarray) -> float:
    values = f[valid] if valid.any() else f.ravel()
    s = _robust_std(values)
    return s if s > 0 else float(values.std())


def _finish(
    frame: np.ndarray,
    f: np.ndarray,
    box: tuple[int, int, int, int],
    alpha: np.ndarray,
    new_box: np.ndarray,
    value_range: tuple[float, float],
    kind: str,
) -> Manipulation:
    y0, y1, x0, x1 = box
    region_mask = alpha > 0
    if not region_mask.any():
        raise UsageError(f"{kind}: the drawn region is empty (frame too small?)")
    blended = f[y0:y1, x0:x1] * (1.0 - alpha) + new_box * alpha
    values = blended[region_mask]
    lo, hi = float(value_range[0]), float(value_range[1])
    if np.issubdtype(frame.dtype, np.integer):
        values = np.rint(values)
        info = np.iinfo(frame.dtype)
        lo, hi = max(lo, info.min), min(hi, info.max)
    values = np.clip(values, lo, hi)
    pixels = frame.copy()
    pixels[y0:y1, x0:x1][region_mask] = values.astype(frame.dtype)
    mask = np.zeros(frame.shape, dtype=bool)
    mask[y0:y1, x0:x1] = region_mask
    size_px = int(round(2.0 * math.sqrt(mask.sum() / math.pi)))
    return Manipulation(pixels=pixels, mask=mask, kind=kind, size_px=size_px, size_bin=size_bin_of(size_px))


# --- manipulations ---------------------------------------------------------------------------


def inject_lesion(frame: np.ndarray, rng: np.random.Generator, *, value_range: tuple[float, float],
                  size: float | None = None) -> Manipulation:
    """Add a solid or ground-glass blob (diameter 4-30 px, or ``size``; soft edge) with matched noise texture."""
    f = _check(frame, value_range)
    valid = _valid_sites(f, value_range)
    diameter = _sized(float(rng.uniform(4.0, 30.0)), size, f.shape, "inject_lesion")
    radius = diameter / 2.0
    ext = int(math.ceil(radius)) + 1
    cy, cx = _pick_site(valid, ext, rng, "inject_lesion")
    box = _box(cy, cx, ext, f.shape)
    dy, dx = _offsets(box, cy, cx)
    alpha = _disc_alpha(dy, dx, radius, feather=max(1.0, 0.3 * radius))
    region = f[box[0] : box[1], box[2] : box[3]]
    inside = alpha > 0
    local_mean = float(region[inside].mean())
    sigma_frame = _frame_std(f, valid)
    noise_std = _residual_std(f, cy, cx, ext)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    noise = rng.standard_normal(region.shape) * noise_std
    if rng.random() < 0.5:
        # Solid: the blob replaces the tissue, with its own noise of the same texture.
        offset = sign * rng.uniform(0.5, 1.5) * sigma_frame
        new_box = local_mean + offset + noise
    else:
        # Ground glass: a faint haze over the tissue, which stays visible through it.
        offset = sign * rng.uniform(0.2, 0.5) * sigma_frame
        new_box = region + offset + 0.5 * noise
    return _finish(frame, f, box, alpha, new_box, value_range, "inject_lesion")


def remove_lesion(frame: np.ndarray, rng: np.random.Generator, *, value_range: tuple[float, float],
                  size: float | None = None) -> Manipulation:
    """Inpaint a disc (diameter 6-30 px, or ``size``) by diffusion from the ring around it, plus matched noise."""
    f = _check(frame, value_range)
    valid = _valid_sites(f, value_range)
    diameter = _sized(float(rng.uniform(6.0, 30.0)), size, f.shape, "remove_lesion")
    radius = diameter / 2.0
    ext = int(math.ceil(radius)) + 2
    cy, cx = _pick_site(valid, ext, rng, "remove_lesion")
    box = _box(cy, cx, ext, f.shape)
    dy, dx = _offsets(box, cy, cx)
    hole = np.hypot(dy, dx) < radius
    region = f[box[0] : box[1], box[2] : box[3]]
    u = region.copy()
    u[hole] = region[~hole].mean()
    # Jacobi iterations of Laplace's equation on the small box only; the ring is the boundary.
    for _ in range(300):
        avg = 0.25 * (np.roll(u, 1, 0) + np.roll(u, -1, 0) + np.roll(u, 1, 1) + np.roll(u, -1, 1))
        u[hole] = avg[hole]
    u = u + rng.standard_normal(u.shape) * _residual_std(f, cy, cx, ext)
    return _finish(frame, f, box, hole.astype(np.float64), u, value_range, "remove_lesion")


def _patch_size(shape: tuple[int, int], rng: np.random.Generator, what: str) -> int:
    s_max = min(64, min(shape) // 4)
    if s_max < 16:
        raise UsageError(f"{what}: frame {shape[0]}x{shape[1]} is too small for a 16 px patch (needs >= 64 px)")
    return int(rng.integers(16, s_max + 1))


def _paste(
    frame, f, patch: np.ndarray, cy: int, cx: int, value_range, kind: str
) -> Manipulation:
    s = patch.shape[0]
    y0, x0 = cy - s // 2, cx - s // 2
    box = (y0, y0 + s, x0, x0 + s)
    alpha = _square_alpha(s, feather=max(2.0, s / 8.0))
    return _finish(frame, f, box, alpha, patch, value_range, kind)


def copy_move(
    frame: np.ndarray,
    rng: np.random.Generator,
    *,
    value_range: tuple[float, float],
    neighbour: np.ndarray | None = None,
    size: float | None = None,
) -> Manipulation:
    """Copy a patch (16-64 px) elsewhere in the frame, optionally rotated/scaled, feathered.

    With ``neighbour`` (an adjacent frame of the same series, same shape) the patch is read from
    that frame instead, as when a finding is copied from the next slice.
    """
    f = _check(frame, value_range)
    if neighbour is not None and np.shape(neighbour) != f.shape:
        raise UsageError(f"copy_move neighbour must have the frame's shape {f.shape}, got {np.shape(neighbour)}")
    source = f if neighbour is None else np.asarray(neighbour, dtype=np.float64)
    valid = _valid_sites(f, value_range)
    s = int(round(_sized(_patch_size(f.shape, rng, "copy_move"), size, f.shape, "copy_move")))
    angle = float(rng.uniform(-15.0, 15.0)) if rng.random() < 0.5 else 0.0
    scale = float(rng.uniform(0.8, 1.2)) if rng.random() < 0.5 else 1.0
    # The source read extent (rotated and scaled square) so source and paste never overlap.
    read_half = int(math.ceil(s / 2.0 * math.sqrt(2.0) / scale)) + 1
    sy, sx = _pick_site(valid, read_half, rng, "copy_move")
    half = s // 2 + 1
    h, w = f.shape
    yy, xx = np.ogrid[:h, :w]
    far = (np.abs(yy - sy) > read_half + half) | (np.abs(xx - sx) > read_half + half)
    cy, cx = _pick_site(valid & far, half, rng, "copy_move (no non-overlapping destination)")
    # Same map as ndimage.rotate + zoom of the patch, done in one resampling of the frame.
    off = np.arange(s, dtype=np.float64) - (s - 1) / 2.0
    oy, ox = np.meshgrid(off, off, indexing="ij")
    t = math.radians(angle)
    iy = sy + (math.cos(t) * oy - math.sin(t) * ox) / scale
    ix = sx + (math.sin(t) * oy + math.cos(t) * ox) / scale
    patch = ndimage.map_coordinates(source, [iy, ix], order=1, mode="nearest")
    return _paste(frame, f, patch, cy, cx, value_range, "copy_move")


def splice(
    frame: np.ndarray,
    rng: np.random.Generator,
    *,
    value_range: tuple[float, float],
    donor: np.ndarray | None = None,
    size: float | None = None,
) -> Manipulation:
    """Paste a patch (16-64 px) of a different frame, mean/std matched to the target site, feathered."""
    f = _check(frame, value_range)
    if donor is None:
        raise UsageError("splice needs a donor frame: pass donor=<another (H, W) frame>")
    d = np.asarray(donor)
    if d.ndim != 2:
        raise UsageError(f"splice donor must be one grey frame (H, W), got shape {d.shape}")
    d = d.astype(np.float64)
    valid = _valid_sites(f, value_range)
    s = min(int(round(_sized(_patch_size(f.shape, rng, "splice"), size, f.shape, "splice"))), min(d.shape) // 2)
    if s < 16:
        raise UsageError(f"splice: donor {d.shape[0]}x{d.shape[1]} is too small for a 16 px patch")
    half = s // 2 + 1
    d_valid = _valid_sites(d, (float(d.min()) - 1.0, float(d.max()) + 1.0))
    dy, dx = _pick_site(d_valid, half, rng, "splice (donor)")
    patch = d[dy - s // 2 : dy - s // 2 + s, dx - s // 2 : dx - s // 2 + s]
    cy, cx = _pick_site(valid, half, rng, "splice")
    target = f[cy - s // 2 : cy - s // 2 + s, cx - s // 2 : cx - s // 2 + s]
    p_std = patch.std()
    t_std = max(float(target.std()), _residual_std(f, cy, cx, half))
    matched = (patch - patch.mean()) / (p_std if p_std > 0 else 1.0) * t_std + target.mean()
    return _paste(frame, f, matched, cy, cx, value_range, "splice")


def _ellipse_site(f, valid, rng, what: str, size: float | None = None):
    a = float(rng.uniform(4.0, 32.0))
    b_lo, b_hi = max(4.0, a / 2.0), min(32.0, a * 2.0)
    b = float(rng.uniform(b_lo, b_hi))
    if size is not None:  # major axis = size, minor 0.75-1x of it (same draws, rescaled)
        frac = (b - b_lo) / (b_hi - b_lo) if b_hi > b_lo else 1.0
        a = _sized(a, size, f.shape, what) / 2.0
        b = a * (0.75 + 0.25 * frac)
    theta = float(rng.uniform(0.0, math.pi))
    ext = int(math.ceil(max(a, b))) + 1
    cy, cx = _pick_site(valid, ext, rng, what)
    box = _box(cy, cx, ext, f.shape)
    dy, dx = _offsets(box, cy, cx)
    alpha = _ellipse_alpha(dy, dx, a, b, theta, feather=max(1.5, 0.25 * min(a, b)))
    return cy, cx, ext, box, alpha


def local_contrast(frame: np.ndarray, rng: np.random.Generator, *, value_range: tuple[float, float],
                   size: float | None = None) -> Manipulation:
    """Scale the deviation from the local mean by 0.6-1.6, or add an offset, inside an ellipse."""
    f = _check(frame, value_range)
    valid = _valid_sites(f, value_range)
    cy, cx, ext, box, alpha = _ellipse_site(f, valid, rng, "local_contrast", size)
    region = f[box[0] : box[1], box[2] : box[3]]
    if rng.random() < 0.5:
        k = float(rng.uniform(0.6, 0.85)) if rng.random() < 0.5 else float(rng.uniform(1.2, 1.6))
        pad = _box(cy, cx, ext + 8, f.shape)
        mean = ndimage.gaussian_filter(f[pad[0] : pad[1], pad[2] : pad[3]], 4.0, mode="reflect")
        mean = mean[box[0] - pad[0] : box[1] - pad[0], box[2] - pad[2] : box[3] - pad[2]]
        new_box = mean + k * (region - mean)
    else:
        sign = 1.0 if rng.random() < 0.5 else -1.0
        new_box = region + sign * rng.uniform(0.3, 1.0) * _frame_std(f, valid)
    return _finish(frame, f, box, alpha, new_box, value_range, "local_contrast")


def _filtered_box(f, cy, cx, ext, box, fn, margin: int) -> np.ndarray:
    pad = _box(cy, cx, ext + margin, f.shape)
    out = fn(f[pad[0] : pad[1], pad[2] : pad[3]])
    return out[box[0] - pad[0] : box[1] - pad[0], box[2] - pad[2] : box[3] - pad[2]]


def local_blur(frame: np.ndarray, rng: np.random.Generator, *, value_range: tuple[float, float],
               size: float | None = None) -> Manipulation:
    """Gaussian blur (sigma 1-3 px) inside a feathered ellipse."""
    f = _check(frame, value_range)
    valid = _valid_sites(f, value_range)
    cy, cx, ext, box, alpha = _ellipse_site(f, valid, rng, "local_blur", size)
    sigma = float(rng.uniform(1.0, 3.0))
    new_box = _filtered_box(
        f, cy, cx, ext, box, lambda r: ndimage.gaussian_filter(r, sigma, mode="reflect"), int(4 * sigma) + 1
    )
    return _finish(frame, f, box, alpha, new_box, value_range, "local_blur")


def local_sharpen(frame: np.ndarray, rng: np.random.Generator, *, value_range: tuple[float, float],
                  size: float | None = None) -> Manipulation:
    """Unsharp mask (sigma 1-3 px, amount 0.5-1.5) inside a feathered ellipse."""
    f = _check(frame, value_range)
    valid = _valid_sites(f, value_range)
    cy, cx, ext, box, alpha = _ellipse_site(f, valid, rng, "local_sharpen", size)
    sigma = float(rng.uniform(1.0, 3.0))
    amount = float(rng.uniform(0.5, 1.5))

    def unsharp(r: np.ndarray) -> np.ndarray:
        return r + amount * (r - ndimage.gaussian_filter(r, sigma, mode="reflect"))

    new_box = _filtered_box(f, cy, cx, ext, box, unsharp, int(4 * sigma) + 1)
    return _finish(frame, f, box, alpha, new_box, value_range, "local_sharpen")


def grow_structure(frame: np.ndarray, rng: np.random.Generator, *, value_range: tuple[float, float],
                   size: float | None = None) -> Manipulation:
    """Grow a structure locally: grey dilation (bright ones) or erosion (dark ones), 3-7 px,
    inside a feathered ellipse placed on an edge, so a vessel, nodule or bone edge gets bigger."""
    f = _check(frame, value_range)
    valid = _valid_sites(f, value_range)
    grad = ndimage.gaussian_gradient_magnitude(f, 1.5, mode="reflect")
    edges = valid & (grad >= np.percentile(grad[valid], 75.0)) if valid.any() else valid
    cy, cx, ext, box, alpha = _ellipse_site(f, edges if edges.any() else valid, rng, "grow_structure", size)
    size = int(rng.choice([3, 5, 7]))
    op = ndimage.grey_dilation if rng.random() < 0.5 else ndimage.grey_erosion
    new_box = _filtered_box(f, cy, cx, ext, box, lambda r: op(r, size=(size, size)), size)
    return _finish(frame, f, box, alpha, new_box, value_range, "grow_structure")


MANIPULATIONS: dict[str, Callable[..., Manipulation]] = {
    "inject_lesion": inject_lesion,
    "remove_lesion": remove_lesion,
    "copy_move": copy_move,
    "splice": splice,
    "local_contrast": local_contrast,
    "local_blur": local_blur,
    "local_sharpen": local_sharpen,
    "grow_structure": grow_structure,
}


def manipulate(
    frame: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    *,
    value_range: tuple[float, float],
    donor: np.ndarray | None = None,
    neighbour: np.ndarray | None = None,
    size: float | None = None,
) -> Manipulation:
    """Apply the manipulation named ``kind`` (a key of :data:`MANIPULATIONS`).

    ``donor`` is the other image ``splice`` takes from; ``neighbour`` the adjacent frame
    ``copy_move`` may take from (ignored by the other kinds); ``size`` the edit's side in pixels
    instead of the family's own draw (see the module docstring).
    """
    fn = MANIPULATIONS.get(kind)
    if fn is None:
        raise UsageError(f"unknown manipulation {kind!r}: expected one of {', '.join(MANIPULATIONS)}")
    sized = {} if size is None else {"size": size}
    if kind == "splice":
        return fn(frame, rng, value_range=value_range, donor=donor, **sized)
    if kind == "copy_move":
        return fn(frame, rng, value_range=value_range, neighbour=neighbour, **sized)
    return fn(frame, rng, value_range=value_range, **sized)

"""Metrics that score the moving objects of a game, with bootstrap confidence intervals.

Whole-frame PSNR on Atari is dominated by the static background (well over 99% of pixels):
a tokenizer that erases the ball still scores ~40 dB and a rollout that freezes the screen
beats one that moves. The functions here restrict the error to the *foreground*, the pixels
that differ from the game's static background (its per-pixel median over many frames), and
score the latent actions against the player's own movement.

Every function is pure: numpy arrays or torch tensors in, numpy arrays or plain Python
numbers out. Frames are uint8 [..., H, W, C] (channels last, as recorded and as ALE renders
them); labels are 1-D integer arrays [N]. Shape letters as in the package docstring, plus N
for the frames of a whole video or for items (clips, transitions). Bad input raises a one-line
`TinyWorldsError` naming the argument.

Aggregation: a per-item PSNR is +inf when prediction and truth agree, so PSNRs are never
averaged here. Items carry their summed squared error and the number of values counted, and
a set of items scores the PSNR of their pooled MSE (`pooled_psnr`). Confidence intervals are
percentile bootstraps over items, which should be clips (frames of one clip are correlated):
`summarize_foreground` pools the frames of each clip first. Transitions of a video, which
come one after another, are resampled in blocks (`bootstrap_block_ci`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from einops import rearrange

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.metrics import (
    normalized_mutual_information,  # the package's own label metrics
)

PEAK = 255.0  # PSNR peak of uint8 frames
UNKNOWN = -2  # displacement label of a transition whose movement is unknown
MAX_BACKGROUND_FRAMES = 2000  # frames the background median looks at, spread evenly

# ---------------------------------------------------------------------------------------------
# input checks (private)


def _array(value: Any, name: str, where: str) -> np.ndarray:
    """`value` (numpy array, torch tensor, or sequence) as a numpy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TinyWorldsError(f"{where}: {name} is not an array ({type(value).__name__}: {err})") from None


def _frames(value: Any, name: str, where: str, *, min_dims: int = 3) -> np.ndarray:
    """uint8 frames [..., H, W, C] with at least `min_dims` dims and no empty axis."""
    x = _array(value, name, where)
    if x.dtype != np.uint8:
        raise TinyWorldsError(f"{where}: {name} must be uint8 frames [..., H, W, C], got dtype {x.dtype}")
    if x.ndim < min_dims:
        raise TinyWorldsError(
            f"{where}: {name} must have at least {min_dims} dims [..., H, W, C], got shape {list(x.shape)}"
        )
    if x.size == 0:
        raise TinyWorldsError(f"{where}: {name} is empty (shape {list(x.shape)})")
    return x


def _labels(value: Any, name: str, where: str, *, min_value: int | None = 0) -> np.ndarray:
    """Non-empty 1-D integer labels [N] as int64, each >= `min_value` (None: any)."""
    x = _array(value, name, where)
    if x.ndim != 1:
        raise TinyWorldsError(f"{where}: {name} must be 1-D labels [N], got shape {list(x.shape)}")
    if x.size == 0:
        raise TinyWorldsError(f"{where}: {name} is empty")
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise TinyWorldsError(f"{where}: {name} must hold integer labels, got dtype {x.dtype}")
    x = x.astype(np.int64)
    if min_value is not None and int(x.min()) < min_value:
        raise TinyWorldsError(f"{where}: {name} holds {int(x.min())}; labels must be >= {min_value}")
    return x


def _numbers(value: Any, name: str, where: str) -> np.ndarray:
    """A non-empty real-valued array (any shape) as float64."""
    x = _array(value, name, where)
    if x.size == 0:
        raise TinyWorldsError(f"{where}: {name} is empty")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_):
        raise TinyWorldsError(f"{where}: {name} must hold real numbers, got dtype {x.dtype}")
    return x.astype(np.float64)


def _same_shape(a: np.ndarray, b: np.ndarray, names: str, where: str) -> None:
    if a.shape != b.shape:
        first, second = names.split(",")
        raise TinyWorldsError(
            f"{where}: {first} has shape {list(a.shape)} but {second} has {list(b.shape)}; they must match"
        )


def _threshold(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0 <= value < 255:
        raise TinyWorldsError(f"{where}: threshold must be a number in [0, 255), got {value!r}")
    return float(value)


def _bootstrap_settings(resamples: Any, level: Any, where: str) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise TinyWorldsError(f"{where}: resamples must be a whole number >= 1, got {resamples!r}")
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not 0 < level < 1:
        raise TinyWorldsError(f"{where}: level must be a number strictly between 0 and 1, got {level!r}")


# ---------------------------------------------------------------------------------------------
# background and foreground


def background_frame(frames: Any, *, max_frames: int = MAX_BACKGROUND_FRAMES) -> np.ndarray:
    """The game's static background: the per-pixel median of frames uint8 [N, H, W, C] -> [H, W, C].

    At most `max_frames` frames are used, every (N // max_frames)-th from the start, read
    before anything else (so a lazy store array is never read whole), which keeps the median
    cheap on long recordings. The median is the *lower* median (the ceil(k / 2)-th smallest
    value), so every output value occurs in the input and stays uint8 even when k is even. A
    pixel is recovered exactly wherever the objects cover it in fewer than half of the frames.
    """
    where = "background_frame"
    if isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or max_frames < 1:
        raise TinyWorldsError(f"{where}: max_frames must be a whole number >= 1, got {max_frames!r}")
    n = frames.shape[0] if hasattr(frames, "shape") and len(frames.shape) else len(frames)
    step = max(1, -(-n // int(max_frames)))  # ceil: at most max_frames frames
    x = _frames(frames[::step] if n else frames, "frames", where, min_dims=4)  # [k, H, W, C]
    if x.ndim != 4:
        raise TinyWorldsError(f"{where}: frames must be one video [N, H, W, C], got shape {list(x.shape)}")
    middle = (x.shape[0] - 1) // 2
    return np.partition(x, middle, axis=0)[middle]  # [H, W, C]


def foreground_mask(frames: Any, background: Any, threshold: float = 24) -> np.ndarray:
    """Where frames uint8 [..., H, W, C] show objects: bool [..., H, W].

    A pixel is foreground when any channel differs from `background` uint8 [H, W, C] (see
    `background_frame`) by more than `threshold` (out of 255), which ignores compression noise
    and slight flicker but catches Atari's saturated sprites.
    """
    where = "foreground_mask"
    x = _frames(frames, "frames", where)
    return _mask(x, _background(background, x, "frames", where), _threshold(threshold, where))


def _background(value: Any, frames: np.ndarray, frames_name: str, where: str) -> np.ndarray:
    """The background as uint8 [H, W, C] matching the last three dims of `frames`."""
    bg = _frames(value, "background", where)
    if bg.ndim != 3 or frames.shape[-3:] != bg.shape:
        raise TinyWorldsError(
            f"{where}: background must be one frame [H, W, C] = {list(frames.shape[-3:])} like {frames_name},"
            f" got {list(bg.shape)}"
        )
    return bg


def _mask(frames: np.ndarray, background: np.ndarray, threshold: float) -> np.ndarray:
    """Checked frames uint8 [..., H, W, C] against background [H, W, C] (or any reference that
    broadcasts to the frames, such as the frames before) -> bool [..., H, W]."""
    difference = np.abs(frames.astype(np.int16) - background.astype(np.int16))  # [..., H, W, C]
    return difference.max(axis=-1) > threshold  # [..., H, W]


def clips_with_cuts(clips: Any, threshold: float = 24, fraction: float = 0.5) -> np.ndarray:
    """Clips uint8 [B, T, H, W, C] -> bool [B]: whether any step t -> t+1 of the clip changes
    more than `fraction` of its pixels (by more than `threshold` in some channel).

    Such a step is a cut (a game resetting, a flash, a scene change in a user's video), not
    play: a sprite changes a few pixels a step. The whole frame is then foreground, so one cut
    frame can outweigh every sprite of a game in a pooled foreground error.
    """
    where = "clips_with_cuts"
    x = _frames(clips, "clips", where, min_dims=5)
    t = _threshold(threshold, where)
    if not 0.0 <= float(fraction) <= 1.0:
        raise TinyWorldsError(f"{where}: fraction must be in [0, 1], got {fraction}")
    changed = _mask(x[:, 1:], x[:, :-1], t).mean(axis=(-2, -1))  # [B, T-1]: share of pixels each step changes
    return (changed > fraction).any(axis=1)  # [B]


def foreground_scores(prediction: Any, truth: Any, background: Any, threshold: float = 24) -> dict[str, np.ndarray]:
    """Error on the objects only: prediction, truth uint8 [..., H, W, C] -> per-item arrays [...].

    The scored region of an item is the union of the foreground of the truth and of the
    prediction (`foreground_mask`), so a sprite the prediction misses and a ghost sprite it
    invents both count. Returned, each float64 [...] over the leading dims:

    - `fg_psnr`: PSNR in dB (peak 255) over the union's pixels and all channels; +inf when
      prediction and truth agree there, NaN when the union is empty (neither frame shows any
      object: nothing to score). Aggregate with `pooled_psnr`, never by averaging.
    - `fg_sq_error_sum`: summed squared error over the union (all channels), and
      `fg_count`: the number of values summed (union pixels * C); MSE = sum / count.
    - `fg_recall`: share of the truth's foreground pixels that are foreground in the
      prediction (NaN where the truth has none); `fg_precision`: share of the prediction's
      foreground pixels that are foreground in the truth (NaN where the prediction has none).
      Both compare masks only: a sprite drawn in the wrong colour still counts as present.
    - `fg_overlap_pixels`, `fg_truth_pixels`, `fg_prediction_pixels`: the pixel counts behind
      recall (overlap / truth) and precision (overlap / prediction), for pooling.
    """
    where = "foreground_scores"
    p = _frames(prediction, "prediction", where)
    y = _frames(truth, "truth", where)
    _same_shape(p, y, "prediction,truth", where)
    bg = _background(background, y, "truth", where)
    t = _threshold(threshold, where)
    p_fg, y_fg = _mask(p, bg, t), _mask(y, bg, t)  # [..., H, W] each
    union = p_fg | y_fg
    channels = p.shape[-1]
    error = ((p.astype(np.int32) - y.astype(np.int32)) ** 2).sum(axis=-1, dtype=np.int64)  # [..., H, W]
    sq_error_sum = np.where(union, error, 0).sum(axis=(-2, -1)).astype(np.float64)  # [...]
    count = union.sum(axis=(-2, -1)).astype(np.float64) * channels
    overlap = (p_fg & y_fg).sum(axis=(-2, -1)).astype(np.float64)
    truth_pixels = y_fg.sum(axis=(-2, -1)).astype(np.float64)
    prediction_pixels = p_fg.sum(axis=(-2, -1)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        fg_psnr = np.where(count > 0, 10 * np.log10(PEAK**2 * count / sq_error_sum), np.nan)
        recall = np.where(truth_pixels > 0, overlap / truth_pixels, np.nan)
        precision = np.where(prediction_pixels > 0, overlap / prediction_pixels, np.nan)
    return {
        "fg_psnr": fg_psnr,
        "fg_sq_error_sum": sq_error_sum,
        "fg_count": count,
        "fg_recall": recall,
        "fg_precision": precision,
        "fg_overlap_pixels": overlap,
        "fg_truth_pixels": truth_pixels,
        "fg_prediction_pixels": prediction_pixels,
    }


# ---------------------------------------------------------------------------------------------
# pooling and bootstrap


def _psnr_of_mse(mse: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10 * np.log10(PEAK**2 / mse)


def pooled_psnr(sq_error_sums: Any, counts: Any) -> float:
    """PSNR in dB of the pooled MSE: sum(sq_error_sums) / sum(counts), over items of any shape [...].

    Unlike a mean of per-item PSNRs, one perfectly predicted item (+inf dB) cannot swamp the
    rest and a large error weighs by its size. Items with count 0 (an empty foreground)
    contribute nothing; +inf when the pooled error is 0, NaN when no item counted anything.
    """
    where = "pooled_psnr"
    sq = _numbers(sq_error_sums, "sq_error_sums", where)
    n = _numbers(counts, "counts", where)
    _same_shape(sq, n, "sq_error_sums,counts", where)
    if (n < 0).any() or (sq < 0).any() or not np.isfinite(sq).all() or not np.isfinite(n).all():
        raise TinyWorldsError(f"{where}: sq_error_sums and counts must be finite and >= 0")
    total = float(n.sum())
    if total == 0:
        return math.nan
    return float(_psnr_of_mse(np.float64(sq.sum() / total)))


def _interval(estimate: float, resampled: np.ndarray, level: float) -> tuple[float, float, float]:
    """(estimate, low, high): the percentile interval of the bootstrap values [R].

    Quantiles without interpolation (each bound is one of the resampled values), so +inf
    statistics (a resample with no error) do not turn into NaN.
    """
    tail = (1 - level) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail], method="inverted_cdf")
    return float(estimate), float(low), float(high)


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[R, n] item indices drawn with replacement; the same for a given (n, resamples, seed)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(
    per_item_values: Any,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap of `statistic` over items [N]: (estimate, low, high).

    NaNs (items with nothing to score) are dropped first; the estimate is `statistic` of the
    remaining values, the bounds the (1 - level) / 2 and (1 + level) / 2 quantiles of it over
    `resamples` resamples of the items with replacement, drawn from numpy's default_rng(seed),
    so the result is deterministic for a seed. Items should be independent units (clips, not
    frames of one clip). Returns three NaNs when every item is NaN. For PSNR use
    `bootstrap_pooled_psnr_ci`: a mean of per-item PSNRs is +inf as soon as one item is exact.
    """
    where = "bootstrap_ci"
    values = _numbers(per_item_values, "per_item_values", where)
    if values.ndim != 1:
        raise TinyWorldsError(f"{where}: per_item_values must be 1-D [N], got shape {list(values.shape)}")
    if not callable(statistic):
        raise TinyWorldsError(f"{where}: statistic must be callable, got {type(statistic).__name__}")
    _bootstrap_settings(resamples, level, where)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan, math.nan
    indices = _resample_indices(values.size, int(resamples), seed)  # [R, N]
    resampled = np.array([float(statistic(values[row])) for row in indices])  # [R]
    return _interval(float(statistic(values)), resampled, level)


def bootstrap_block_ci(
    num_items: int,
    statistic: Callable[[np.ndarray], float],
    *,
    block: int,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Block bootstrap (fixed, non-overlapping blocks) of a statistic of N items in time order:
    (estimate, low, high).

    For items that are not independent, such as consecutive transitions of one video (an
    action is held for several of them): the items are cut into ceil(N / block) consecutive
    blocks of about `block` items, the blocks are resampled with replacement, and
    `statistic(indices)` gets the item indices [n] of each resample, so any statistic of
    several aligned arrays works (NMI of ids against labels, say). The estimate is
    `statistic(arange(N))`; the bounds are percentiles as in `bootstrap_ci`, deterministic
    for a seed, over the resamples where the statistic is not NaN. Three NaNs for no items.
    """
    where = "bootstrap_block_ci"
    if isinstance(num_items, bool) or not isinstance(num_items, (int, np.integer)) or num_items < 0:
        raise TinyWorldsError(f"{where}: num_items must be a whole number >= 0, got {num_items!r}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise TinyWorldsError(f"{where}: block must be a whole number >= 1, got {block!r}")
    if not callable(statistic):
        raise TinyWorldsError(f"{where}: statistic must be callable, got {type(statistic).__name__}")
    _bootstrap_settings(resamples, level, where)
    if num_items == 0:
        return math.nan, math.nan, math.nan
    blocks = np.array_split(np.arange(num_items), -(-num_items // block))  # consecutive, in order
    chosen = _resample_indices(len(blocks), int(resamples), seed)  # [R, blocks]
    resampled = np.array([float(statistic(np.concatenate([blocks[b] for b in row]))) for row in chosen])  # [R]
    resampled = resampled[~np.isnan(resampled)]
    estimate = float(statistic(np.arange(num_items)))
    return _interval(estimate, resampled, level) if resampled.size else (estimate, math.nan, math.nan)


def _pieces(sq_error_sums: Any, counts: Any, where: str, prefix: str = "", *,
            columns: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Validated pooled pieces: two float64 arrays, [N] per item or, with `columns`, [N, K]."""
    sq = _numbers(sq_error_sums, f"{prefix}sq_error_sums", where)
    n = _numbers(counts, f"{prefix}counts", where)
    _same_shape(sq, n, f"{prefix}sq_error_sums,{prefix}counts", where)
    if sq.ndim != (2 if columns else 1):
        shape = "2-D [N items, K columns]" if columns else "1-D over items [N]"
        raise TinyWorldsError(f"{where}: {prefix}sq_error_sums must be {shape}, got shape {list(sq.shape)}")
    if (n < 0).any() or (sq < 0).any() or not np.isfinite(sq).all() or not np.isfinite(n).all():
        raise TinyWorldsError(f"{where}: {prefix}sq_error_sums and {prefix}counts must be finite and >= 0")
    return sq, n


def _pooled_over_resamples(sq: np.ndarray, n: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Pooled PSNR [R] of each resample of items (rows of indices [R, N])."""
    return _psnr_of_mse(sq[indices].sum(axis=1) / n[indices].sum(axis=1))


def bootstrap_pooled_psnr_ci(
    sq_error_sums: Any, counts: Any, *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Pooled PSNR of items [N] with a percentile bootstrap interval: (estimate, low, high).

    Items (clips) are resampled with replacement and `pooled_psnr` is recomputed on each
    resample. Items with count 0 (nothing in the foreground) are dropped first, as NaNs are in
    `bootstrap_ci`; three NaNs when no item counts anything. Deterministic for a seed, and a
    seed draws the same item indices as `bootstrap_ci` for the same number of items.
    """
    where = "bootstrap_pooled_psnr_ci"
    sq, n = _pieces(sq_error_sums, counts, where)
    _bootstrap_settings(resamples, level, where)
    keep = n > 0
    sq, n = sq[keep], n[keep]
    if n.size == 0:
        return math.nan, math.nan, math.nan
    indices = _resample_indices(n.size, int(resamples), seed)
    return _interval(pooled_psnr(sq, n), _pooled_over_resamples(sq, n, indices), level)


def _bootstrap_ratio_ci(
    numerators: np.ndarray, denominators: np.ndarray, *, resamples: int, level: float, seed: int
) -> tuple[float, float, float]:
    """sum(numerators) / sum(denominators) over items [N], bootstrapped like the pooled PSNR."""
    keep = denominators > 0
    num, den = numerators[keep], denominators[keep]
    if den.size == 0:
        return math.nan, math.nan, math.nan
    indices = _resample_indices(den.size, resamples, seed)
    resampled = num[indices].sum(axis=1) / den[indices].sum(axis=1)
    return _interval(float(num.sum() / den.sum()), resampled, level)


def summarize_foreground(
    scores: dict[str, Any], *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, float | int]:
    """Aggregate `foreground_scores` output [B, ...] over clips, with bootstrap intervals.

    The first axis is the bootstrap unit (clips, B); any further axes (time T, ...) are pooled
    within each clip. Returns `fg_psnr` (pooled PSNR), `fg_recall` and `fg_precision` (pooled
    pixel ratios: overlap / truth pixels, overlap / prediction pixels, so large sprites weigh
    more than small ones), each with `_low` and `_high` bounds, plus `clips_counted`, the
    clips whose scored foreground is non-empty (the rest are skipped, like NaN items), and
    `clips_total`.
    """
    where = "summarize_foreground"
    needed = ("fg_sq_error_sum", "fg_count", "fg_overlap_pixels", "fg_truth_pixels", "fg_prediction_pixels")
    if not isinstance(scores, dict) or any(key not in scores for key in needed):
        raise TinyWorldsError(f"{where}: scores must be the dict foreground_scores returns (keys {', '.join(needed)})")
    _bootstrap_settings(resamples, level, where)
    per_clip = {}
    for key in needed:
        values = _numbers(scores[key], f"scores[{key!r}]", where)
        if values.ndim < 1:
            raise TinyWorldsError(f"{where}: scores[{key!r}] must have a clip axis [B, ...], got a scalar")
        per_clip[key] = rearrange(values, "b ... -> b (...)").sum(axis=1)  # [B]
    shapes = {per_clip[key].shape for key in needed}
    if len(shapes) != 1:
        raise TinyWorldsError(f"{where}: scores arrays differ in their number of clips ({sorted(shapes)})")
    sq, count = per_clip["fg_sq_error_sum"], per_clip["fg_count"]
    options = {"resamples": int(resamples), "level": level, "seed": seed}
    psnr = bootstrap_pooled_psnr_ci(sq, count, **options)
    recall = _bootstrap_ratio_ci(per_clip["fg_overlap_pixels"], per_clip["fg_truth_pixels"], **options)
    precision = _bootstrap_ratio_ci(per_clip["fg_overlap_pixels"], per_clip["fg_prediction_pixels"], **options)
    out: dict[str, float | int] = {}
    for name, (estimate, low, high) in (("fg_psnr", psnr), ("fg_recall", recall), ("fg_precision", precision)):
        out[name], out[f"{name}_low"], out[f"{name}_high"] = estimate, low, high
    out["clips_counted"] = int((count > 0).sum())
    out["clips_total"] = int(count.size)
    return out


# ---------------------------------------------------------------------------------------------
# controllability


def delta_psnr(psnr_with_inferred: Any, psnr_with_random: Any) -> np.ndarray:
    """Per-item controllability (Genie's ΔtPSNR): PSNR with inferred actions minus with random ones.

    Both [...] of one shape -> float64 [...]. Positive: the model's predictions follow the
    actions. An item that is +inf in both conditions gives NaN; pool with
    `bootstrap_delta_psnr_ci` for a summary figure.
    """
    where = "delta_psnr"
    inferred = _numbers(psnr_with_inferred, "psnr_with_inferred", where)
    random = _numbers(psnr_with_random, "psnr_with_random", where)
    _same_shape(inferred, random, "psnr_with_inferred,psnr_with_random", where)
    with np.errstate(invalid="ignore"):
        return inferred - random


def bootstrap_delta_psnr_ci(
    inferred_sq_error_sums: Any,
    inferred_counts: Any,
    random_sq_error_sums: Any,
    random_counts: Any,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """ΔtPSNR on the foreground: pooled PSNR with inferred actions minus with random actions.

    Takes each condition's per-clip pooled pieces [N] (`fg_sq_error_sum` and `fg_count`
    summed over each clip's frames), clip i being the same clip in both. Returns
    (estimate, low, high) from a paired percentile bootstrap: each resample draws one set of
    clip indices and uses it in both conditions, so differences in difficulty between clips
    cancel instead of widening the interval. Clips with an empty foreground in either
    condition are dropped from both; three NaNs when none is left.
    """
    where = "bootstrap_delta_psnr_ci"
    sq_a, n_a = _pieces(inferred_sq_error_sums, inferred_counts, where, "inferred_")
    sq_b, n_b = _pieces(random_sq_error_sums, random_counts, where, "random_")
    _same_shape(sq_a, sq_b, "inferred_sq_error_sums,random_sq_error_sums", where)
    _bootstrap_settings(resamples, level, where)
    keep = (n_a > 0) & (n_b > 0)
    sq_a, n_a, sq_b, n_b = sq_a[keep], n_a[keep], sq_b[keep], n_b[keep]
    if keep.sum() == 0:
        return math.nan, math.nan, math.nan
    indices = _resample_indices(int(keep.sum()), int(resamples), seed)  # [R, N], shared by both
    with np.errstate(invalid="ignore"):
        resampled = _pooled_over_resamples(sq_a, n_a, indices) - _pooled_over_resamples(sq_b, n_b, indices)
    return _interval(pooled_psnr(sq_a, n_a) - pooled_psnr(sq_b, n_b), resampled, level)


class Margins(NamedTuple):
    """`bootstrap_psnr_margins_ci`: per column (horizon) [K] and the smallest over them."""

    margin: np.ndarray  # [K] pooled PSNR of A minus that of B
    low: np.ndarray  # [K]
    high: np.ndarray  # [K]
    worst: tuple[float, float, float]  # (estimate, low, high) of min over the K margins


def _pooled_columns(sq: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Pooled PSNR per column over the items axis (-2): [..., N, K] -> [..., K]; NaN where a
    column counts nothing."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _psnr_of_mse(sq.sum(axis=-2) / n.sum(axis=-2))


def bootstrap_psnr_margins_ci(
    a_sq_error_sums: Any,
    a_counts: Any,
    b_sq_error_sums: Any,
    b_counts: Any,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    cap: float | None = None,
) -> Margins:
    """How far condition A is above condition B in pooled PSNR, per column, and at worst.

    Takes each condition's pooled pieces [N items, K columns] (`fg_sq_error_sum` and
    `fg_count` of each clip at each horizon, say), item i being the same clip in both. The
    estimate of column k is pooled PSNR of A minus that of B over every item, as the per-column
    pooled PSNRs give it; `worst` is the smallest of the K. A paired percentile bootstrap draws
    one set of item indices per resample and uses it in both conditions and every column, so
    the interval of the worst margin is that of the minimum itself, not of one column chosen
    after looking. Resamples where a margin is undefined (a column counting nothing, or no
    error in both conditions) are left out of that margin's interval, and NaN bounds mean none
    was defined. With `cap`, a pooled PSNR above it (+inf where a condition has no error)
    counts as `cap`, as in scores reported with a cap. Deterministic for a seed.
    """
    where = "bootstrap_psnr_margins_ci"
    sq_a, n_a = _pieces(a_sq_error_sums, a_counts, where, "a_", columns=True)
    sq_b, n_b = _pieces(b_sq_error_sums, b_counts, where, "b_", columns=True)
    _same_shape(sq_a, sq_b, "a_sq_error_sums,b_sq_error_sums", where)
    _bootstrap_settings(resamples, level, where)
    columns = sq_a.shape[1]

    def pooled(sq: np.ndarray, n: np.ndarray) -> np.ndarray:
        psnr = _pooled_columns(sq, n)
        return psnr if cap is None else np.minimum(psnr, cap)

    with np.errstate(invalid="ignore"):
        margin = pooled(sq_a, n_a) - pooled(sq_b, n_b)  # [K]
        indices = _resample_indices(sq_a.shape[0], int(resamples), seed)  # [R, N], shared by both and every column
        resampled = pooled(sq_a[indices], n_a[indices]) - pooled(sq_b[indices], n_b[indices])  # [R, K]
    low, high = np.full(columns, math.nan), np.full(columns, math.nan)
    for k in range(columns):
        defined = resampled[~np.isnan(resampled[:, k]), k]
        if defined.size:
            _, low[k], high[k] = _interval(0.0, defined, level)
    complete = resampled[~np.isnan(resampled).any(axis=1)]  # [R', K]
    worst_estimate = float(margin.min()) if not np.isnan(margin).any() else math.nan
    worst = _interval(worst_estimate, complete.min(axis=1), level) if complete.size else (worst_estimate, math.nan, math.nan)
    return Margins(margin, low, high, worst)


# ---------------------------------------------------------------------------------------------
# latent actions against the player's movement


def displacement_sign(positions: Any, dead_zone: float = 0.5) -> np.ndarray:
    """Direction of the player's movement: positions float [N] -> labels int64 [N - 1].

    `positions[t]` is the player's coordinate along its axis of control in frame t (NaN where
    unknown, e.g. the sprite is not found). Label t describes the transition t -> t + 1, as
    `move_sign` labels its step.
    """
    where = "displacement_sign"
    x = _numbers(positions, "positions", where)
    if x.ndim != 1 or x.size < 2:
        raise TinyWorldsError(f"{where}: positions must be 1-D [N] with N >= 2, got shape {list(x.shape)}")
    return move_sign(np.diff(x), dead_zone)  # steps [N - 1]


def move_sign(steps: Any, dead_zone: float = 0.5) -> np.ndarray:
    """Direction of each of the player's moves: steps float [n] (position after minus before) ->
    labels int64 [n]: +1 if the coordinate grew by more than `dead_zone`, -1 if it shrank by
    more than `dead_zone`, 0 otherwise, and `UNKNOWN` (-2) where the step is not finite."""
    where = "move_sign"
    step = _numbers(steps, "steps", where)
    number = isinstance(dead_zone, (int, float, np.integer, np.floating)) and not isinstance(dead_zone, bool)
    if not number or not dead_zone >= 0:
        raise TinyWorldsError(f"{where}: dead_zone must be a number >= 0, got {dead_zone!r}")
    with np.errstate(invalid="ignore"):
        labels = np.where(step > dead_zone, 1, np.where(step < -dead_zone, -1, 0))
    return np.where(np.isfinite(step), labels, UNKNOWN).astype(np.int64)


def _displacement_labels(value: Any, name: str, where: str) -> np.ndarray:
    labels = _labels(value, name, where, min_value=None)
    if not np.isin(labels, (UNKNOWN, -1, 0, 1)).all():
        raise TinyWorldsError(f"{where}: {name} must hold displacement_sign labels (-2, -1, 0, +1)")
    return labels


def perfect_detector_nmi(true_actions: Any, displacement_labels: Any) -> float:
    """The NMI a perfect detector of the movement direction reaches against the true actions.

    true_actions [N] are the action ids applied on each transition (ids >= 0; for a clip of
    T frames that is actions[:-1] against `displacement_sign` of its T positions), and
    displacement_labels [N] come from `displacement_sign`. Returns NMI(true action,
    displacement sign) over the transitions whose sign is known, with the definition of
    `metrics.normalized_mutual_information`: the ceiling for a latent action model that only
    sees the player move, since any labelling that is a function of the sign scores at most
    this. NaN when no transition has a known sign.
    """
    where = "perfect_detector_nmi"
    actions = _labels(true_actions, "true_actions", where)
    signs = _displacement_labels(displacement_labels, "displacement_labels", where)
    _same_shape(actions, signs, "true_actions,displacement_labels", where)
    known = signs != UNKNOWN
    if not known.any():
        return math.nan
    return normalized_mutual_information(torch.from_numpy(actions[known]), torch.from_numpy(signs[known] + 1))


def merge_equivalent_actions(actions: Any, meanings: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Merge ALE actions with the same movement: (ids [N], names [K]) -> (new ids [N], new names [K']).

    `meanings[i]` is the name of ALE action i (`env.unwrapped.get_action_meanings()`, e.g.
    Pong's NOOP FIRE RIGHT LEFT RIGHTFIRE LEFTFIRE). FIRE is removed from each name
    (RIGHTFIRE -> RIGHT, FIRE -> NOOP) and equal names share one new id, numbered in order of
    first appearance in `meanings` (NOOP stays 0): Pong becomes NOOP RIGHT LEFT.

    This treats FIRE as having no movement effect. That holds for paddle games once the ball
    is live (Pong, Breakout, where FIRE only serves), but not in games where firing changes
    what moves; it is a choice, and callers that want FIRE counted can skip this step.
    """
    where = "merge_equivalent_actions"
    ids = _labels(actions, "actions", where)
    if isinstance(meanings, str) or not isinstance(meanings, Sequence) or len(meanings) == 0:
        raise TinyWorldsError(f"{where}: meanings must be a non-empty list of action names")
    if not all(isinstance(name, str) and name for name in meanings):
        raise TinyWorldsError(f"{where}: meanings must hold non-empty strings, got {list(meanings)!r}")
    if int(ids.max()) >= len(meanings):
        raise TinyWorldsError(
            f"{where}: actions holds id {int(ids.max())} but meanings names only {len(meanings)} actions"
        )
    merged = [name.replace("FIRE", "") or "NOOP" for name in meanings]
    names = list(dict.fromkeys(merged))  # unique, in order of first appearance
    mapping = np.array([names.index(name) for name in merged], dtype=np.int64)  # [len(meanings)]
    return mapping[ids], names


class DirectionSeparation(NamedTuple):
    """Result of `opposite_directions_separated`."""

    separated: bool  # the two directions' most common latent ids differ
    latent_for_positive: int | None  # latent id most often seen with displacement +1 (None: no such transition)
    latent_for_negative: int | None  # latent id most often seen with displacement -1


def opposite_directions_separated(latent: Any, displacement: Any) -> DirectionSeparation:
    """Whether the latent actions tell the two directions of movement apart.

    latent [N] are the latent action ids of N transitions and displacement [N] their
    `displacement_sign` labels. Finds the latent id most often seen with +1 and the one most
    often seen with -1 (ties: the lower id) and reports `separated` = they differ, with both
    ids. A LAM that gives "up" and "down" the same code fails this however high its NMI. When
    either direction never occurs, its id is None and `separated` is False.
    """
    where = "opposite_directions_separated"
    z = _labels(latent, "latent", where)
    signs = _displacement_labels(displacement, "displacement", where)
    _same_shape(z, signs, "latent,displacement", where)

    def most_common(direction: int) -> int | None:
        chosen = z[signs == direction]
        return int(np.bincount(chosen).argmax()) if chosen.size else None

    up, down = most_common(1), most_common(-1)
    return DirectionSeparation(up is not None and down is not None and up != down, up, down)

"""Object-level metrics on tiny synthetic games: a 16x16 background with a 2x2 ball."""

import math

import numpy as np
import pytest
import torch

from tinyworlds import metrics as M
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.metrics import objects as O

BALL = np.array([90, 90, 90], dtype=np.uint8)  # 50 above the background in every channel


def background(h=16, w=16) -> np.ndarray:
    """A flat grey field with a static textured strip (which must not count as foreground)."""
    bg = np.full((h, w, 3), 40, dtype=np.uint8)
    bg[0] = np.random.default_rng(0).integers(0, 256, (w, 3), dtype=np.uint8)
    return bg


def with_ball(bg: np.ndarray, row: int, col: int, colour=BALL) -> np.ndarray:
    frame = bg.copy()
    frame[row : row + 2, col : col + 2] = colour
    return frame


def clip(bg: np.ndarray, cols) -> np.ndarray:
    """Frames [T, H, W, C] with the ball at row 8 and the given columns."""
    return np.stack([with_ball(bg, 8, c) for c in cols])


# -- background and foreground -----------------------------------------------------------------


def test_background_is_recovered_under_a_moving_ball_and_the_mask_finds_only_the_ball():
    bg = background()
    frames = clip(bg, range(1, 13))  # the ball covers each pixel in at most 2 of 12 frames
    assert np.array_equal(O.background_frame(frames), bg)
    assert np.array_equal(O.background_frame(torch.from_numpy(frames)), bg)  # torch in, numpy out
    mask = O.foreground_mask(frames, bg)
    assert mask.shape == (12, 16, 16) and mask.dtype == bool
    assert mask.sum(axis=(1, 2)).tolist() == [4] * 12
    assert mask[0, 8:10, 1:3].all()
    # A change within the threshold is not foreground; one above it is.
    faint = bg.copy()
    faint[5, 5] += 24
    faint[6, 6, 2] += 25
    assert np.argwhere(O.foreground_mask(faint, bg)).tolist() == [[6, 6]]


def test_background_subsamples_frames_evenly():
    frames = np.broadcast_to(np.arange(10, dtype=np.uint8)[:, None, None, None], (10, 2, 2, 1))
    # All frames: lower median of 0..9 is 4. At most three frames: every 4th, 0, 4, 8 -> 4;
    # at most two: every 5th, 0, 5 -> 0.
    assert O.background_frame(frames)[0, 0, 0] == 4
    assert O.background_frame(frames, max_frames=3)[0, 0, 0] == 4
    assert O.background_frame(frames, max_frames=2)[0, 0, 0] == 0


def test_background_reads_only_the_frames_it_uses():
    class Lazy:  # a store array: slicing reads, anything else would read the whole video
        shape = (1000, 2, 2, 1)

        def __getitem__(self, index):
            assert index == slice(None, None, 100), index
            return np.zeros((10, 2, 2, 1), np.uint8)

    assert O.background_frame(Lazy(), max_frames=10).shape == (2, 2, 1)


def test_erased_ball_scores_high_whole_frame_psnr_but_low_foreground_psnr_and_zero_recall():
    bg = background()
    truth = with_ball(bg, 8, 4)
    erased = bg.copy()
    whole = float(M.psnr(torch.from_numpy(erased), torch.from_numpy(truth)))
    scores = O.foreground_scores(erased, truth, bg)
    assert whole > 30  # 12 values off by 50 among 768: ~32 dB
    assert scores["fg_psnr"] < 15  # all 12 scored values off by 50: ~14 dB
    assert scores["fg_psnr"] == pytest.approx(10 * math.log10(255**2 / 50**2))
    assert scores["fg_recall"] == 0.0
    assert math.isnan(scores["fg_precision"])  # the prediction shows nothing to be precise about
    assert scores["fg_count"] == 12 and scores["fg_sq_error_sum"] == 12 * 2500


def test_ghost_sprite_lowers_precision_but_not_recall():
    bg = background()
    truth = with_ball(bg, 8, 4)
    ghost = with_ball(truth, 2, 10)  # the real ball plus an invented one
    scores = O.foreground_scores(ghost, truth, bg)
    assert scores["fg_recall"] == 1.0
    assert scores["fg_precision"] == 0.5
    assert scores["fg_count"] == 8 * 3  # the ghost's pixels are scored too
    assert np.isfinite(scores["fg_psnr"])


def test_scores_keep_leading_dims_and_mark_empty_items_nan():
    bg = background()
    truth = np.stack([clip(bg, [2, 3]), np.stack([bg, bg])])  # [B=2, T=2, H, W, C]; clip 1 is empty
    scores = O.foreground_scores(truth, truth, bg)
    assert scores["fg_psnr"].shape == (2, 2)
    assert np.isinf(scores["fg_psnr"][0]).all()  # identical frames
    assert np.isnan(scores["fg_psnr"][1]).all() and np.isnan(scores["fg_recall"][1]).all()
    summary = O.summarize_foreground(scores, resamples=50)
    assert summary["fg_psnr"] == math.inf  # pooled: no error anywhere, and no NaN
    assert (summary["clips_counted"], summary["clips_total"]) == (1, 2)
    assert summary["fg_recall"] == summary["fg_precision"] == 1.0


def test_a_reset_flash_is_a_cut_and_a_moving_ball_is_not():
    bg = background()
    play = clip(bg, range(1, 6))  # [5, H, W, C]: the ball moving one column a step
    flashed = play.copy()
    flashed[2] = np.full_like(bg, 200)  # a game reset: the whole screen changes for a frame
    clips = np.stack([play, flashed])  # [2, T, H, W, C]
    assert O.clips_with_cuts(clips).tolist() == [False, True]
    # The share of pixels that makes a cut is the caller's: at 0 every moving ball is one.
    assert O.clips_with_cuts(clips, fraction=0.0).tolist() == [True, True]
    assert O.clips_with_cuts(np.stack([play[:1], flashed[:1]])).tolist() == [False, False]  # no step


def test_summary_pools_frames_within_clips():
    bg = background()
    truth = np.stack([clip(bg, [2, 6]), clip(bg, [2, 6]), clip(bg, [2, 6])])  # [B=3, T=2, ...]
    prediction = truth.copy()
    prediction[:, 1] = bg  # the second frame of every clip loses its ball
    summary = O.summarize_foreground(O.foreground_scores(prediction, truth, bg), resamples=50)
    # Per clip: 12 exact values and 12 off by 50 -> MSE 1250; every clip alike, so a zero-width interval.
    expected = 10 * math.log10(255**2 / 1250)
    assert summary["fg_psnr"] == pytest.approx(expected)
    assert summary["fg_psnr_low"] == pytest.approx(expected) and summary["fg_psnr_high"] == pytest.approx(expected)
    assert summary["fg_recall"] == 0.5 and summary["fg_precision"] == 1.0
    assert summary["clips_counted"] == 3


# -- pooling and bootstrap ---------------------------------------------------------------------


def test_pooled_psnr_is_psnr_of_the_mean_mse_not_the_mean_psnr():
    sq, counts = np.array([12.0, 120000.0]), np.array([12.0, 12.0])  # MSEs 1 and 10000
    per_item = 10 * np.log10(255**2 * counts / sq)  # 48.1 and 8.1 dB: mean 28.1
    pooled = O.pooled_psnr(sq, counts)
    assert pooled == pytest.approx(10 * math.log10(255**2 / 5000.5))  # ~11.1 dB
    assert abs(pooled - per_item.mean()) > 10
    # A perfect item is +inf alone but only lowers the pooled MSE; empty items count nothing.
    assert O.pooled_psnr([0.0, 24.0, 0.0], [12.0, 12.0, 0.0]) == pytest.approx(10 * math.log10(255**2))
    assert O.pooled_psnr([0.0], [12.0]) == math.inf
    assert math.isnan(O.pooled_psnr([0.0], [0.0]))


def test_bootstrap_ci_contains_estimate_narrows_with_items_and_is_deterministic():
    values = np.random.default_rng(1).normal(5.0, 2.0, size=400)
    small = O.bootstrap_ci(values[:16], resamples=300)
    large = O.bootstrap_ci(values, resamples=300)
    for estimate, low, high in (small, large):
        assert low <= estimate <= high
    assert large[2] - large[1] < 0.5 * (small[2] - small[1])
    assert large[1] < 5.0 < large[2]
    assert O.bootstrap_ci(values[:16], resamples=300) == small
    assert O.bootstrap_ci(values[:16], resamples=300, seed=1) != small
    # NaNs are dropped; a custom statistic is used for the estimate and the resamples.
    with_nan = np.append(values[:16], np.nan)
    assert O.bootstrap_ci(with_nan, resamples=300) == small
    assert O.bootstrap_ci(values[:16], np.median, resamples=300)[0] == pytest.approx(np.median(values[:16]))
    assert all(math.isnan(v) for v in O.bootstrap_ci([np.nan, np.nan]))


def test_block_bootstrap_keeps_runs_together_so_correlated_items_get_wider_intervals():
    # 25 runs of 16 equal values: 25 independent values, not 400. Resampling single items
    # believes in 400 and gives too narrow an interval; blocks of 16 see the 25.
    values = np.repeat(np.random.default_rng(4).normal(0.0, 1.0, size=25), 16)  # [400]
    def mean(rows: np.ndarray) -> float:
        return float(values[rows].mean())
    items = O.bootstrap_block_ci(values.size, mean, block=1, resamples=400)
    blocks = O.bootstrap_block_ci(values.size, mean, block=16, resamples=400)
    assert items[0] == blocks[0] == pytest.approx(values.mean())
    assert blocks[1] <= blocks[0] <= blocks[2]
    assert blocks[2] - blocks[1] > 2.5 * (items[2] - items[1])
    assert O.bootstrap_block_ci(values.size, mean, block=16, resamples=400) == blocks
    assert O.bootstrap_block_ci(values.size, mean, block=16, resamples=400, seed=1) != blocks
    # A statistic of several aligned arrays: NMI of ids against labels, through the indices.
    ids = np.repeat(np.arange(40) % 3, 10)
    labels = ids.copy()
    labels[::7] = (labels[::7] + 1) % 3  # mostly the same, so 0 < NMI < 1
    def nmi(rows: np.ndarray) -> float:
        return M.normalized_mutual_information(torch.from_numpy(ids[rows]), torch.from_numpy(labels[rows]))
    estimate, low, high = O.bootstrap_block_ci(ids.size, nmi, block=10, resamples=200)
    assert estimate == pytest.approx(nmi(np.arange(ids.size))) and 0 < low <= estimate <= high < 1
    # Resamples whose statistic is NaN are left out; no items at all is three NaNs.
    def nan_on_first_block(rows: np.ndarray) -> float:
        return math.nan if 0 in rows else float(values[rows].mean())
    partly = O.bootstrap_block_ci(values.size, nan_on_first_block, block=16, resamples=400)
    assert math.isnan(partly[0]) and math.isfinite(partly[1]) and partly[1] <= partly[2]
    assert all(math.isnan(v) for v in O.bootstrap_block_ci(0, mean, block=4))
    with pytest.raises(TinyWorldsError, match="bootstrap_block_ci: block must be a whole number >= 1"):
        O.bootstrap_block_ci(10, mean, block=0)
    with pytest.raises(TinyWorldsError, match="bootstrap_block_ci: num_items"):
        O.bootstrap_block_ci(-1, mean, block=2)


def test_bootstrap_pooled_psnr_ci_brackets_the_estimate_and_drops_empty_items():
    rng = np.random.default_rng(2)
    counts = rng.integers(12, 48, size=30).astype(float)
    sq = counts * rng.uniform(100, 1000, size=30)
    estimate, low, high = O.bootstrap_pooled_psnr_ci(sq, counts, resamples=300)
    assert estimate == pytest.approx(O.pooled_psnr(sq, counts))
    assert low < estimate < high
    padded = O.bootstrap_pooled_psnr_ci(np.append(sq, 0.0), np.append(counts, 0.0), resamples=300)
    assert padded == (estimate, low, high)


def test_paired_delta_ci_excludes_zero_when_inferred_actions_are_consistently_better():
    rng = np.random.default_rng(3)
    counts = np.full(25, 48.0)
    difficulty = 10 ** rng.uniform(1, 3.5, size=25)  # clips vary far more than the conditions do
    random_sq = counts * difficulty
    inferred_sq = random_sq * rng.uniform(0.6, 0.9, size=25)
    estimate, low, high = O.bootstrap_delta_psnr_ci(inferred_sq, counts, random_sq, counts, resamples=400)
    assert 0 < low <= estimate <= high
    # Unpaired, the two conditions' intervals overlap: pairing is what makes the gap visible.
    _, inferred_low, _ = O.bootstrap_pooled_psnr_ci(inferred_sq, counts, resamples=400)
    _, _, random_high = O.bootstrap_pooled_psnr_ci(random_sq, counts, resamples=400)
    assert inferred_low < random_high
    # With no effect at all the interval straddles 0.
    first, second = (random_sq * rng.uniform(0.8, 1.25, size=25) for _ in range(2))
    _, low, high = O.bootstrap_delta_psnr_ci(first, counts, second, counts, resamples=400)
    assert low < 0 < high


def test_psnr_margins_per_column_and_at_worst_with_a_paired_bootstrap():
    rng = np.random.default_rng(4)
    clips, horizons = 30, 4
    counts = np.full((clips, horizons), 48.0)
    difficulty = 10 ** rng.uniform(1, 3.5, size=(clips, 1))  # a clip is hard at every horizon
    copy_sq = counts * difficulty * np.array([1.0, 2.0, 3.0, 4.0])  # copying gets worse with the horizon
    # A model that gains 1.3-1.8 dB at every horizon but the third, where it is ~0.9 dB worse.
    gain = np.array([0.7, 0.7, 1.25, 0.7]) * rng.uniform(0.95, 1.05, size=(clips, horizons))
    model_sq = copy_sq * gain
    margins = O.bootstrap_psnr_margins_ci(model_sq, counts, copy_sq, counts, resamples=400)
    expected = [O.pooled_psnr(model_sq[:, k], counts[:, k]) - O.pooled_psnr(copy_sq[:, k], counts[:, k])
                for k in range(horizons)]
    assert margins.margin == pytest.approx(expected)
    assert np.all(margins.low <= margins.margin) and np.all(margins.margin <= margins.high)
    assert margins.low[0] > 0 and margins.high[2] < 0  # paired, the clips' difficulty cancels
    worst, low, high = margins.worst
    assert worst == pytest.approx(expected[2]) and low <= worst <= high < 0
    # The interval of the minimum is that of the minimum over resamples, not of one column:
    # two columns that tie make the worst margin's interval lower than either column's.
    tied = O.bootstrap_psnr_margins_ci(model_sq[:, [0, 1]], counts[:, :2], copy_sq[:, [0, 1]], counts[:, :2],
                                       resamples=400)
    assert tied.worst[1] < min(tied.low) and tied.worst[0] == pytest.approx(min(tied.margin))
    again = O.bootstrap_psnr_margins_ci(model_sq, counts, copy_sq, counts, resamples=400)
    assert again.worst == margins.worst and np.array_equal(again.low, margins.low)  # deterministic for a seed
    # A horizon where neither condition shows any object has no margin, and so no worst one.
    blank = counts.copy()
    blank[:, 1] = 0
    holed = O.bootstrap_psnr_margins_ci(model_sq * (blank > 0), blank, copy_sq * (blank > 0), blank, resamples=50)
    assert math.isnan(holed.margin[1]) and math.isnan(holed.low[1]) and not math.isnan(holed.margin[0])
    assert math.isnan(holed.worst[0])
    # A condition without error is +inf dB; with a cap it counts as the cap, as reported scores do.
    exact = O.bootstrap_psnr_margins_ci(model_sq, counts, copy_sq * 0, counts, resamples=50, cap=100.0)
    model_psnr = np.array([O.pooled_psnr(model_sq[:, k], counts[:, k]) for k in range(horizons)])
    assert exact.margin == pytest.approx(model_psnr - 100.0)


def test_delta_psnr_is_the_per_item_difference():
    assert O.delta_psnr([20.0, 30.0], [18.0, 31.0]).tolist() == [2.0, -1.0]
    assert O.delta_psnr(torch.tensor([[25.0]]), np.array([[20.0]])).shape == (1, 1)


# -- latent actions against movement -----------------------------------------------------------


def test_displacement_sign_on_a_known_trajectory():
    positions = [10.0, 12.0, 12.3, 11.0, math.nan, 11.0, 14.0, 13.5, 14.0]
    labels = O.displacement_sign(positions)
    assert labels.tolist() == [1, 0, -1, -2, -2, 1, 0, 0]  # steps of exactly -0.5 and +0.5 are still
    assert O.displacement_sign(positions, dead_zone=0.1).tolist()[-2:] == [-1, 1]


def test_perfect_detector_nmi():
    actions = np.array([0, 1, 2, 0, 2, 1, 1, 0, 2, 0])
    signs = np.array([0, 1, -1, 0, -1, 1, 1, 0, -1, 0])  # NOOP still, RIGHT up, LEFT down
    assert O.perfect_detector_nmi(actions, signs) == pytest.approx(1.0)
    unknown = signs.copy()
    unknown[[1, 4]] = O.UNKNOWN  # dropped, not a fourth label
    assert O.perfect_detector_nmi(actions, unknown) == pytest.approx(1.0)
    # Four actions, NOOP and FIRE both still: the sign is a function of the action, so
    # NMI = H(sign) / ((H(action) + H(sign)) / 2).
    four = np.tile([0, 1, 2, 3], 5)
    moves = np.array([0, 0, 1, -1])[four]
    h_action, h_sign = math.log(4), -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert O.perfect_detector_nmi(four, moves) == pytest.approx(h_sign / ((h_action + h_sign) / 2))
    assert math.isnan(O.perfect_detector_nmi([0, 1], [O.UNKNOWN, O.UNKNOWN]))


def test_merge_equivalent_actions_for_pong_and_breakout():
    pong = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]
    ids, names = O.merge_equivalent_actions(np.arange(6), pong)
    assert names == ["NOOP", "RIGHT", "LEFT"]
    assert ids.tolist() == [0, 0, 1, 2, 1, 2]
    breakout = ["NOOP", "FIRE", "RIGHT", "LEFT"]
    ids, names = O.merge_equivalent_actions(torch.tensor([3, 1, 2, 0, 1]), breakout)
    assert names == ["NOOP", "RIGHT", "LEFT"]
    assert ids.tolist() == [2, 0, 1, 0, 0]
    # Merging makes the movement detector's ceiling reachable: FIRE no longer splits NOOP.
    actions = np.array([0, 1, 2, 3, 4, 5] * 3)
    signs = np.array([0, 0, 1, -1, 1, -1] * 3)
    assert O.perfect_detector_nmi(actions, signs) < 0.9
    assert O.perfect_detector_nmi(O.merge_equivalent_actions(actions, pong)[0], signs) == pytest.approx(1.0)


def test_opposite_directions_separated():
    signs = np.array([1, 1, 1, -1, -1, -1, 0, O.UNKNOWN])
    yes = O.opposite_directions_separated([3, 3, 1, 5, 5, 3, 0, 0], signs)
    assert yes == (True, 3, 5) and yes.latent_for_positive == 3
    no = O.opposite_directions_separated([2, 2, 1, 2, 2, 4, 0, 0], signs)
    assert no == (False, 2, 2)
    assert O.opposite_directions_separated([1, 2], [1, 0]) == (False, 1, None)


# -- errors ------------------------------------------------------------------------------------


BG = background()
FRAMES = clip(BG, [1, 2])


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: O.background_frame(FRAMES.astype(np.float32)), "frames"),
        (lambda: O.background_frame(FRAMES[:0]), "frames"),
        (lambda: O.background_frame(FRAMES[0]), "frames"),
        (lambda: O.foreground_mask(FRAMES, BG[:8]), "background"),
        (lambda: O.foreground_mask(FRAMES, BG, threshold=300), "threshold"),
        (lambda: O.foreground_scores(FRAMES, FRAMES[:1], BG), "truth"),
        (lambda: O.foreground_scores(FRAMES.astype(np.int64), FRAMES, BG), "prediction"),
        (lambda: O.pooled_psnr([1.0, 2.0], [3.0]), "counts"),
        (lambda: O.pooled_psnr([], []), "sq_error_sums"),
        (lambda: O.bootstrap_ci([], resamples=10), "per_item_values"),
        (lambda: O.bootstrap_ci([1.0, 2.0], level=95), "level"),
        (lambda: O.bootstrap_pooled_psnr_ci([1.0], [1.0], resamples=0), "resamples"),
        (lambda: O.bootstrap_delta_psnr_ci([1.0], [1.0], [1.0, 2.0], [1.0, 1.0]), "random_sq_error_sums"),
        (lambda: O.delta_psnr([1.0], [1.0, 2.0]), "psnr_with_random"),
        (lambda: O.bootstrap_psnr_margins_ci([1.0], [1.0], [1.0], [1.0]), "a_sq_error_sums"),
        (lambda: O.bootstrap_psnr_margins_ci(np.zeros((0, 2)), np.zeros((0, 2)), [[1.0]], [[1.0]]), "a_sq_error_sums"),
        (lambda: O.bootstrap_psnr_margins_ci([[1.0]], [[1.0]], [[1.0, 2.0]], [[1.0, 1.0]]), "b_sq_error_sums"),
        (lambda: O.bootstrap_psnr_margins_ci([[1.0]], [[-1.0]], [[1.0]], [[1.0]]), "a_counts"),
        (lambda: O.summarize_foreground({"fg_psnr": [1.0]}), "scores"),
        (lambda: O.displacement_sign([1.0]), "positions"),
        (lambda: O.displacement_sign([1.0, 2.0], dead_zone=-1), "dead_zone"),
        (lambda: O.perfect_detector_nmi([0, 1, 2], [0, 1]), "displacement_labels"),
        (lambda: O.perfect_detector_nmi([0.5, 1.0], [0, 1]), "true_actions"),
        (lambda: O.perfect_detector_nmi([0, 1], [0, 3]), "displacement_labels"),
        (lambda: O.merge_equivalent_actions([0, 6], ["NOOP", "FIRE"]), "meanings"),
        (lambda: O.merge_equivalent_actions([], ["NOOP"]), "actions"),
        (lambda: O.opposite_directions_separated([-1, 0], [1, -1]), "latent"),
        (lambda: O.clips_with_cuts(FRAMES), "clips"),
        (lambda: O.clips_with_cuts(FRAMES[None, None], fraction=2.0), "fraction"),
    ],
)
def test_bad_input_raises_a_one_line_error_naming_the_argument(call, argument):
    with pytest.raises(TinyWorldsError) as caught:
        call()
    message = str(caught.value)
    assert argument in message and "\n" not in message

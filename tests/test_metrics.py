"""Metric functions against values known in closed form or from their definitions."""

import math

import numpy as np
import pytest
import torch

from tinyworlds import metrics as M


def images(seed=0, shape=(2, 3, 24, 24)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# -- PSNR --------------------------------------------------------------------------------------


def test_psnr_of_identical_images_is_inf_and_finite_mean_caps_it():
    x = images()
    scores = M.psnr(x, x, dims=(1, 2, 3))
    assert torch.isinf(scores).all()
    assert M.finite_mean(torch.tensor([math.inf, 20.0])) == pytest.approx(60.0)


@pytest.mark.parametrize("k", [1, 4, 10])
def test_psnr_of_uniform_integer_noise_matches_theory(k):
    # Noise taking each value in -k..k equally often has MSE = k(k+1)/3 exactly.
    noise = torch.arange(-k, k + 1).repeat(30)  # [30 (2k+1)]
    target = torch.full_like(noise, 128)
    expected = 10 * math.log10(255**2 / (k * (k + 1) / 3))
    assert float(M.psnr(target + noise, target)) == pytest.approx(expected, abs=1e-4)


# -- SSIM --------------------------------------------------------------------------------------


def reference_ssim(x: np.ndarray, y: np.ndarray, size=11, sigma=1.5) -> float:
    """SSIM of one-channel float images straight from Wang et al.'s definition, window by window."""
    ax = np.arange(size) - (size - 1) / 2
    g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma**2))
    g /= g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            ma, mb = (g * a).sum(), (g * b).sum()
            va, vb = (g * (a - ma) ** 2).sum(), (g * (b - mb) ** 2).sum()
            cov = (g * (a - ma) * (b - mb)).sum()
            values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_of_identical_images_is_one():
    x = images()
    assert torch.allclose(M.ssim(x, x), torch.ones(2), atol=1e-6)


def test_ssim_of_flat_images_is_the_luminance_term():
    # No variance: the structure term is C2 / C2 = 1, leaving (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 100.0, 130.0, (0.01 * 255) ** 2
    x, y = torch.full((1, 16, 16), a), torch.full((1, 16, 16), b)
    assert float(M.ssim(x, y)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def test_ssim_matches_the_definition_window_by_window():
    x = images(1, (1, 1, 16, 16))
    noisy = (x.float() + torch.randn(x.shape, generator=torch.Generator().manual_seed(2)) * 30).clamp(0, 255)
    expected = reference_ssim(x[0, 0].double().numpy(), noisy[0, 0].double().numpy())
    assert float(M.ssim(noisy, x)) == pytest.approx(expected, abs=1e-4)


def test_ssim_is_symmetric_and_falls_with_noise():
    x = images(3, (1, 3, 32, 32)).float()
    smooth = torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # some structure to lose
    scores = []
    for sigma in (5, 20, 60):
        noisy = (smooth + torch.randn(smooth.shape, generator=torch.Generator().manual_seed(4)) * sigma).clamp(0, 255)
        assert float(M.ssim(noisy, smooth)) == pytest.approx(float(M.ssim(smooth, noisy)), abs=1e-6)
        scores.append(float(M.ssim(noisy, smooth)))
    assert 1 > scores[0] > scores[1] > scores[2]


def test_ssim_keeps_leading_dims_and_handles_small_and_gray_frames():
    x, y = images(5, (2, 4, 3, 8, 8)), images(6, (2, 4, 3, 8, 8))
    assert M.ssim(x, y).shape == (2, 4)  # an 8x8 frame uses a 7x7 window
    gray = images(7, (3, 1, 16, 16))
    assert torch.allclose(M.ssim(gray, gray.flip(-1)), M.ssim(gray.expand(-1, 3, -1, -1), gray.flip(-1).expand(-1, 3, -1, -1)))


# -- baselines ---------------------------------------------------------------------------------


def test_copy_last_frame_repeats_the_last_context_frame():
    clip = torch.arange(2 * 5 * 1 * 2 * 2, dtype=torch.uint8).reshape(2, 5, 1, 2, 2)  # [B, T, C, H, W]
    guess = M.copy_last_frame(clip[:, :3], horizon=2)
    assert guess.shape == (2, 2, 1, 2, 2)
    assert torch.equal(guess[:, 0], clip[:, 2]) and torch.equal(guess[:, 1], clip[:, 2])
    # Its PSNR at horizon h is that of frame 2 against frame 2 + h.
    scores = M.psnr(guess, clip[:, 3:], dims=(2, 3, 4))
    assert torch.allclose(scores[:, 1], M.psnr(clip[:, 2], clip[:, 4], dims=(1, 2, 3)))


# -- labels ------------------------------------------------------------------------------------


def test_still_token_changes_counts_token_changes_where_no_pixel_moves():
    frames = torch.zeros(1, 3, 3, 8, 8, dtype=torch.uint8)  # [B, T, C, H, W]: 4 patches of 4x4
    frames[0, 1:, :, :4, :4] = 200  # patch 0 changes at t = 1, then stays
    frames[0, 2, :, 4:, 4:] = M.STILL_TOLERANCE  # patch 3 moves by compression noise at t = 2
    tokens = torch.zeros(1, 3, 4, dtype=torch.long)  # [B, T, P]
    tokens[0, 1:, 0] = 5  # follows the real change
    assert M.still_token_changes(frames, tokens, patch_size=4) == 0.0
    tokens[0, 2, 1] = tokens[0, 2, 3] = 7  # flicker in patches 1 and 3 at t = 2
    # Still: patches 1-3 at t = 0 -> 1 and all four at t = 1 -> 2 (patch 3 within the tolerance).
    assert M.still_token_changes(frames, tokens, patch_size=4) == pytest.approx(2 / 7)
    assert M.still_token_changes(frames, tokens, patch_size=4, tolerance=M.STILL_TOLERANCE - 1) == pytest.approx(1 / 6)
    flashing = torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8)
    flashing[0, 1] = 255
    assert math.isnan(M.still_token_changes(flashing, tokens[:, :2], patch_size=4))


def test_change_agreement_scores_where_a_prediction_moves_against_the_truth():
    last = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)  # [B, C, H, W]: 4 patches of 4x4
    truth = torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8)  # [B, k, C, H, W]
    truth[0, :, :, :4, :4] = 200  # patch 0 lights up at h1 and stays
    truth[0, 1, :, :4, 4:] = 100  # patch 1 lights up at h2
    guess = torch.zeros_like(truth)
    guess[0, :, :, :4, :4] = 60  # patch 0 at h1, wrong colour: still a move in the right place
    guess[0, 1, :, 4:, :4] = 90  # patch 2 at h2, where nothing moves
    guess[0, 1, 0, 4, 4] = 24  # patch 3 at h2: one pixel within the tolerance
    true_moved = M.moved_patches(truth, M.frame_steps(truth, last), patch_size=4, tolerance=24)  # [B, k, P]
    moved = M.moved_patches(guess, M.frame_steps(guess, last), patch_size=4, tolerance=24)
    assert true_moved.tolist() == [[[True, False, False, False], [False, True, False, False]]]
    assert moved.tolist() == [[[True, False, False, False], [False, False, True, False]]]
    assert M.change_agreement(moved, true_moved) == {"change_precision": 0.5, "change_recall": 0.5}
    assert M.change_agreement(moved[:, :1], true_moved[:, :1]) == {"change_precision": 1.0, "change_recall": 1.0}
    frozen = M.change_agreement(torch.zeros_like(moved), true_moved)  # copying the last frame
    assert math.isnan(frozen["change_precision"]) and frozen["change_recall"] == 0.0
    assert math.isnan(M.change_agreement(moved, torch.zeros_like(true_moved))["change_recall"])


def test_entropy_and_label_fractions():
    fractions = M.label_fractions(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 6)
    assert fractions.tolist() == [0.25, 0.25, 0.25, 0.25, 0.0, 0.0]
    assert M.entropy(fractions) == pytest.approx(math.log(4))
    assert M.entropy(torch.tensor([1.0, 0.0])) == 0.0


def test_nmi_of_a_relabelling_is_one_and_of_independent_labels_zero():
    true = torch.randint(0, 5, (2000,), generator=torch.Generator().manual_seed(0))
    permuted = torch.tensor([3, 0, 4, 1, 2])[true]
    assert M.normalized_mutual_information(permuted, true) == pytest.approx(1.0)
    i = torch.arange(4 * 6 * 10)
    assert M.normalized_mutual_information(i % 4, (i // 4) % 6) == pytest.approx(0.0, abs=1e-12)
    assert M.normalized_mutual_information(torch.zeros(10), torch.zeros(10)) == 1.0
    assert M.normalized_mutual_information(torch.zeros(10), i[:10] % 2) == 0.0


def test_nmi_agrees_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 8, (500,), generator=g)
    b = (a // 2 + torch.randint(0, 2, (500,), generator=g)) % 5  # partly dependent
    assert M.normalized_mutual_information(a, b) == pytest.approx(metrics.normalized_mutual_info_score(b, a), abs=1e-9)


def test_best_mapping_accuracy_and_chance_level():
    # Latent 0 -> mostly action 2, latent 1 -> action 0, latent 2 splits 1/1 (tie: lower id), 3 unseen.
    latent = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    true = torch.tensor([2, 2, 1, 0, 0, 2, 1])
    mapping = M.majority_mapping(latent, true, num_latent=4)
    assert mapping.tolist() == [2, 0, 1, 2]  # the unseen id takes the most common action (2)
    assert M.mapping_accuracy(mapping, latent, true) == pytest.approx(5 / 7)
    # Scored on other pairs: latent 3 -> 2 is right, latent 0 -> 2 is wrong.
    assert M.mapping_accuracy(mapping, torch.tensor([3, 0]), torch.tensor([2, 1])) == 0.5
    assert M.chance_accuracy(true) == pytest.approx(3 / 7)
    # Latents that carry no information cannot beat chance on fresh data by more than noise.
    g = torch.Generator().manual_seed(0)
    actions = torch.randint(0, 3, (4000,), generator=g)
    noise = torch.randint(0, 8, (4000,), generator=g)
    fit = M.majority_mapping(noise[:2000], actions[:2000], 8)
    assert M.mapping_accuracy(fit, noise[2000:], actions[2000:]) < M.chance_accuracy(actions[2000:]) + 0.03

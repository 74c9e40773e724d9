import numpy as np
import pytest
import torch

from tests.conftest import fit
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.models import LatentActionConfig, LatentActionModel
from tinyworlds.models.lam import (
    NEGATIVE,
    POSITIVE,
    STILL,
    mean_abs_correlation,
    slowest_direction,
    slowness,
    slowness_along,
    standard_penalty,
    whiten_per_group,
)

TINY = dict(frame_size=16, patch_size=4, embed_dim=32, num_heads=2, encoder_blocks=1, decoder_blocks=1,
            levels=(2, 2), max_frames=4)
MOVES = torch.tensor([[0, 4], [0, -4], [4, 0], [-4, 0]])  # (dy, dx) per true action


def tiny_lam(**overrides) -> LatentActionModel:
    torch.manual_seed(0)
    return LatentActionModel(LatentActionConfig(**{**TINY, **overrides}))


def moving_squares(batch=8, frames=4, size=16, square=6, seed=0) -> torch.Tensor:
    """Clips [B, T, 3, size, size] in [-1, 1] of a coloured square that each step moves by
    one of four random moves (wrapping around)."""
    g = torch.Generator().manual_seed(seed)
    moves = MOVES[torch.randint(0, 4, (batch, frames - 1), generator=g)]  # [B, T-1, 2]
    start = torch.randint(0, size, (batch, 1, 2), generator=g)
    corner = torch.cat([start, start + moves.cumsum(1)], dim=1)  # [B, T, 2]
    pixels = torch.arange(size)
    rows = (pixels - corner[..., :1]) % size < square  # [B, T, H]
    cols = (pixels - corner[..., 1:]) % size < square  # [B, T, W]
    inside = rows[..., :, None] & cols[..., None, :]  # [B, T, H, W]
    color = torch.rand(batch, 1, 3, 1, 1, generator=g) * 2 - 1
    return torch.where(inside[:, :, None], color, torch.tensor(-1.0))  # [B, T, 3, H, W]


def test_infer_gives_one_action_per_transition():
    model = tiny_lam()
    assert model.num_actions == 4
    ids = model.infer(moving_squares())
    assert ids.shape == (8, 3) and ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < 4


ENCODERS = [{"pair_encoding": "stacked"}, {"pair_encoding": "sequence"}, {"antisymmetric": True}]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_is_causal_in_time(encoder):
    model = tiny_lam(**encoder)
    frames = moving_squares()
    changed = frames.clone()
    changed[:, 2] = torch.rand_like(changed[:, 2])
    z, z_changed = model.latents(frames), model.latents(changed)  # [B, T-1, L]; z[:, j] is j -> j+1
    assert torch.allclose(z[:, :1], z_changed[:, :1], atol=1e-6)
    assert not torch.allclose(z[:, 1], z_changed[:, 1], atol=1e-4)


def test_decoder_is_causal_and_reads_the_action():
    model = tiny_lam()
    frames = moving_squares()[:, :3]
    codes = torch.tensor([-1.0, 1.0]).expand(8, 3, 2)
    pred = model.predict(frames, codes)
    changed = frames.clone()
    changed[:, 2] = 1.0
    assert torch.allclose(pred[:, :2], model.predict(changed, codes)[:, :2], atol=1e-6)
    other_codes = codes.clone()
    other_codes[:, 1] = torch.tensor([1.0, -1.0])
    other = model.predict(frames, other_codes)
    assert torch.allclose(pred[:, 0], other[:, 0], atol=1e-6)
    assert not torch.allclose(pred[:, 1], other[:, 1], atol=1e-4)


def test_a_frame_context_decoder_predicts_each_transition_from_its_own_frame():
    model = tiny_lam(decoder_context="frame")
    frames = moving_squares()[:, :3]
    codes = model.fsq(model.latents(moving_squares()))  # [B, T-1, L]
    pred = model.predict_next(frames, codes)  # [B, 3, C, H, W]
    changed = frames.clone()
    changed[:, 0] = 1.0
    after = model.predict_next(changed, codes)
    # Frame 0 reaches only the prediction of frame 1; the causal clip decoder passes it on.
    assert torch.allclose(pred[:, 1:], after[:, 1:], atol=1e-6)
    assert not torch.allclose(pred[:, 0], after[:, 0], atol=1e-4)
    clip = tiny_lam(decoder_context="clip")
    assert not torch.allclose(clip.predict_next(frames, codes)[:, 1:], clip.predict_next(changed, codes)[:, 1:], atol=1e-4)
    # One transition alone is the same prediction as inside the clip.
    assert torch.allclose(model.predict_next(frames[:, 1:2], codes[:, 1:2]), pred[:, 1:2], atol=1e-5)


def test_slowness_is_zero_for_a_held_latent_and_one_for_a_forgetful_one():
    g = torch.Generator().manual_seed(0)
    held = torch.randn(512, 1, 2, generator=g).expand(512, 5, 2)  # [B, N, L]: the same in every transition
    forgetful = torch.randn(512, 5, 2, generator=g)  # independent from one transition to the next
    assert slowness(held).item() == pytest.approx(0.0, abs=1e-6)
    assert slowness(forgetful).item() == pytest.approx(1.0, abs=0.05)
    assert slowness(forgetful * 1e-4).item() == pytest.approx(slowness(forgetful).item(), rel=0.05)  # no escape by shrinking


def test_persistence_weight_adds_the_latent_slowness_to_the_loss():
    frames = moving_squares(frames=4)
    videos = torch.arange(8) % 2
    losses = {}
    for weight in (0.0, 2.0):
        model = tiny_lam(decoder_context="frame", persistence_weight=weight)
        losses[weight], metrics = model.loss(frames, videos)
    assert metrics["latent_slowness"] > 0
    assert (losses[2.0] - losses[0.0]).item() == pytest.approx(2.0 * metrics["latent_slowness"].item(), rel=1e-4)
    losses[2.0].backward()
    assert model.to_latent.weight.grad.abs().sum() > 0


def test_a_diverged_latent_has_a_non_finite_slowness_not_an_exception():
    latents = held_and_placed_latents(300).float()
    three = torch.cat([latents, latents[:, :1] * 0.5], dim=1)  # [N, 3]
    three[5, 0] = float("inf")  # one transition of a diverging run
    values, _ = slowness_along(three[:-1], three[1:])
    assert values.shape == (3,) and not torch.isfinite(values).any()
    values, directions = slowness_along(three[:-1], three[1:], directions=True)
    assert not torch.isfinite(values).any() and directions.shape == (3, 3)


def test_slowest_persistence_holds_one_direction_and_leaves_the_others_free():
    from einops import rearrange

    latents = held_and_placed_latents(600)  # [600, 2]: a held direction and a place, mixed
    clips = rearrange(latents, "(b n) l -> b n l", n=3)  # [200, 3, 2]
    before, after = rearrange(clips[:, :-1], "b n l -> (b n) l"), rearrange(clips[:, 1:], "b n l -> (b n) l")
    values, _ = slowness_along(before, after)
    assert values[0] < 0.25 and values[1] > 0.8  # the held direction, then the place
    assert slowness(clips) == pytest.approx(values.mean().item(), abs=0.1)  # "each": both, as if one
    frames = moving_squares(batch=4)
    each, each_metrics = tiny_lam(persistence_weight=1.0).loss(frames)
    slowest, slowest_metrics = tiny_lam(persistence_weight=1.0, persistence="slowest").loss(frames)
    # Same weights (same seed): the losses differ by the persistence terms alone.
    assert (slowest - each).item() == pytest.approx((slowest_metrics["latent_slowness"] - each_metrics["latent_slowness"]).item(), abs=1e-5)
    assert slowest_metrics["latent_slowness"] <= each_metrics["latent_slowness"] + 1e-6  # the least, not the mean
    slowest.backward()


def test_masking_spares_the_anchor_frame():
    model = tiny_lam(mask_ratio=0.5)
    frames = moving_squares()[:, :3]
    codes = torch.ones(8, 3, 2)
    torch.manual_seed(1)
    masked = model.predict(frames, codes, mask_ratio=0.9)
    plain = model.predict(frames, codes)
    # position 0 sees only frame 0 (causal), which is never masked
    assert torch.allclose(masked[:, 0], plain[:, 0], atol=1e-6)
    assert not torch.allclose(masked[:, 1:], plain[:, 1:], atol=1e-3)


def test_every_parameter_learns_so_distributed_training_can_reduce_them():
    for mask_ratio in (0.0, 0.5):
        model = tiny_lam(mask_ratio=mask_ratio)
        loss, _ = model.loss(moving_squares(), torch.arange(8) % 2)
        loss.backward()
        idle = [name for name, param in model.named_parameters() if param.grad is None]
        assert idle == [], (mask_ratio, idle)
    with pytest.raises(TinyWorldsError, match="mask_ratio > 0 needs a model built with"):
        tiny_lam().predict(moving_squares()[:, :3], torch.ones(8, 3, 2), mask_ratio=0.5)


def test_loss_falls_and_reports_action_usage():
    model = tiny_lam()
    frames = moving_squares()
    torch.manual_seed(0)
    first, metrics = model.loss(frames)
    assert metrics["action_usage"].shape == (4,)
    assert metrics["action_usage"].sum().item() == pytest.approx(1.0)
    loss, metrics = fit(model, lambda: model.loss(frames), steps=60)
    assert loss.item() < first.item() / 4
    assert metrics["recon_mse"] < 0.25
    assert 1.0 <= metrics["action_perplexity"] <= 4.0


def test_whiten_per_group_known_values():
    z = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, -2.0], [5.0, 2.0], [7.0, 7.0]])
    groups = torch.tensor([4, 4, 9, 9, 2])  # ids need not be 0..G-1; the last is a group of one
    white, mean, cov, _ = whiten_per_group(z, groups)
    assert torch.allclose(mean, torch.tensor([[7.0, 7.0], [2.0, 10.0], [5.0, 0.0]]))  # groups 2, 4, 9
    assert torch.allclose(cov, torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 4.0]]]))
    expected = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0], [0.0, 0.0]])
    assert torch.allclose(white, expected, atol=1e-4)


def test_whitened_dimensions_cannot_copy_one_feature():
    feature = torch.randn(400, 1, dtype=torch.float64)
    z = torch.cat([feature, -feature + 0.1 * torch.randn(400, 1, dtype=torch.float64),
                   3 * feature + 1 + 0.1 * torch.randn(400, 1, dtype=torch.float64)], dim=1)  # [n, 3]
    groups = torch.zeros(400, dtype=torch.long)
    white, mean, cov, factor = whiten_per_group(z, groups)
    assert mean_abs_correlation(cov) > 0.9  # raw: three copies of one feature
    white_cov = whiten_per_group(white, groups)[2][0]
    assert torch.allclose(white_cov, torch.eye(3, dtype=torch.float64), atol=0.02)  # whitened: independent
    assert standard_penalty(mean, factor) > 1.0
    standard = torch.randn(4000, 3, dtype=torch.float64)
    _, mean, cov, factor = whiten_per_group(standard, torch.zeros(4000, dtype=torch.long))
    assert standard_penalty(mean, factor) < 0.01 and mean_abs_correlation(cov) < 0.05


def test_whitening_backward_is_finite_at_identity_covariance():
    z = torch.linalg.qr(torch.randn(64, 3, dtype=torch.float64))[0] * 8  # [64, 3], covariance exactly I (eigenvalues tie)
    z = (z - z.mean(0)).requires_grad_()
    white, mean, _, factor = whiten_per_group(z, torch.zeros(64, dtype=torch.long))
    (white.square().sum() + standard_penalty(mean, factor)).backward()
    assert torch.isfinite(z.grad).all()


def test_codes_split_every_video_even_when_the_encoder_is_nearly_constant():
    model = tiny_lam()
    with torch.no_grad():
        model.to_latent.weight.mul_(1e-3)  # a fresh encoder, squeezed to a near-constant latent
        model.to_latent.bias.fill_(3.0)  # far on one side of FSQ's split for every transition
    frames = moving_squares(batch=16)
    videos = torch.arange(16) % 2
    assert model.infer(frames).unique().numel() == 1  # raw, every transition gets the same id
    _, metrics = model.loss(frames, videos)
    assert metrics["action_perplexity"] > 1.5  # whitened per video, the codes split
    assert metrics["standardize_penalty"] > 1.0  # and the raw latent is far from standard


def test_standardize_penalty_makes_the_raw_latent_standard():
    model = tiny_lam(standardize_weight=10.0)
    frames, videos = moving_squares(batch=16), torch.arange(16) % 2
    _, before = model.loss(frames, videos)
    _, metrics = fit(model, lambda: model.loss(frames, videos), steps=40)
    assert metrics["standardize_penalty"] < before["standardize_penalty"] / 4
    assert 0.5 < metrics["latent_std"] < 2.0


@pytest.mark.parametrize("encoder", ENCODERS)
def test_a_transition_gets_the_same_latent_wherever_it_sits_in_the_clip(encoder):
    model = tiny_lam(**encoder)
    frames = moving_squares()
    z = model.latents(frames)  # [B, 3, L]
    assert torch.allclose(z[:, 1:], model.latents(frames[:, 1:]), atol=1e-5)
    assert torch.allclose(z[:, 2], model.latents(frames[:, 2:])[:, 0], atol=1e-5)


def test_antisymmetric_latent_flips_when_the_clip_plays_backwards():
    frames = moving_squares()
    model = tiny_lam(antisymmetric=True)
    z = model.latents(frames)  # [B, 3, L]: j -> j+1
    backwards = model.latents(frames.flip(1))  # [B, 3, L]: 3-j -> 2-j, the same transitions reversed
    assert torch.allclose(backwards, -z.flip(1), atol=1e-5)
    assert torch.allclose(model.latents(frames[:, [0, 0]]), torch.zeros(8, 1, 2), atol=1e-6)  # no change: 0
    plain = tiny_lam().latents(frames)
    assert not torch.allclose(tiny_lam().latents(frames.flip(1)), -plain.flip(1), atol=1e-3)


def test_loss_without_videos_treats_the_batch_as_one_video():
    model = tiny_lam()
    frames = moving_squares()
    torch.manual_seed(0)
    loss, _ = model.loss(frames)
    torch.manual_seed(0)
    same, _ = model.loss(frames, torch.full((8,), 5))
    torch.manual_seed(0)
    apart, _ = model.loss(frames, torch.arange(8) % 2)
    assert loss.item() == pytest.approx(same.item())
    assert loss.item() != pytest.approx(apart.item())


def test_loss_backward_under_bf16_autocast():
    model = tiny_lam(mask_ratio=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(moving_squares())
    loss.backward()
    assert torch.isfinite(loss)
    assert model.to_latent.weight.grad.abs().sum() > 0  # the encoder learns through FSQ
    assert model.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"levels": (2,)}, "LatentActionConfig.levels=(2,): gives 2 actions; must give 4 to 16"),
        ({"levels": (2, 2, 2, 2, 2)}, "LatentActionConfig.levels=(2, 2, 2, 2, 2): gives 32 actions"),
        ({"mask_ratio": 1.0}, "LatentActionConfig.mask_ratio=1.0"),
        ({"mask_ratio": -0.1}, "LatentActionConfig.mask_ratio=-0.1: must be in [0.0, 1.0]"),
        ({"standardize_weight": -1.0}, "LatentActionConfig.standardize_weight=-1.0: must be >= 0"),
        ({"patch_size": 3}, "LatentActionConfig.patch_size=3: frame_size 16 is not divisible by it"),
        ({"max_frames": 1}, "LatentActionConfig.max_frames=1"),
        ({"pair_encoding": "both"}, "LatentActionConfig.pair_encoding='both': must be one of stacked, sequence"),
        ({"antisymmetric": True, "pair_encoding": "sequence"}, "LatentActionConfig.antisymmetric=True: needs pair_encoding: stacked"),
        ({"antisymmetric": "yes"}, "LatentActionConfig.antisymmetric='yes': must be true or false"),
        ({"decoder_context": "past"}, "LatentActionConfig.decoder_context='past': must be one of clip, frame"),
        ({"decoder_context": "frame", "mask_ratio": 0.5}, "LatentActionConfig.mask_ratio=0.5: needs decoder_context: clip"),
        ({"persistence_weight": -1.0}, "LatentActionConfig.persistence_weight=-1.0: must be >= 0"),
        ({"persistence_weight": 1.0, "max_frames": 2}, "LatentActionConfig.persistence_weight=1.0: needs clips of 3 frames"),
        ({"readout": "sign"}, "LatentActionConfig.readout='sign': must be one of codes, direction"),
        ({"persistence": "all"}, "LatentActionConfig.persistence='all': must be one of each, slowest"),
        ({"readout": "direction"}, "LatentActionConfig.readout='direction': direction needs odd FSQ levels"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(TinyWorldsError) as err:
        LatentActionConfig(**{**TINY, **overrides})
    assert str(err.value).startswith(message)


def test_single_frame_clip_is_a_clear_error():
    with pytest.raises(TinyWorldsError, match=">= 2 frames"):
        tiny_lam().loss(moving_squares()[:, :1])


def test_changed_pixels_weigh_change_weight_and_residual_starts_by_copying():
    model = tiny_lam(change_weight=5.0, residual=True)
    frames = moving_squares(batch=2, frames=3)  # [B, T, C, H, W] in [-1, 1]
    weights = model.change_weights(frames)  # [B, T-1, 1, H, W]
    moved = ((frames[:, 1:] - frames[:, :-1]).abs().amax(dim=2, keepdim=True) > 24 / 127.5)
    assert weights.shape == (2, 2, 1, 16, 16) and moved.any()
    assert torch.equal(weights, 1 + 4 * moved.float())
    codes = model.fsq(model.latents(frames))
    # The change head starts at zero: the untrained residual decoder copies frame t.
    assert torch.equal(model.predict(frames[:, :-1], codes), frames[:, :-1])
    loss, metrics = model.loss(frames)
    assert "change_mse" in metrics and metrics["change_mse"] > metrics["recon_mse"]
    assert torch.isfinite(loss)


def test_a_transition_over_a_drop_idle_cut_gets_no_latent_action(tmp_path):
    import zarr

    from tinyworlds.data.clips import SplitConfig
    from tinyworlds.inference.latent_actions import cache_latent_actions

    frames = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    group = zarr.open_group(str(tmp_path / "cut.zarr"), mode="w")
    group.create_array("frames", data=frames, chunks=(8, 16, 16, 3))
    group.create_array("segment", data=np.array([0] * 9 + [1] * 11, dtype=np.int32), chunks=(8,))
    model = LatentActionModel(LatentActionConfig(frame_size=16, patch_size=8, embed_dim=16, num_heads=2,
                                                 encoder_blocks=1, decoder_blocks=1)).eval()
    labelled, readout = cache_latent_actions(model, {"cut": (tmp_path / "cut.zarr", tmp_path / "ids.zarr")},
                                             split=SplitConfig(), clip_len=4, frame_skip=2, device=torch.device("cpu"))
    actions = labelled["cut"]
    assert readout is None  # readout: codes
    # Transitions t -> t + 2 that start in segment 0 and end in segment 1: t = 7, 8.
    assert np.flatnonzero(actions[:-2] < 0).tolist() == [7, 8]
    assert (actions[-2:] == -1).all()  # no frame t + 2 to go to
    # A direction readout is fitted on the video's own latents, returned, and read the same way.
    model = LatentActionModel(LatentActionConfig(frame_size=16, patch_size=8, embed_dim=16, num_heads=2, encoder_blocks=1,
                                                 decoder_blocks=1, levels=(3, 3), readout="direction")).eval()
    split = SplitConfig(block_frames=10, gap_frames=0)  # frames 0-9 train: 6 consecutive pairs to fit on
    labelled, readout = cache_latent_actions(model, {"cut": (tmp_path / "cut.zarr", tmp_path / "ids3.zarr")},
                                             split=split, clip_len=4, frame_skip=2, device=torch.device("cpu"))
    assert set(readout["datasets"]) == {"cut"} and set(labelled["cut"][labelled["cut"] >= 0]) <= {0, 1, 2}
    assert np.flatnonzero(labelled["cut"] < 0).tolist() == [7, 8, 18, 19]


def test_a_non_finite_latent_gives_a_non_finite_loss_not_an_exception():
    model = tiny_lam()
    with torch.no_grad():
        model.to_latent.bias.fill_(float("nan"))
    loss, _ = model.loss(moving_squares(batch=4), torch.arange(4) % 2)
    assert not torch.isfinite(loss)  # the training loop stops with "loss became non-finite at step N"


def held_and_placed_latents(count=4000, seed=0):
    """Latents [N, 2] of a run of transitions: along (1, 1) a direction held for 10 steps at a
    time (+1 or -1), along (1, -1) a place that is new at every step, as a LAM's two whitened
    dimensions mix them."""
    rng = np.random.default_rng(seed)
    held = np.repeat(rng.choice([-1.0, 1.0], count // 10), 10)  # [N]
    place = rng.normal(size=count)  # [N]
    return torch.from_numpy(np.stack([held + place, held - place], axis=1) / np.sqrt(2))  # [N, 2]


def test_slowest_direction_finds_the_held_one_not_the_place():
    latents = held_and_placed_latents()
    direction, held_slowness = slowest_direction(latents[:-1], latents[1:])
    assert torch.allclose(direction, torch.tensor([1.0, 1.0]) / np.sqrt(2), atol=0.05)  # sign: largest component > 0
    # Half the 10-step blocks flip the sign: E[Δ²] / 2E[z²] = (4 / 20) / 2.
    assert held_slowness == pytest.approx(0.1, abs=0.03)
    flipped, _ = slowest_direction(-latents[:-1], -latents[1:])
    assert torch.equal(flipped, direction)  # the sign is fixed, not the data's
    _, forgetful = slowest_direction(latents[1:], latents[torch.randperm(len(latents) - 1) + 1])
    assert forgetful > 0.4  # shuffled, no direction is held
    with pytest.raises(TinyWorldsError, match="needs more than 2 pairs of consecutive transitions"):
        slowest_direction(latents[:2], latents[1:3])


def test_direction_readout_gives_still_and_the_two_signs():
    model = tiny_lam(levels=(3, 3), antisymmetric=True, readout="direction")
    assert model.num_actions == 3
    direction = torch.tensor([1.0, 1.0]) / np.sqrt(2)
    latents = torch.tensor([[0.1, -0.2], [2.0, 0.3], [-0.4, -1.5], [3.0, -1.0], [-3.0, 1.0]])
    ids = model.read_ids(latents, direction)
    assert ids.tolist() == [STILL, POSITIVE, NEGATIVE, POSITIVE, NEGATIVE]  # the middle FSQ code is still
    assert (model.read_ids(-latents, direction) == 2 - ids).all()  # backwards: the opposite id
    frames = moving_squares()
    inferred = model.infer(frames, direction)
    assert inferred.shape == (8, 3) and torch.equal(model.infer(frames.flip(1), direction), 2 - inferred.flip(1))
    with pytest.raises(TinyWorldsError, match="readout: direction needs the slowest direction"):
        model.infer(frames)
    codes = tiny_lam(levels=(3, 3), antisymmetric=True)
    assert codes.num_actions == 9 and codes.read_ids(latents, direction).max() > 2  # codes ignore a direction
    # Read along a direction, the FSQ codes are not actions: 27 of them still name 3.
    three_dims = tiny_lam(levels=(3, 3, 3), antisymmetric=True, readout="direction")
    assert three_dims.num_actions == 3 and three_dims.fsq.vocab_size == 27
    assert three_dims.read_ids(torch.zeros(1, 3), torch.ones(3) / np.sqrt(3)).tolist() == [STILL]
    with pytest.raises(TinyWorldsError, match=r"levels=\(3, 3, 3\): gives 27 actions; must give 4 to 16 \(or use readout: direction\)"):
        LatentActionConfig(**{**TINY, "levels": (3, 3, 3)})


def test_the_readout_is_fitted_on_consecutive_training_transitions_only():
    from tinyworlds.data.clips import TRAIN, VAL, SplitConfig, frame_labels
    from tinyworlds.inference.latent_actions import consecutive_pairs, fit_readout, readout_direction

    latents = held_and_placed_latents(3000).numpy()
    latents[100] = np.nan  # a transition with no latent (past the end, or over a cut)
    labels = np.full(3000, TRAIN)
    labels[1000:1300] = VAL
    pairs = consecutive_pairs(latents, 2, labels)
    assert 99 in pairs and not {98, 100}.intersection(pairs)  # 100 unknown: 98 -> 100 and 100 -> 102 go
    assert not set(range(996, 1300)).intersection(pairs)  # t, t + 2 and t + 4 must all be training frames
    assert pairs.max() == 3000 - 1 - 4  # frame t + 4 must exist
    # No labels: every pair t, t + 1 of known latents, t <= N - 2, less the two that touch 100.
    assert len(consecutive_pairs(latents, 1)) == 3000 - 1 - 2
    split = SplitConfig(val_fraction=0.25, block_frames=500, gap_frames=10)
    # A second video whose held-out frames hold the opposite structure must not move its direction.
    other = latents[:, ::-1].copy()
    other[frame_labels(3000, split) == VAL] *= np.array([1.0, -1.0], dtype=np.float32)
    readout = fit_readout({"a": latents, "b": other}, split, 1)
    for name in ("a", "b"):
        entry = readout["datasets"][name]
        assert np.allclose(entry["direction"], [2 ** -0.5, 2 ** -0.5], atol=0.05) and entry["slowness"] < 0.15
    assert readout["pooled"]["pairs"] == readout["datasets"]["a"]["pairs"] + readout["datasets"]["b"]["pairs"]
    assert readout_direction(readout, "a") == readout["datasets"]["a"]["direction"]
    assert readout_direction(readout, "some_video.mp4") == readout_direction(readout, None) == readout["pooled"]["direction"]
    assert readout_direction(None, "a") is None

"""WorldModel: the three trained models used together (tiny random-init models)."""

import json

import numpy as np
import pytest
import torch
from einops import rearrange

from tests.conftest import NUM_ACTIONS, SIZE, WINDOW, save_tiny_models, store_frames
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.inference.world import GenerationSettings, WorldModel
from tinyworlds.models import LatentActionConfig, LatentActionModel, save_model
from tinyworlds.models.pixels import to_model


@pytest.fixture
def world(tmp_path):
    save_tiny_models(tmp_path / "models")
    return WorldModel.load(tmp_path / "models", device="cpu")


def clip(n):
    return torch.from_numpy(store_frames(n)).permute(0, 3, 1, 2)[None]  # [1, n, C, H, W]


def test_encode_decode_shapes_and_per_frame_tokens(world):
    frames = clip(10)
    tokens = world.encode(frames)
    assert tokens.shape == (1, 10, world.tokenizer.num_patches)
    assert torch.equal(tokens[:, 4:5], world.encode(frames[:, 4:5]))  # a frame's tokens are its own
    decoded = world.decode(tokens)
    assert decoded.shape == frames.shape and decoded.dtype == torch.uint8


def test_decoding_past_the_window_slides_it(world):
    tokens = world.encode(clip(10))
    long = world.decode(tokens)  # 10 frames > WINDOW: sliding windows
    assert torch.equal(long[:, :WINDOW], world.decode(tokens[:, :WINDOW]))
    assert torch.equal(long[:, 7], world.decode(tokens[:, 7 - WINDOW + 1 : 8])[:, -1])


def test_actions_past_the_window_are_labelled_with_full_context(world):
    frames = clip(9)
    ids = world.infer_actions(frames)
    assert ids.shape == (1, 8) and int(ids.max()) < NUM_ACTIONS
    assert torch.equal(ids[:, : WINDOW - 1], world.infer_actions(frames[:, :WINDOW]))
    assert torch.equal(ids[:, 7], world.infer_actions(frames[:, 9 - WINDOW :])[:, -1])


def test_rollout_is_deterministic_and_the_right_shape(world):
    context, actions = clip(3), torch.tensor([[0, 1, 2, 3, 1]])
    settings = GenerationSettings(steps=4, temperature=1.0, seed=5)
    first = world.rollout(context, actions, settings=settings)
    assert first.shape == (1, 5, 3, SIZE, SIZE) and first.dtype == torch.uint8
    assert torch.equal(first, world.rollout(context, actions, settings=settings))


def test_bad_inputs_are_one_line_errors(world, tmp_path):
    with pytest.raises(TinyWorldsError, match=r"action ids must be in 0\.\.3"):
        world.rollout(clip(3), torch.tensor([[0, 9]]))
    with pytest.raises(TinyWorldsError, match="expected uint8"):
        world.encode(clip(3).float())
    with pytest.raises(TinyWorldsError, match="no such model directory"):
        WorldModel.load(tmp_path / "nowhere")


def test_models_from_different_runs_are_refused(tmp_path):
    save_tiny_models(tmp_path / "models")
    other = LatentActionModel(LatentActionConfig(frame_size=SIZE, patch_size=4, embed_dim=32, num_heads=2,
                                                 encoder_blocks=1, decoder_blocks=1, levels=(2, 2, 2), max_frames=WINDOW))
    save_model(other, tmp_path / "models" / "lam")  # 8 actions; dynamics expects 4
    with pytest.raises(TinyWorldsError, match="expects 4 actions"):
        WorldModel.load(tmp_path / "models", device="cpu")


def test_latent_ids_are_named_by_the_true_action_they_most_often_match():
    from tinyworlds.inference.latent_actions import action_labels, name_latent_actions

    meanings = ["NOOP", "FIRE", "UP", "DOWN", "UPFIRE"]
    latent = np.array([0, 0, 1, 1, 1, 2, -1])
    true = np.array([1, 0, 2, 4, 3, 3, 0])  # FIRE moves nothing (NOOP); UPFIRE moves up (UP)
    named = name_latent_actions(latent, true, meanings, num_actions=4)
    assert named["names"] == ["NOOP", "UP", "DOWN", None]
    assert named["share"] == pytest.approx([1.0, 2 / 3, 1.0, 0.0])
    doc = {"usage": [0.5, 0.4, 0.095, 0.005], "datasets": {"pong": named}}
    assert action_labels(doc, 4) == ["NOOP (pong)", "UP (pong)", "DOWN (pong)", "unused"]
    assert action_labels(None, 4) == [""] * 4


def test_world_reads_the_action_names_saved_beside_the_lam(tmp_path):
    from tinyworlds.inference.latent_actions import NAMES_FILE

    save_tiny_models(tmp_path / "models")
    names = {"names": ["LEFT", None, "RIGHT", None] + [None] * (NUM_ACTIONS - 4), "share": [1.0] * NUM_ACTIONS}
    (tmp_path / "models" / "lam" / NAMES_FILE).write_text(
        json.dumps({"usage": [0.5, 0.0, 0.5] + [0.0] * (NUM_ACTIONS - 3), "datasets": {"breakout": names}}))
    labels = WorldModel.load(tmp_path / "models", device="cpu").action_labels()
    assert labels[:3] == ["LEFT (breakout)", "unused", "RIGHT (breakout)"]


def test_a_direction_lam_reads_each_videos_ids_along_its_own_direction(tmp_path):
    from tinyworlds.inference.latent_actions import READOUT_FILE

    save_tiny_models(tmp_path / "models", num_actions=3)
    with pytest.raises(TinyWorldsError, match="readout.json: missing"):
        WorldModel.load(tmp_path / "models", device="cpu")
    readout = {"datasets": {"pong": {"direction": [1.0, 0.0], "slowness": 0.1, "pairs": 10}},
               "pooled": {"direction": [0.0, 1.0], "slowness": 0.2, "pairs": 20}}
    (tmp_path / "models" / "lam" / READOUT_FILE).write_text(json.dumps(readout))
    world = WorldModel.load(tmp_path / "models", device="cpu")
    assert world.num_actions == 3
    frames = rearrange(clip(40)[0].unfold(0, WINDOW, 1), "n c h w t -> n t c h w")  # [37, 4, C, H, W]
    with torch.no_grad():
        world.lam.to_latent.weight.mul_(1000)  # latents (~0.004 at init) well outside FSQ's middle level, so most transitions move
        latents = world.lam.latents(to_model(frames))  # [37, 3, 2]
    read = {}
    for dataset, column in (("pong", 0), ("breakout", 1), (None, 1)):  # breakout: not fitted, the pooled one
        ids = world.infer_actions(frames, dataset)  # [37, 3]
        moved = ids != 1
        assert moved.sum() > 20 and torch.equal(ids[moved], torch.where(latents[moved][:, column] > 0, 2, 0))
        read[dataset] = ids
    assert not torch.equal(read["pong"], read[None])
    dream = world.rollout(frames[:1, :3], torch.tensor([[0, 1, 2]]), dataset="pong")
    assert dream.shape == (1, 3, 3, SIZE, SIZE)


def test_unchanged_patches_keep_the_pixels_shown_before():
    from tinyworlds.inference.world import carry_unchanged_patches

    generator = torch.Generator().manual_seed(0)
    decoded = torch.randint(0, 256, (1, 2, 3, 4, 4), dtype=torch.uint8, generator=generator)  # 2x2 patches of 2 px
    shown = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    shown_tokens = torch.tensor([[5, 6, 7, 8]])
    tokens = torch.tensor([[[5, 0, 7, 0],     # patches 0 and 2 (top left, bottom left) kept from the real frame
                            [5, 1, 9, 0]]])   # patch 0 still kept, patch 3 kept from frame 0's redrawn pixels
    frames = carry_unchanged_patches(decoded, tokens, shown, shown_tokens, patch_size=2)
    assert frames.shape == decoded.shape
    first, second = frames[0, 0], frames[0, 1]
    assert (first[:, :, :2] == 0).all()  # left column of patches: the real frame's
    assert torch.equal(first[:, :, 2:], decoded[0, 0, :, :, 2:])  # right column: redrawn
    assert (second[:, :2, :2] == 0).all()
    assert torch.equal(second[:, 2:, 2:], decoded[0, 0, :, 2:, 2:])  # carried from frame 0, which redrew it
    assert torch.equal(second[:, :2, 2:], decoded[0, 1, :, :2, 2:])  # token 0 -> 1: redrawn
    assert torch.equal(second[:, 2:, :2], decoded[0, 1, :, 2:, :2])  # token 7 -> 9: redrawn


def test_keep_bias_auto_is_the_dynamics_models_calibrated_value(world):
    from tinyworlds.inference.world import resolve_keep_bias

    assert world.keep_bias(GenerationSettings()) == world.dynamics.calibrated_keep_bias()
    assert world.keep_bias(GenerationSettings(keep_bias=0)) == 0.0
    context, actions = clip(3), torch.tensor([[0, 1, 2, 3]])
    certain = world.rollout(context, actions, settings=GenerationSettings(temperature=0.0, keep_bias=60.0))
    assert all(torch.equal(certain[0, n], context[0, -1]) for n in range(4))  # every patch kept: the last frame
    with pytest.raises(TinyWorldsError, match=r"keep_bias=nan: must be auto or a number"):
        resolve_keep_bias(float("nan"), world.dynamics)


def test_rollout_redraws_only_the_patches_whose_token_changed(world):
    context, actions = clip(3), torch.tensor([[0, 1, 2, 3]])
    carried = world.rollout(context, actions, settings=GenerationSettings(temperature=0.0))
    redrawn = world.rollout(context, actions, settings=GenerationSettings(temperature=0.0, carry_unchanged=False))
    assert not torch.equal(carried, redrawn)  # the tiny model's 16 tokens: some are kept
    size = world.tokenizer.config.patch_size
    before = context[0, -1]
    for n in range(actions.shape[1]):
        for top in range(0, SIZE, size):
            for left in range(0, SIZE, size):
                patch = carried[0, n, :, top : top + size, left : left + size]
                assert (torch.equal(patch, redrawn[0, n, :, top : top + size, left : left + size])
                        or torch.equal(patch, before[:, top : top + size, left : left + size]))
        before = carried[0, n]

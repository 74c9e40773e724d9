import pytest
import torch

from tests.conftest import fit
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.models import TokenizerConfig, VideoTokenizer, to_model, to_uint8

TINY = dict(frame_size=16, patch_size=4, embed_dim=32, num_heads=2, encoder_blocks=1, decoder_blocks=1,
            levels=(5, 5, 5), max_frames=4)


def tiny_tokenizer(**overrides) -> VideoTokenizer:
    torch.manual_seed(0)
    return VideoTokenizer(TokenizerConfig(**{**TINY, **overrides}))


def blocky_frames(batch=4, frames=4, seed=0) -> torch.Tensor:
    """Frames [B, T, 3, 16, 16] in [-1, 1] made of 4x4 flat blocks: learnable per patch."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, frames, 3, 4, 4, generator=g) * 2 - 1
    return coarse.repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2)


@pytest.mark.parametrize("encoder_context", ["frame", "patch"])
def test_encode_decode_shapes_and_ids(encoder_context):
    model = tiny_tokenizer(encoder_context=encoder_context)
    frames = blocky_frames()
    assert model.vocab_size == 125 and model.num_patches == 16
    tokens = model.encode(frames)
    assert tokens.shape == (4, 4, 16) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < 125
    recon, forward_tokens = model(frames)
    assert recon.shape == frames.shape
    assert torch.equal(forward_tokens, tokens)
    assert torch.allclose(model.decode(tokens), recon, atol=1e-5)


@pytest.mark.parametrize("encoder_context", ["frame", "patch"])
def test_tokens_and_decoding_are_causal_in_time(encoder_context):
    model = tiny_tokenizer(encoder_context=encoder_context)
    frames = blocky_frames()
    changed = frames.clone()
    changed[:, 2] = -changed[:, 2]
    z, z_changed = model.latents(frames), model.latents(changed)  # [B, T, P, L]
    assert torch.allclose(z[:, :2], z_changed[:, :2], atol=1e-6)
    assert not torch.allclose(z[:, 2], z_changed[:, 2], atol=1e-3)
    assert torch.equal(model.encode(frames)[:, :2], model.encode(changed)[:, :2])
    tokens = model.encode(frames)
    other = tokens.clone()
    other[:, 3] = (other[:, 3] + 1) % model.vocab_size
    assert torch.allclose(model.decode(tokens)[:, :3], model.decode(other)[:, :3], atol=1e-6)


@pytest.mark.parametrize("encoder_context", ["frame", "patch"])
def test_a_frames_tokens_depend_on_that_frame_alone(encoder_context):
    """What makes the per-frame token cache exact: neither the other frames of the clip nor
    the frame's position in it change its tokens."""
    model = tiny_tokenizer(encoder_context=encoder_context)
    frames = blocky_frames()  # [B, T, C, H, W]
    changed = frames.clone()
    changed[:, 1] = -changed[:, 1]
    assert torch.equal(model.encode(frames)[:, 2:], model.encode(changed)[:, 2:])
    one_at_a_time = torch.cat([model.encode(frames[:, t : t + 1]) for t in range(frames.shape[1])], dim=1)
    assert torch.equal(model.encode(frames), one_at_a_time)


def test_patch_context_tokens_depend_on_the_patchs_own_pixels_alone():
    """encoder_context: patch: a patch whose pixels stay keeps its token whatever its neighbours
    do, and the same pixels get the same token at any place (what lets a rollout carry them)."""
    model = tiny_tokenizer(encoder_context="patch")
    frames = blocky_frames()  # [B, T, C, H, W], 4x4 patches
    changed = frames.clone()
    changed[..., :4, :4] = -changed[..., :4, :4]  # the top-left patch of every frame
    moved = model.encode(frames) != model.encode(changed)  # [B, T, P]
    assert moved[..., 1:].sum() == 0 and moved[..., 0].any()
    copied = frames.clone()
    copied[..., 12:, 12:] = frames[..., :4, :4]  # the top-left patch also at the bottom right
    tokens = model.encode(copied)
    assert torch.equal(tokens[..., -1], tokens[..., 0])


def test_frame_context_tokens_see_their_neighbours():
    """The default encoder attends over the frame: a neighbour's change can move a still patch's latent."""
    model = tiny_tokenizer()
    frames = blocky_frames()
    changed = frames.clone()
    changed[..., :4, :4] = -changed[..., :4, :4]
    assert not torch.allclose(model.latents(frames)[..., 1:, :], model.latents(changed)[..., 1:, :], atol=1e-4)


@pytest.mark.parametrize("encoder_context", ["frame", "patch"])
def test_overfits_a_fixed_batch(encoder_context):
    model = tiny_tokenizer(encoder_context=encoder_context)
    frames = blocky_frames()
    first, _ = model.loss(frames)
    _, metrics = fit(model, lambda: model.loss(frames), steps=150)
    assert metrics["mse"] < first.item() / 10
    assert metrics["psnr"] > 15
    assert 0 < metrics["codebook_usage"] <= 1


def test_loss_backward_under_bf16_autocast():
    model = tiny_tokenizer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model.loss(blocky_frames())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.patch_embed.weight.grad.abs().sum() > 0
    assert all(not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"patch_size": 5}, "TokenizerConfig.patch_size=5: frame_size 16 is not divisible by it"),
        ({"levels": (8, 1)}, "TokenizerConfig.levels=(8, 1)"),
        ({"levels": ()}, "TokenizerConfig.levels=()"),
        ({"embed_dim": 30}, "TokenizerConfig.embed_dim=30"),
        ({"num_heads": 3}, "TokenizerConfig.num_heads=3: embed_dim 32 is not divisible by it"),
        ({"encoder_blocks": 0}, "TokenizerConfig.encoder_blocks=0: must be >= 1"),
        ({"frame_size": 16.0}, "TokenizerConfig.frame_size=16.0: must be a whole number"),
        ({"encoder_context": "clip"}, "TokenizerConfig.encoder_context='clip': must be one of ('frame', 'patch')"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(TinyWorldsError) as err:
        TokenizerConfig(**{**TINY, **overrides})
    assert str(err.value).startswith(message)


def test_levels_from_json_lists_become_tuples():
    assert TokenizerConfig(**{**TINY, "levels": [4, 4]}).levels == (4, 4)


def test_clip_longer_than_max_frames_is_a_clear_error():
    with pytest.raises(TinyWorldsError, match="max_frames=4"):
        tiny_tokenizer().encode(blocky_frames(frames=5))


def test_decoding_past_the_window_slides_it():
    # A dynamics model may train on longer clips than the tokenizer: their frames still decode,
    # each from the window of tokens ending at it.
    model = tiny_tokenizer()
    tokens = torch.randint(0, model.vocab_size, (2, 7, model.num_patches))
    long = model.decode(tokens)  # 7 frames > max_frames 4
    assert long.shape == (2, 7, 3, 16, 16)
    assert torch.allclose(long[:, :4], model.decode(tokens[:, :4]), atol=1e-6)
    for t in range(4, 7):
        assert torch.allclose(long[:, t], model.decode(tokens[:, t - 3 : t + 1])[:, -1], atol=1e-6)


def test_pixel_conversion_round_trips():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16)
    model_input = to_model(pixels)
    assert model_input.dtype == torch.float32
    assert model_input.min() == -1 and model_input.max() == 1
    assert torch.equal(to_uint8(model_input), pixels)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 0.0, 3.0])), torch.tensor([0, 128, 255], dtype=torch.uint8))
    with pytest.raises(TinyWorldsError, match="uint8"):
        to_model(model_input)


def test_object_pixels_weigh_foreground_weight_in_the_loss():
    model = tiny_tokenizer(foreground_weight=10.0)
    background = torch.full((2, 3, 16, 16), -1.0)  # [B, C, H, W]: a black field
    frames = background[:, None].repeat(1, 3, 1, 1, 1).clone()  # [B, T, C, H, W]
    frames[:, :, :, 4:6, 4:6] = 1.0  # a 2x2 white sprite
    weights = model.pixel_weights(frames, background)  # [B, T, 1, H, W]
    assert weights.shape == (2, 3, 1, 16, 16)
    assert (weights[:, :, :, 4:6, 4:6] == 10).all() and weights.sum() == 2 * 3 * (256 - 4 + 40)
    assert torch.equal(model.pixel_weights(frames, None), torch.ones_like(weights))
    loss, metrics = model.loss(frames, background)
    # The weighted loss counts the sprite's error ten times: it exceeds the plain MSE whenever
    # the sprite is reconstructed worse than the field, which an untrained model does.
    assert loss > metrics["mse"] and "fg_mse" in metrics and metrics["fg_mse"] > metrics["mse"]


def test_a_ghost_sprite_weighs_ghost_weight():
    background = torch.full((1, 3, 16, 16), -1.0)  # [B, C, H, W]: a black field
    frames = background[:, None].repeat(1, 2, 1, 1, 1).clone()  # [B, T, C, H, W]
    frames[:, :, :, 4:6, 4:6] = 1.0  # the real sprite
    reconstruction = background[:, None].repeat(1, 2, 1, 1, 1).clone()
    reconstruction[:, :, :, 4:6, 4:5] = 1.0  # half the real sprite drawn
    reconstruction[:, :, :, 10:12, 10:12] = 1.0  # and a ghost where nothing is
    weights = tiny_tokenizer(foreground_weight=10.0, ghost_weight=4.0).pixel_weights(frames, background, reconstruction)
    assert (weights[..., 4:6, 4:6] == 10).all() and (weights[..., 10:12, 10:12] == 4).all()
    assert weights.sum() == 2 * (256 - 8 + 40 + 16)
    as_before = tiny_tokenizer(foreground_weight=10.0).pixel_weights(frames, background, reconstruction)
    from_frames_alone = tiny_tokenizer(foreground_weight=10.0, ghost_weight=4.0).pixel_weights(frames, background)
    assert (as_before[..., 10:12, 10:12] == 1).all() and torch.equal(as_before, from_frames_alone)
    # The loss marks ghosts in the model's own reconstruction: an untrained model draws off the
    # black field almost everywhere, so the same weights cost more with a ghost weight.
    plain, _ = tiny_tokenizer(foreground_weight=10.0).loss(frames, background)
    ghostly, _ = tiny_tokenizer(foreground_weight=10.0, ghost_weight=4.0).loss(frames, background)
    assert ghostly > 1.5 * plain
    with pytest.raises(TinyWorldsError, match="ghost_weight"):
        TokenizerConfig(**{**TINY, "ghost_weight": 0.5})


def test_a_weight_below_one_is_a_config_error():
    with pytest.raises(TinyWorldsError, match="foreground_weight"):
        TokenizerConfig(**{**TINY, "foreground_weight": 0.5})

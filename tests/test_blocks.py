import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.models.blocks import (
    SpaceTimeBlock,
    SpaceTimeTransformer,
    patchify,
    short_attention,
    sincos_1d,
    sincos_2d,
    unpatchify,
)

E = 32


def test_patchify_groups_each_patch_and_unpatchify_inverts_it():
    frames = torch.randn(2, 3, 3, 8, 12)  # [B, T, C, H, W] with a 2x3 grid of 4x4 patches
    patches = patchify(frames, 4)
    assert patches.shape == (2, 3, 6, 4 * 4 * 3)
    # patch 1 is row 0, column 1; its vector is the patch's pixels, channels last
    assert torch.equal(patches[0, 0, 1], frames[0, 0, :, 0:4, 4:8].permute(1, 2, 0).flatten())
    square = torch.randn(2, 3, 3, 8, 8)
    assert torch.equal(unpatchify(patchify(square, 4), 4, grid=2), square)


def test_sinusoidal_positions_are_distinct():
    assert torch.unique(sincos_2d(4, E), dim=0).shape == (16, E)
    assert torch.unique(sincos_1d(10, E), dim=0).shape == (10, E)
    assert torch.allclose(sincos_1d(3, E)[0], torch.cat([torch.zeros(E // 2), torch.ones(E // 2)]))


def test_space_time_block_is_causal_in_time_and_mixes_space():
    torch.manual_seed(0)
    block = SpaceTimeBlock(E, 2)
    x = torch.randn(2, 4, 6, E)  # [B, T, P, E]
    changed = x.clone()
    changed[:, 2] += torch.randn(2, 6, E)
    out, out_changed = block(x), block(changed)
    assert torch.allclose(out[:, :2], out_changed[:, :2], atol=1e-6)
    assert not torch.allclose(out[:, 2:], out_changed[:, 2:], atol=1e-3)
    one_patch = x.clone()
    one_patch[:, 0, 0] += 1.0
    assert not torch.allclose(block(one_patch)[:, 0, 1:], out[:, 0, 1:], atol=1e-4)


def test_non_causal_block_lets_the_past_see_the_future():
    torch.manual_seed(0)
    block = SpaceTimeBlock(E, 2, causal=False)
    x = torch.randn(1, 3, 4, E)
    changed = x.clone()
    changed[:, 2] += 1.0
    assert not torch.allclose(block(x)[:, 0], block(changed)[:, 0], atol=1e-4)


def test_film_conditioning_acts_at_init_and_stays_near_identity():
    torch.manual_seed(0)
    block = SpaceTimeBlock(E, 2, cond_dim=8)
    x = torch.randn(2, 3, 4, E)
    cond = torch.randn(2, 3, 8)
    other = cond.clone()
    other[:, 1] = torch.randn(2, 8)
    out = block(x, cond)
    # only frame 1's condition changed: frame 0 is untouched (causal), frames 1.. move
    changed = block(x, other)
    assert torch.allclose(out[:, 0], changed[:, 0], atol=1e-6)
    assert not torch.allclose(out[:, 1], changed[:, 1], atol=1e-4)
    # a zero condition gives gamma = beta = 0; a real one only nudges the output
    neutral = block(x, torch.zeros_like(cond))
    assert (out - neutral).norm() < 0.5 * (neutral - x).norm()


def test_transformer_shapes_and_max_frames():
    model = SpaceTimeTransformer(E, 2, 2, grid=2, max_frames=3)
    assert model(torch.randn(2, 3, 4, E)).shape == (2, 3, 4, E)
    with pytest.raises(TinyWorldsError, match="max_frames=3"):
        model(torch.randn(1, 4, 4, E))
    assert not any("pos_" in name for name in model.state_dict())  # rebuilt from the config


def test_transformer_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = SpaceTimeTransformer(E, 2, 2, grid=2, max_frames=4, cond_dim=E)
    x = torch.randn(2, 4, 4, E)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.randn(2, 4, E))
        out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_spatial_only_transformer_treats_every_frame_alone():
    torch.manual_seed(0)
    model = SpaceTimeTransformer(E, 2, 1, grid=2, max_frames=4, temporal=False)
    x = torch.randn(2, 4, 4, E)
    changed = x.clone()
    changed[:, 1] += 1.0
    out, out_changed = model(x), model(changed)
    assert torch.allclose(out[:, [0, 2, 3]], out_changed[:, [0, 2, 3]], atol=1e-6)
    # no time position either: the same frame gives the same output at any index
    assert torch.allclose(model(x[:, 2:3]), out[:, 2:3], atol=1e-6)
    assert not any("attn_time" in name for name in model.state_dict())


@pytest.mark.parametrize("frames,causal", [(1, True), (2, True), (4, True), (3, False)])
def test_short_attention_equals_sdpa_with_its_gradients(frames, causal):
    """The dense path for a few frames and narrow heads is the same attention as SDPA."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(5, frames, 8 * 4, dtype=torch.float64, requires_grad=True) for _ in range(3))  # [R, L, E]
    heads = [rearrange(z, "n l (h d) -> n h l d", h=8) for z in (q, k, v)]
    expected = rearrange(F.scaled_dot_product_attention(*heads, is_causal=causal), "n h l d -> n l (h d)")
    got = short_attention(q, k, v, 8, causal=causal)
    assert torch.allclose(got, expected, atol=1e-12)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, expected_grads))

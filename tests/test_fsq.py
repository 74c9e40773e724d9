import math

import pytest
import torch

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.models.fsq import FSQ, id_usage, perplexity


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 2), (3, 4, 2), (7,)])
def test_every_id_round_trips_through_its_code(levels):
    fsq = FSQ(levels)
    assert fsq.vocab_size == math.prod(levels)
    ids = torch.arange(fsq.vocab_size)
    codes = fsq.ids_to_codes(ids)  # [V, L]
    assert codes.shape == (fsq.vocab_size, len(levels))
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(fsq.codes_to_ids(codes), ids)
    assert len({tuple(c) for c in codes.tolist()}) == fsq.vocab_size


def test_codes_are_evenly_spaced_over_minus_one_to_one():
    fsq = FSQ((4, 3))
    codes = fsq.ids_to_codes(torch.arange(12))
    assert sorted(set(codes[:, 0].tolist())) == pytest.approx([-1, -1 / 3, 1 / 3, 1])
    assert sorted(set(codes[:, 1].tolist())) == pytest.approx([-1, 0, 1])


def test_quantized_latents_land_on_the_code_grid_and_are_symmetric():
    fsq = FSQ((2, 4, 5))
    z = torch.randn(1000, 3) * 3
    codes = fsq(z)
    assert torch.allclose(codes, fsq.ids_to_codes(fsq.codes_to_ids(codes)))
    # Even level counts split at 0 like odd ones: q(-z) = -q(z).
    assert torch.allclose(fsq(-z), -codes)
    assert torch.equal(fsq(torch.tensor([[0.1, 0.0, 0.0]]))[0, 0], torch.tensor(1.0))
    assert torch.equal(fsq(torch.tensor([[-0.1, 0.0, 0.0]]))[0, 0], torch.tensor(-1.0))


def test_all_levels_are_used_by_a_spread_of_latents():
    fsq = FSQ((8, 5))
    ids = fsq.codes_to_ids(fsq(torch.randn(20000, 2) * 2))
    assert torch.unique(ids).numel() == 40


def test_gradient_passes_straight_through_the_rounding():
    fsq = FSQ((8, 5, 5))
    z = torch.randn(64, 3, requires_grad=True)
    fsq(z).sum().backward()
    # Rounding counts as identity, so d(code)/dz is the tanh bound's derivative.
    assert torch.allclose(z.grad, 1 - torch.tanh(z.detach()) ** 2, atol=1e-6)
    assert (z.grad.abs() > 0).all()


def test_bf16_latents_give_float32_codes_on_the_grid():
    fsq = FSQ((8, 5, 5, 5))
    codes = fsq(torch.randn(100, 4).bfloat16())
    assert codes.dtype == torch.float32
    assert torch.equal(fsq.ids_to_codes(fsq.codes_to_ids(codes)), codes)


@pytest.mark.parametrize("levels", [(), (1,), (8, 1), (0, 4)])
def test_invalid_levels_are_rejected(levels):
    with pytest.raises(TinyWorldsError, match="level"):
        FSQ(levels)


def test_usage_and_perplexity():
    usage = id_usage(torch.tensor([[0, 0], [2, 3]]), 4)
    assert torch.equal(usage, torch.tensor([0.5, 0.0, 0.25, 0.25]))
    assert perplexity(torch.full((8,), 1 / 8)).item() == pytest.approx(8.0)
    assert perplexity(torch.tensor([1.0, 0, 0])).item() == pytest.approx(1.0)

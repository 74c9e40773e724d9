import math

import pytest
import torch

from tests.conftest import fit
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.models import MASK_SCHEDULES, DynamicsConfig, DynamicsModel
from tinyworlds.models.dynamics import uniform_noise

V, P, A = 32, 16, 4
TINY = dict(vocab_size=V, num_patches=P, num_actions=A, embed_dim=32, num_heads=2, num_blocks=2, max_frames=4)


def tiny_dynamics(**overrides) -> DynamicsModel:
    torch.manual_seed(0)
    return DynamicsModel(DynamicsConfig(**{**TINY, **overrides})).eval()


def random_clip(batch=4, frames=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, frames, P), generator=g), torch.randint(0, A, (batch, frames - 1), generator=g)


def test_logits_shape():
    tokens, actions = random_clip()
    assert tiny_dynamics()(tokens, actions).shape == (4, 4, P, V)


def test_logits_are_causal_in_time():
    model = tiny_dynamics()
    tokens, actions = random_clip()
    logits = model(tokens, actions)
    later_tokens = tokens.clone()
    later_tokens[:, 2] = (later_tokens[:, 2] + 1) % V
    assert torch.allclose(model(later_tokens, actions)[:, :2], logits[:, :2], atol=1e-5)
    later_action = actions.clone()
    later_action[:, 1] = (later_action[:, 1] + 1) % A  # the action into frame 2
    changed = model(tokens, later_action)
    assert torch.allclose(changed[:, :2], logits[:, :2], atol=1e-5)
    # conditioning acts from step one: frame 2's logits follow its action
    assert not torch.allclose(changed[:, 2], logits[:, 2], atol=1e-3)


def test_mask_count_is_exact_per_frame():
    model = tiny_dynamics(mask_ratio_min=0.5, mask_ratio_max=0.5)
    _, metrics = model.loss(*random_clip())
    # ceil(0.5 * 16) = 8 of the 16 tokens in each of frames 1..3; frame 0 is not counted
    assert metrics["mask_ratio"].item() == pytest.approx(0.5)
    _, metrics = tiny_dynamics(mask_ratio_min=0.01, mask_ratio_max=0.01).loss(*random_clip())
    assert metrics["mask_ratio"].item() == pytest.approx(1 / 16)  # at least one target per frame


def test_loss_ignores_frame_zero_and_unmasked_targets():
    model = tiny_dynamics(mask_ratio_min=1.0, mask_ratio_max=1.0, action_dropout=0.0)
    tokens, actions = random_clip()
    torch.manual_seed(0)
    loss, _ = model.loss(tokens, actions)
    # with everything masked, the loss is the mean CE of frames 1..3 given frame 0
    inputs = tokens.clone()
    inputs[:, 1:] = V
    logits = model(inputs, actions)[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_overfits_a_fixed_batch():
    model = tiny_dynamics().train()
    tokens, actions = random_clip()
    torch.manual_seed(0)
    first, _ = model.loss(tokens, actions)
    loss, metrics = fit(model, lambda: model.loss(tokens, actions), steps=120)
    assert loss.item() < first.item() / 10
    assert metrics["masked_accuracy"] > 0.9


def test_loss_backward_under_bf16_autocast():
    model = tiny_dynamics().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model.loss(*random_clip())
    loss.backward()
    assert torch.isfinite(loss) and 0 <= metrics["masked_accuracy"] <= 1
    assert model.action_embed.weight.grad.abs().sum() > 0


def test_compiled_loss_has_no_graph_breaks_and_matches_eager():
    # Full masking and no action dropout make the loss independent of the random draws, which
    # inductor makes with its own generator.
    model = tiny_dynamics(num_blocks=1, mask_ratio_min=1.0, action_dropout=0.0).train()
    tokens, actions = random_clip()
    eager, _ = model.loss(tokens, actions)
    compiled = torch.compile(model.loss, fullgraph=True)  # fullgraph: a host sync would fail here
    loss, _ = compiled(tokens, actions)
    loss.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=1e-4)
    assert model.head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# generation


def test_generate_gives_valid_tokens_and_leaves_the_context_alone():
    model = tiny_dynamics()
    context, context_actions = random_clip(batch=2, frames=2)
    kept = context.clone()
    new = model.generate(context, torch.randint(0, A, (2, 3)), context_actions=context_actions, steps=4)
    assert new.shape == (2, 3, P) and new.dtype == torch.long
    assert new.min() >= 0 and new.max() < V
    assert torch.equal(context, kept)


def test_generate_is_deterministic_per_seed():
    model = tiny_dynamics()
    context, _ = random_clip(batch=2, frames=2)
    actions = torch.randint(0, A, (2, 2))
    first = model.generate(context, actions, steps=4, seed=7)
    assert torch.equal(first, model.generate(context, actions, steps=4, seed=7))
    assert not torch.equal(first, model.generate(context, actions, steps=4, seed=8))


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_generation_equals_per_sample_generation(use_cache):
    model = tiny_dynamics()
    context, context_actions = random_clip(batch=3, frames=2)
    actions = torch.randint(0, A, (3, 2))
    seeds = torch.tensor([11, 5, 11])
    batched = model.generate(context, actions, context_actions=context_actions, steps=3, seed=seeds,
                             use_cache=use_cache)
    alone = torch.cat([
        model.generate(context[i:i + 1], actions[i:i + 1], context_actions=context_actions[i:i + 1], steps=3,
                       seed=int(seeds[i]), use_cache=use_cache)
        for i in range(3)
    ])
    assert torch.equal(batched, alone)
    # an int seed gives sample i the seed seed + i
    from_int = model.generate(context, actions, context_actions=context_actions, steps=3, seed=4)
    assert torch.equal(from_int[1:2], model.generate(context[1:2], actions[1:2], context_actions=context_actions[1:2],
                                                     steps=3, seed=5))


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
@pytest.mark.parametrize(("context_frames", "new_frames"), [(1, 3), (3, 1), (2, 5), (6, 2)])
def test_cached_generation_equals_the_uncached_reference(temperature, context_frames, new_frames):
    # Short contexts fill the window; (2, 5) and (6, 2) slide it, so the cache is rebuilt with
    # new time positions and a null action on the window's first frame.
    model = tiny_dynamics(num_blocks=3)
    context, context_actions = random_clip(batch=3, frames=context_frames, seed=context_frames)
    actions = torch.randint(0, A + 1, (3, new_frames), generator=torch.Generator().manual_seed(1))  # A: unknown
    for schedule in ("cosine", "exponential"):
        kwargs = dict(context_actions=context_actions, steps=5, schedule=schedule, temperature=temperature, seed=3)
        cached = model.generate(context, actions, **kwargs)
        assert torch.equal(cached, model.generate(context, actions, use_cache=False, **kwargs))


@torch.inference_mode()
def first_generate(model, context, actions, *, steps, temperature, seed, schedule="cosine"):
    """generate() as first written, kept as an oracle: the whole window re-run at every MaskGIT
    step and every position scored (the cache, and scoring only masked positions, must not
    change a single token). Context actions unknown."""
    b, _, p = context.shape
    seeds = seed + torch.arange(b)
    tokens, past = context, torch.full((b, context.shape[1] - 1), A)
    for n in range(actions.shape[1]):
        past = torch.cat([past, actions[:, n:n + 1]], dim=1)
        known = tokens[:, -(model.config.max_frames - 1):]
        frame = torch.full((b, p), V)
        for step in range(steps):
            window = torch.cat([known, frame[:, None]], dim=1)
            logits = model.head(model.features(window, past[:, -known.shape[1]:])[:, -1])
            if temperature == 0:
                probs = logits.softmax(-1)
                sampled = probs.argmax(-1)
            else:
                probs = (logits / temperature).softmax(-1)
                cdf = probs.cumsum(-1)
                u = uniform_noise(seeds, n, step, p) * cdf[..., -1]
                sampled = torch.searchsorted(cdf, u[..., None])[..., 0].clamp_max(V - 1)
            confidence = probs.gather(-1, sampled[..., None])[..., 0]
            sampled = torch.where(frame != V, frame, sampled)
            confidence = torch.where(frame != V, 2.0, confidence)
            keep_count = p - math.floor(p * MASK_SCHEDULES[schedule]((step + 1) / steps))
            order = confidence.argsort(dim=-1, descending=True, stable=True)
            keep = torch.zeros_like(frame, dtype=torch.bool).scatter_(-1, order[:, :keep_count], True)
            frame = torch.where(keep, sampled, V)
        tokens = torch.cat([tokens, frame[:, None]], dim=1)
    return tokens[:, context.shape[1]:]


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_generation_equals_the_first_implementation(temperature):
    model = tiny_dynamics(num_blocks=3)
    context, _ = random_clip(batch=3, frames=2, seed=4)
    actions = torch.randint(0, A, (3, 4), generator=torch.Generator().manual_seed(2))  # slides the window
    for schedule in ("cosine", "linear"):
        oracle = first_generate(model, context, actions, steps=6, temperature=temperature, seed=9, schedule=schedule)
        for use_cache in (True, False):
            new = model.generate(context, actions, steps=6, temperature=temperature, seed=9, schedule=schedule,
                                 use_cache=use_cache)
            assert torch.equal(new, oracle)


def test_cached_generation_equals_the_reference_for_a_trained_model():
    # A trained model is confident: ties and near-ties in the confidence ranking are where a
    # rounding difference between the two paths would show.
    model = tiny_dynamics().train()
    tokens, actions = random_clip(batch=4, frames=4)
    fit(model, lambda: model.loss(tokens, actions), steps=60)
    model.eval()
    for temperature in (0.0, 1.0):
        kwargs = dict(context_actions=actions[:, :1], steps=4, temperature=temperature, seed=0)
        cached = model.generate(tokens[:, :2], actions[:, 1:], **kwargs)
        assert torch.equal(cached, model.generate(tokens[:, :2], actions[:, 1:], use_cache=False, **kwargs))


def test_cached_transformer_step_equals_the_last_frame_of_the_full_forward():
    model = tiny_dynamics()
    tokens, actions = random_clip(batch=2, frames=4)
    x, cond = model.token_embed(tokens), model.conditions(actions)  # [B, T, P, E], [B, T, E]
    full = model.transformer(x, cond)  # [B, T, P, E]
    prefix, cache = model.transformer.forward_cached(x[:, :3], cond[:, :3])
    assert torch.allclose(prefix, full[:, :3], atol=1e-5)
    assert len(cache) == 2 and cache[0][0].shape == (2 * P, 3, 32)  # [B*P, T, E] per block
    last, _ = model.transformer.forward_cached(x[:, 3:], cond[:, 3:], past=cache)
    assert torch.allclose(last, full[:, 3:], atol=1e-5)
    # the cache holds frames 0..2 only: a step from a shorter prefix is a different frame
    short, short_cache = model.transformer.forward_cached(x[:, :2], cond[:, :2])
    step, _ = model.transformer.forward_cached(x[:, 2:3], cond[:, 2:3], past=short_cache)
    assert torch.allclose(step, full[:, 2:3], atol=1e-5)


def test_cache_extends_by_one_frame_within_max_frames():
    model = tiny_dynamics()  # max_frames 4
    tokens, actions = random_clip(batch=1, frames=4)
    x, cond = model.token_embed(tokens), model.conditions(actions)
    _, cache = model.transformer.forward_cached(x[:, :2], cond[:, :2])
    with pytest.raises(TinyWorldsError, match="exactly one frame"):
        model.transformer.forward_cached(x[:, 2:], cond[:, 2:], past=cache)
    _, full_cache = model.transformer.forward_cached(x, cond)
    with pytest.raises(TinyWorldsError, match="max_frames=4"):
        model.transformer.forward_cached(x[:, :1], cond[:, :1], past=full_cache)


def test_cached_generation_runs_under_bf16_autocast():
    model = tiny_dynamics()
    context, _ = random_clip(batch=2, frames=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = model.generate(context, torch.zeros(2, 2, dtype=torch.long), steps=3)
    assert new.shape == (2, 2, P) and new.min() >= 0 and new.max() < V


@pytest.mark.parametrize("schedule", sorted(MASK_SCHEDULES))
def test_every_schedule_unmasks_the_whole_frame(schedule):
    model = tiny_dynamics()
    assert MASK_SCHEDULES[schedule](1.0) == pytest.approx(0.0, abs=1e-9)
    context, _ = random_clip(batch=2, frames=1)
    for steps in (1, 5):
        new = model.generate(context, torch.zeros(2, 2, dtype=torch.long), steps=steps, schedule=schedule)
        assert new.shape == (2, 2, P) and new.max() < V


def test_short_context_and_rollouts_past_the_window():
    model = tiny_dynamics()  # max_frames 4
    context, _ = random_clip(batch=2, frames=1)
    new = model.generate(context, torch.randint(0, A, (2, 6)), steps=2)
    assert new.shape == (2, 6, P) and new.max() < V
    long_context, long_actions = random_clip(batch=1, frames=6)
    assert model.generate(long_context, torch.zeros(1, 1, dtype=torch.long), context_actions=long_actions,
                          steps=2).shape == (1, 1, P)


def test_greedy_generation_ignores_the_seed():
    model = tiny_dynamics()
    context, _ = random_clip(batch=2, frames=2)
    actions = torch.randint(0, A, (2, 2))
    greedy = model.generate(context, actions, temperature=0, seed=1)
    assert torch.equal(greedy, model.generate(context, actions, temperature=0, seed=2))


def test_generation_follows_the_model():
    model = tiny_dynamics()
    with torch.no_grad():  # make the model certain of token 3 everywhere
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[3] = 50.0
    context, _ = random_clip(batch=2, frames=1)
    assert (model.generate(context, torch.zeros(2, 2, dtype=torch.long), steps=3) == 3).all()


def test_noise_is_uniform_and_depends_on_each_key():
    seeds = torch.tensor([0, 1, 2**40 + 3, -5])
    u = uniform_noise(seeds, 0, 0, 4096)
    assert u.shape == (4, 4096) and 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.02
    assert torch.unique(u).numel() > 4 * 4096 * 0.99
    assert not torch.equal(uniform_noise(seeds, 1, 0, 8), uniform_noise(seeds, 0, 1, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "halton"}, "schedule='halton'"),
        ({"steps": 0}, "steps=0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"seed": torch.tensor([1, 2, 3])}, "seed tensor"),
        ({"context_actions": torch.zeros(2, 5, dtype=torch.long)}, "context_actions has shape"),
    ],
)
def test_generate_argument_errors(kwargs, message):
    context, _ = random_clip(batch=2, frames=2)
    with pytest.raises(TinyWorldsError, match=message):
        tiny_dynamics().generate(context, torch.zeros(2, 1, dtype=torch.long), **kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_patches": 15}, "DynamicsConfig.num_patches=15: must be a square number"),
        ({"mask_ratio_min": 0.0}, "DynamicsConfig.mask_ratio_min=0.0: must be in (0.0, 1.0]"),
        ({"mask_ratio_min": 0.8, "mask_ratio_max": 0.6},
         "DynamicsConfig.mask_ratio_max=0.6: must be >= mask_ratio_min"),
        ({"vocab_size": 1}, "DynamicsConfig.vocab_size=1"),
        ({"max_frames": 1}, "DynamicsConfig.max_frames=1"),
        ({"action_dropout": 1.0}, "DynamicsConfig.action_dropout=1.0"),
        ({"num_heads": 5}, "DynamicsConfig.num_heads=5"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(TinyWorldsError) as err:
        DynamicsConfig(**{**TINY, **overrides})
    assert str(err.value).startswith(message)


def test_tokens_that_change_weigh_change_weight():
    torch.manual_seed(0)
    tokens = torch.randint(0, V, (2, 3, P))
    tokens[:, 1:, : P // 2] = tokens[:, :1, : P // 2]  # half the patches never change
    actions = torch.randint(0, A, (2, 2))
    plain, heavy = (DynamicsModel(DynamicsConfig(**TINY, change_weight=w, mask_ratio_min=1.0)) for w in (1.0, 9.0))
    heavy.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    plain_loss, metrics = plain.loss(tokens, actions)
    torch.manual_seed(1)
    heavy_loss, _ = heavy.loss(tokens, actions)
    # Every token masked (mask ratio 1): the plain loss is the mean CE, the heavy one leans on
    # the changing half, so the two differ, and changed_accuracy reports that half alone.
    assert not torch.isclose(plain_loss, heavy_loss) and 0 <= metrics["changed_accuracy"] <= 1
    with pytest.raises(TinyWorldsError, match="change_weight"):
        DynamicsConfig(**TINY, change_weight=0.5)


# ---------------------------------------------------------------------------------------------
# copy logit


def with_copy_bias(model: DynamicsModel, bias: float, seed: int = 5) -> DynamicsModel:
    """The model's copy head given random weights and `bias`, as training would leave it."""
    with torch.no_grad():
        model.copy_head.weight.copy_(torch.randn(model.copy_head.weight.shape, generator=torch.Generator().manual_seed(seed)))
        model.copy_head.bias.fill_(bias)
    return model


def test_copy_logit_starts_as_the_plain_model():
    tokens, actions = random_clip()
    plain, copying = tiny_dynamics(), tiny_dynamics(copy_logit=True)
    assert torch.equal(plain(tokens, actions), copying(tokens, actions))


def test_copy_logit_goes_to_the_token_one_frame_earlier():
    model = with_copy_bias(tiny_dynamics(copy_logit=True), 0.0)
    tokens, actions = random_clip()
    tokens[0, 1, 0] = V  # a masked token points nowhere
    features = model.features(tokens, actions)  # [B, T, P, E]
    raised = model(tokens, actions) - model.head(features)  # [B, T, P, V]: the copy logits alone
    copy = model.copy_head(features)[..., 0]  # [B, T, P]
    assert torch.equal(raised[:, 0], torch.zeros_like(raised[:, 0]))  # nothing before frame 0
    assert torch.equal(raised[0, 2, 0], torch.zeros(V))  # after the masked token
    for b, t, p in [(0, 1, 3), (2, 3, 7), (3, 2, 15)]:
        expected = torch.zeros(V)
        expected[tokens[b, t - 1, p]] = copy[b, t, p]
        assert torch.allclose(raised[b, t, p], expected, atol=1e-5)


def test_a_confident_copy_logit_generates_the_frame_before():
    model = with_copy_bias(tiny_dynamics(copy_logit=True), 60.0)
    context, context_actions = random_clip(batch=3, frames=2)
    new = model.generate(context, torch.zeros(3, 3, dtype=torch.long), context_actions=context_actions, steps=4)
    for n in range(3):
        assert torch.equal(new[:, n], context[:, -1])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_keep_bias_tilts_generation_towards_the_frame_before(temperature):
    model = tiny_dynamics(change_weight=4)
    assert model.calibrated_keep_bias() == pytest.approx(math.log(4))
    context, context_actions = random_clip(batch=3, frames=2, seed=2)
    actions = torch.randint(0, A, (3, 3), generator=torch.Generator().manual_seed(3))
    kwargs = dict(context_actions=context_actions, steps=4, temperature=temperature, seed=1)

    def kept(keep_bias):  # patches whose token equals the frame before's, over 3 frames
        new = model.generate(context, actions, keep_bias=keep_bias, **kwargs)  # [B, N, P]
        return int((new == torch.cat([context[:, -1:], new[:, :-1]], dim=1)).sum())

    as_trained, calibrated, certain = kept(0.0), kept(model.calibrated_keep_bias()), kept(60.0)
    assert as_trained < calibrated < certain == 3 * 3 * P
    cached = model.generate(context, actions, keep_bias=1.5, **kwargs)
    assert torch.equal(cached, model.generate(context, actions, keep_bias=1.5, use_cache=False, **kwargs))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_with_the_copy_logit_equals_the_uncached_reference(temperature):
    model = with_copy_bias(tiny_dynamics(copy_logit=True, num_blocks=3), 1.5)
    context, context_actions = random_clip(batch=3, frames=2, seed=6)
    actions = torch.randint(0, A, (3, 4), generator=torch.Generator().manual_seed(7))  # slides the window
    kwargs = dict(context_actions=context_actions, steps=5, temperature=temperature, seed=3)
    cached = model.generate(context, actions, **kwargs)
    assert torch.equal(cached, model.generate(context, actions, use_cache=False, **kwargs))


def test_the_copy_head_learns():
    model = tiny_dynamics(copy_logit=True, mask_ratio_min=1.0).train()
    tokens, actions = random_clip()
    tokens[:, 1:] = tokens[:, :1]  # nothing changes: copying is right everywhere
    loss, _ = model.loss(tokens, actions)
    loss.backward()
    # Zero at the start, the copy logit is pushed up (its gradient on the bias is negative).
    assert model.copy_head.bias.grad.item() < 0 and model.copy_head.weight.grad.abs().sum() > 0
    with pytest.raises(TinyWorldsError, match="copy_logit"):
        DynamicsConfig(**TINY, copy_logit="yes")

import json

import pytest
import torch

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.models import (
    DynamicsConfig,
    DynamicsModel,
    LatentActionConfig,
    LatentActionModel,
    TokenizerConfig,
    VideoTokenizer,
    count_parameters,
    load_model,
    save_model,
)

FRAMES = dict(frame_size=16, patch_size=4, embed_dim=32, num_heads=2, encoder_blocks=1, decoder_blocks=1, max_frames=4)


def tokenizer():
    torch.manual_seed(0)
    return VideoTokenizer(TokenizerConfig(**FRAMES, levels=(4, 4)))


def dynamics():
    torch.manual_seed(0)
    return DynamicsModel(DynamicsConfig(vocab_size=16, num_patches=16, num_actions=4, embed_dim=32, num_heads=2,
                                        num_blocks=1, max_frames=4))


def frames():
    return torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_tokenizer_round_trip(tmp_path):
    model = tokenizer()
    save_model(model, tmp_path / "tok")
    loaded = load_model(tmp_path / "tok")
    assert isinstance(loaded, VideoTokenizer) and not loaded.training
    assert loaded.config == model.config
    tokens = model.encode(frames())
    assert torch.equal(loaded.encode(frames()), tokens)
    assert torch.equal(loaded.decode(tokens), model.decode(tokens))
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert meta["kind"] == "tokenizer"
    assert meta["parameters"] == count_parameters(model) > 0
    assert meta["config"]["levels"] == [4, 4]
    assert meta["tinyworlds_version"]


def test_latent_action_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LatentActionModel(LatentActionConfig(**FRAMES, levels=(2, 2, 2)))
    save_model(model, tmp_path / "lam")
    loaded = load_model(tmp_path / "lam")
    assert isinstance(loaded, LatentActionModel)
    assert torch.equal(loaded.latents(frames()), model.latents(frames()))
    assert torch.equal(loaded.infer(frames()), model.infer(frames()))


def test_a_lam_saved_before_pair_encoding_existed_loads_as_the_sequence_encoder_it_was(tmp_path):
    torch.manual_seed(0)
    model = LatentActionModel(LatentActionConfig(**FRAMES, levels=(2, 2, 2), pair_encoding="sequence"))
    save_model(model, tmp_path / "lam")
    meta_path = tmp_path / "lam" / "config.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["pair_encoding"]  # as 0.2 wrote it
    meta_path.write_text(json.dumps(meta))
    loaded = load_model(tmp_path / "lam")
    assert loaded.config.pair_encoding == "sequence"
    assert torch.equal(loaded.infer(frames()), model.infer(frames()))


def test_dynamics_round_trip_and_overwrite(tmp_path):
    model = dynamics()
    save_model(model, tmp_path / "dyn")
    save_model(model, tmp_path / "dyn")  # replaces the old directory
    loaded = load_model(tmp_path / "dyn", device=torch.device("cpu"))
    tokens = torch.randint(0, 16, (2, 3, 16))
    actions = torch.randint(0, 4, (2, 2))
    assert torch.equal(loaded(tokens, actions), model.eval()(tokens, actions))
    assert torch.equal(loaded.generate(tokens, actions), model.generate(tokens, actions))
    assert sorted(p.name for p in (tmp_path / "dyn").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dyn"]  # no temporaries left


def test_compiled_model_saves_without_wrapper_prefixes(tmp_path):
    model = dynamics()
    save_model(torch.compile(model), tmp_path / "dyn")
    loaded = load_model(tmp_path / "dyn")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_unknown_model_type_is_refused(tmp_path):
    with pytest.raises(TinyWorldsError, match="cannot save a Linear"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.fixture
def saved(tmp_path):
    save_model(tokenizer(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_config(directory, change):
    meta = json.loads((directory / "config.json").read_text())
    change(meta)
    (directory / "config.json").write_text(json.dumps(meta))


def test_missing_directory(tmp_path):
    with pytest.raises(TinyWorldsError, match="no such checkpoint directory"):
        load_model(tmp_path / "nope")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(TinyWorldsError, match="missing config.json"):
        load_model(saved)


def test_corrupt_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(TinyWorldsError, match="unreadable JSON"):
        load_model(saved)
    (saved / "config.json").write_text("[1, 2]")
    with pytest.raises(TinyWorldsError, match="expected an object"):
        load_model(saved)


def test_unknown_kind(saved):
    edit_config(saved, lambda meta: meta.update(kind="vae"))
    with pytest.raises(TinyWorldsError, match="unknown kind 'vae'"):
        load_model(saved)


def test_config_with_unknown_or_invalid_fields(saved):
    edit_config(saved, lambda meta: meta["config"].update(colour=True))
    with pytest.raises(TinyWorldsError, match="does not fit TokenizerConfig"):
        load_model(saved)
    edit_config(saved, lambda meta: (meta["config"].pop("colour"), meta["config"].update(patch_size=5)))
    with pytest.raises(TinyWorldsError, match=r"config.json: TokenizerConfig.patch_size=5"):
        load_model(saved)


def test_missing_or_corrupt_weights(saved):
    (saved / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(TinyWorldsError, match="unreadable safetensors"):
        load_model(saved)
    (saved / "model.safetensors").unlink()
    with pytest.raises(TinyWorldsError, match="missing model.safetensors"):
        load_model(saved)


def test_weights_that_do_not_match_the_config(saved):
    edit_config(saved, lambda meta: meta["config"].update(embed_dim=64))
    with pytest.raises(TinyWorldsError) as err:
        load_model(saved)
    assert str(saved) in str(err.value)
    assert "tensor 'patch_embed.weight' has shape (32, 48), expected (64, 48)" in str(err.value)
    edit_config(saved, lambda meta: meta["config"].update(embed_dim=32, encoder_blocks=2))
    with pytest.raises(TinyWorldsError, match="tensor 'encoder.blocks.1.norm_space.weight' is missing"):
        load_model(saved)
    edit_config(saved, lambda meta: meta["config"].update(encoder_blocks=1, decoder_blocks=0))
    with pytest.raises(TinyWorldsError, match="decoder_blocks=0"):
        load_model(saved)


def test_weights_with_an_extra_tensor(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(saved / "model.safetensors")
    save_file({**state, "stray.weight": torch.zeros(2)}, saved / "model.safetensors")
    with pytest.raises(TinyWorldsError, match="unexpected tensor 'stray.weight'"):
        load_model(saved)

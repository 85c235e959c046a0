"""The model zoo: every entry builds (fake without storage, small ones for real) and load_model."""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import torch

import tierplan
from tierplan.models.tiny_transformer import TinyTransformerConfig
from tierplan.zoo import ZOO, TransformersConfig, ZooError, list_models, load_model, with_layers

EXPECTED = [
    "mlp", "cnn", "tiny-transformer", "gpt2", "gpt2-medium", "gpt2-large", "llama-7b",
    "llama-13b", "llama-70b", "gpt3-13b", "gpt3-175b", "opt-30b", "opt-66b", "opt-175b", "bert-base", "bert-large",
    "gpt2-tiny", "llama-tiny", "opt-tiny", "bert-tiny",
]
SMALL = ["mlp", "cnn", "tiny-transformer", "gpt2-tiny", "llama-tiny", "opt-tiny", "bert-tiny"]
# Parameter counts of the published shapes (tied embeddings counted once).
PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-70b": 68_976_648_192,
    # 12 L h^2 + 13 L h + (V + 2048) h + 2 h, GPT-2 layout with GPT-3 shapes
    "gpt3-13b": 12 * 40 * 5120**2 + 13 * 40 * 5120 + (50257 + 2048) * 5120 + 2 * 5120,
    "gpt3-175b": 12 * 96 * 12288**2 + 13 * 96 * 12288 + (50257 + 2048) * 12288 + 2 * 12288,
    # 12 L h^2 + 13 L h + (V + 2048 + 2) h + 2 h: OPT's positions are offset by 2, its head tied
    "opt-30b": 12 * 48 * 7168**2 + 13 * 48 * 7168 + (50272 + 2050) * 7168 + 2 * 7168,
    "opt-66b": 12 * 64 * 9216**2 + 13 * 64 * 9216 + (50272 + 2050) * 9216 + 2 * 9216,
    "opt-175b": 12 * 96 * 12288**2 + 13 * 96 * 12288 + (50272 + 2050) * 12288 + 2 * 12288,
}


def test_all_models_are_listed_with_descriptions():
    assert list_models() == EXPECTED
    for entry in ZOO.values():
        assert entry.description and entry.batch_size >= 1 and entry.seq_len >= 1


@pytest.mark.parametrize("name", EXPECTED)
def test_fake_build_allocates_nothing(name):
    model, args, kwargs = load_model(name, training=True, fake=True)
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
    assert all(t.device.type == "meta" for t in tensors)
    assert model.training
    if name in PARAMS:
        assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", SMALL)
def test_small_models_run_for_real(name):
    model, args, kwargs = load_model(name, training=True)
    loss = model(*args, **kwargs)
    loss = loss if isinstance(loss, torch.Tensor) else loss.loss
    assert loss.shape == () and torch.isfinite(loss)
    model, args, kwargs = load_model(name, training=False)
    assert not model.training and "labels" not in kwargs
    with torch.no_grad():
        out = model(*args, **kwargs)
    assert out is not None


def test_entries_hold_their_config_as_data():
    """The config is a field of the entry, not a factory's closure: readable without building."""
    llama = ZOO["llama-70b"].config
    assert isinstance(llama, TransformersConfig) and llama.dtype == torch.bfloat16
    assert (llama.fields["num_hidden_layers"], llama.fields["num_key_value_heads"]) == (80, 8)
    assert ZOO["tiny-transformer"].config == TinyTransformerConfig()
    assert dataclasses.asdict(ZOO["mlp"].config)["hidden"] == 1024
    # No module reads a function's closure to find a config.
    package = Path(tierplan.__file__).parent
    assert not [p for p in package.rglob("*.py") if "getclosurevars" in p.read_text()]


def test_build_with_fewer_layers():
    model, _, _ = ZOO["tiny-transformer"].build(1, 16, fake=True, layers=1)
    assert len(model.blocks) == 1
    with pytest.raises(ZooError, match="no repeated layers"):
        ZOO["mlp"].build(fake=True, layers=2)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny", "llama-70b"])
def test_build_transformers_with_fewer_layers(name):
    pytest.importorskip("transformers")
    entry = ZOO[name]
    model, _, kwargs = entry.build(1, 16, fake=True, layers=1)
    assert model.config.num_hidden_layers == 1 and "labels" in kwargs
    assert entry.model_config().num_hidden_layers > 1  # the entry is unchanged


def test_with_layers_copies_the_config():
    cfg = TinyTransformerConfig(n_layer=6)
    assert with_layers(cfg, 2).n_layer == 2 and cfg.n_layer == 6
    with pytest.raises(ZooError, match="no layer count"):
        with_layers(ZOO["cnn"].config, 2)


def test_batch_and_sequence_sizes_are_honoured():
    model, args, kwargs = load_model("gpt2-tiny", batch_size=3, seq_len=17, training=True, fake=True)
    assert kwargs["input_ids"].shape == (3, 17) and kwargs["labels"].shape == (3, 17)
    assert kwargs["labels"] is not kwargs["input_ids"]
    _, (x,), _ = load_model("mlp", batch_size=5, training=False)
    assert x.shape == (5, 784)
    with pytest.raises(ZooError, match="exceeds"):
        load_model("gpt2-tiny", seq_len=4096, fake=True)


def test_real_builds_are_deterministic():
    a, _, _ = load_model("mlp")
    b, _, _ = load_model("mlp")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ZooError) as err:
        load_model("gpt5")
    assert "gpt5" in str(err.value) and "llama-70b" in str(err.value) and "file.py:factory" in str(err.value)


def _write(tmp_path, body: str):
    path = tmp_path / "user_model.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_file_factory_with_two_and_three_results(tmp_path):
    path = _write(tmp_path, """
        import torch

        def two():
            return torch.nn.Linear(3, 2), torch.randn(4, 3)

        def three(batch_size=2, training=True):
            model = torch.nn.Linear(3, 2)
            return model, (torch.randn(batch_size, 3),), {}
    """)
    model, args, kwargs = load_model(f"{path}:two")
    assert isinstance(model, torch.nn.Linear) and args[0].shape == (4, 3) and kwargs == {}
    model, args, kwargs = load_model(f"{path}:three", batch_size=7)
    assert args[0].shape == (7, 3)


def test_file_errors(tmp_path):
    with pytest.raises(ZooError, match="does not exist"):
        load_model(f"{tmp_path}/missing.py:make")
    path = _write(tmp_path, """
        def make_model():
            return 3
    """)
    with pytest.raises(ZooError, match="no function 'build'.*make_model"):
        load_model(f"{path}:build")
    with pytest.raises(ZooError, match="must return"):
        load_model(f"{path}:make_model")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ZooError, match="boom"):
        load_model(f"{broken}:make")


def test_factory_errors_name_the_factory_and_line(tmp_path):
    from tierplan.zoo import UserCodeError

    path = _write(tmp_path, """
        def make():
            raise ValueError("bad size")
    """)
    with pytest.raises(UserCodeError) as err:
        load_model(f"{path}:make")
    assert err.value.location == f"{path}:3 (in make)"
    assert f"{path}:make: the factory raised ValueError: bad size at {path}:3" in str(err.value)
    assert isinstance(err.value.__cause__, ValueError)


def test_import_errors_name_the_line(tmp_path):
    from tierplan.zoo import UserCodeError

    broken = tmp_path / "broken_at_import.py"
    broken.write_text("import torch\n\nraise RuntimeError('boom')\n")
    with pytest.raises(UserCodeError, match=r"importing .* raised RuntimeError: boom at .*broken_at_import.py:3"):
        load_model(f"{broken}:make")


def test_tierplan_errors_under_a_factory_are_not_blamed_on_it(tmp_path):
    from tierplan.zoo import UserCodeError

    path = _write(tmp_path, """
        from tierplan.zoo import with_layers

        def make():
            return with_layers(object(), 2)
    """)
    with pytest.raises(ZooError, match="no layer count") as err:
        load_model(f"{path}:make")
    assert not isinstance(err.value, UserCodeError)

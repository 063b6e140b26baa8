from __future__ import annotations

import json

import pytest

from ellava_lib import cli


def _inspect(capsys, *args) -> dict:
    assert cli.main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_7b_on_meta_device(capsys):
    info = _inspect(capsys, "--model", "llava-1.5-7b", "--meta")
    assert info["n_units"] == 64 and len(info["units"]) == 64
    assert info["units"][0] == {"name": "lm.0.attn", "params": 4 * 4096 * 4096}
    assert info["params_total"] == sum(info["params_by_component"].values()) == 7_063_427_072
    with_vision = _inspect(capsys, "--model", "llava-1.5-7b", "--meta", "--vision")
    assert with_vision["n_units"] == 64 + 48


def test_inspect_tiny_folder(capsys, micro_model_dir):
    info = _inspect(capsys, "--model", str(micro_model_dir))
    assert info["n_units"] == 2 * 2  # micro: 2 decoder blocks x (attn, mlp)
    assert set(info["params_by_component"]) == {"vision", "projector", "language_model"}


def test_inspect_7b_without_meta_is_refused(capsys):
    assert cli.main(["inspect", "--model", "llava-1.5-7b"]) == 2
    assert "--meta" in capsys.readouterr().err


@pytest.fixture
def never_trains(monkeypatch, tmp_path):
    """No cached build (an empty ``ELLAVA_CACHE``) and every way to train or materialize a model raises."""
    from ellava_lib.model import shipped, specs, train

    def refuse(*args, **kwargs):
        raise AssertionError("inspect trained (or built) a model")

    monkeypatch.setenv("ELLAVA_CACHE", str(tmp_path / "cache"))
    for module, name in ((train, "train"), (specs, "train"), (specs, "build_or_load"), (shipped, "materialize")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("meta", [["--meta"], []])
def test_inspect_smol_reads_the_recipe_config_and_never_trains(capsys, never_trains, meta):
    info = _inspect(capsys, "--model", "smol", *meta)
    # SmolLM2: 30 layers, hidden 576, MLP 1536, 9 query heads and 3 key/value heads of width 64, vocabulary
    # 49152 + <image>, tied output head; the tiny tier's CLIP tower (hidden 96, 2 layers, MLP 192, 3x3 patches)
    assert info["n_units"] == 60 and info["units"][-1]["name"] == "lm.29.mlp"
    assert info["units"][0] == {"name": "lm.0.attn", "params": 884_736}  # 2 x 576x576 + 2 x 192x576
    assert info["units"][1] == {"name": "lm.0.mlp", "params": 2_654_208}  # 3 x 576x1536
    assert info["params_by_component"] == {
        "vision": 224_736,  # embeddings 74,784 + 2 layers x 74,784 + 2 layer norms x 192
        "projector": 388_224,  # 96x576 + 576 + 576x576 + 576
        "language_model": 134_515_584,  # embeddings 49153x576 + 30 x 3,540,096 + final norm 576 (head tied)
    }
    assert info["params_total"] == 135_128_544


def test_inspect_tiny_meta_reads_the_recipe_config_and_never_trains(capsys, never_trains):
    info = _inspect(capsys, "--model", "tiny", "--meta")
    # the tiny Llama: 6 layers, hidden 128, MLP 352, 4 heads, vocabulary 250, untied head
    assert info["n_units"] == 12
    assert info["units"][:2] == [{"name": "lm.0.attn", "params": 65_536}, {"name": "lm.0.mlp", "params": 135_168}]
    assert info["params_by_component"] == {"vision": 224_736, "projector": 28_928, "language_model": 1_269_888}

from __future__ import annotations

import json

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

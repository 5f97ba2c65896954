"""`--model` takes a GGUF file as well as a folder: the first use converts it into the cache, later ones find the
folder; `tandem convert` writes the same folder where it is asked to. Both give the embedded model's weights."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from cluster.cli import main
from workers.engine.errors import ModelNotFoundError
from workers.engine.model_store import embedded_gguf_path, resolve_model

pytestmark = pytest.mark.slow  # each conversion de-quantizes the embedded model's 272 tensors


def assert_same_model(folder, reference):
    assert json.loads((folder / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    assert (folder / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
    weights, expected = load_file(folder / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    assert all(weights[name].equal(expected[name]) for name in expected)


def test_a_gguf_file_is_converted_once_into_the_cache(tmp_path, smollm2_path):
    gguf = tmp_path / "my-model.gguf"
    shutil.copy(embedded_gguf_path(), gguf)
    folder = resolve_model(str(gguf), tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" / "models" and folder.name.startswith("my-model-")
    assert_same_model(folder, smollm2_path)
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(gguf), tmp_path / "cache") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == written  # found, not converted again


def test_tandem_convert_writes_the_folder_and_refuses_to_overwrite(tmp_path, smollm2_path, capsys):
    out = tmp_path / "smollm2-hf"
    assert main(["convert", "smollm2", str(out)]) == 0
    assert f"--model {out}" in capsys.readouterr().out
    assert_same_model(out, smollm2_path)
    assert resolve_model(str(out)) == out
    assert main(["convert", "smollm2", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "other")]) == 2
    assert "not a .gguf file" in capsys.readouterr().err


def test_a_path_that_is_neither_folder_nor_gguf_says_what_it_takes(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"nor a \.gguf file.*weights\.bin is not a directory"):
        resolve_model(str(tmp_path / "weights.bin"))

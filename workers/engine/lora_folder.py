"""A LoRA adapter's folder as PEFT saves it, read without torch: what its config asks for and where its weights
are, refused with the reason where Tandem would run it otherwise. `tandem serve` reads every adapter's folder this
way before anything starts, so a wrong path fails in a second rather than after the worker groups' start."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from workers.engine.errors import LoRAError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    scaling: float  # lora_alpha / rank, or lora_alpha / sqrt(rank) with use_rslora

    @staticmethod
    def read(name: str, folder: Path) -> "AdapterConfig":
        """The parts of PEFT's LoraConfig that change the arithmetic; an option Tandem does not implement is
        refused rather than silently run another way."""
        path = folder / CONFIG_FILE
        try:
            config = json.loads(path.read_text())
        except OSError as e:
            raise LoRAError(f"LoRA adapter {name!r}: cannot read {path}: {e.strerror} (an adapter is a PEFT folder "
                            f"holding {CONFIG_FILE} and {WEIGHTS_FILE})") from None
        except json.JSONDecodeError as e:
            raise LoRAError(f"LoRA adapter {name!r}: {path} is not JSON: {e}") from None
        if config.get("peft_type", "LORA") != "LORA":
            raise LoRAError(f"LoRA adapter {name!r}: peft_type is {config['peft_type']!r}; only LORA adapters run")
        unsupported = {"fan_in_fan_out": False, "use_dora": False, "bias": "none", "modules_to_save": None,
                       "rank_pattern": {}, "alpha_pattern": {}}
        for key, plain in unsupported.items():
            if config.get(key) not in (plain, None):
                raise LoRAError(f"LoRA adapter {name!r}: {key}={config[key]!r} is not supported (only {plain!r})")
        rank, alpha = config.get("r"), config.get("lora_alpha")
        if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
            raise LoRAError(f"LoRA adapter {name!r}: r must be a positive integer and lora_alpha a number (got "
                            f"{rank!r} and {alpha!r})")
        return AdapterConfig(rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank))


def read_folder(name: str, folder: Path | str) -> tuple[AdapterConfig, Path]:
    """The adapter's config and its weights file."""
    folder = Path(folder).expanduser()
    config = AdapterConfig.read(name, folder)
    path = folder / WEIGHTS_FILE
    if (folder / "adapter_model.bin").is_file() and not path.is_file():
        raise LoRAError(f"LoRA adapter {name!r}: {folder} holds adapter_model.bin, a pickle, which is not loaded "
                        f"(unpickling runs whatever it holds): save the adapter as {WEIGHTS_FILE} (PEFT's "
                        f"default, safe_serialization=True)")
    if not path.is_file():
        raise LoRAError(f"LoRA adapter {name!r}: {path} not found (an adapter is a PEFT folder holding "
                        f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    return config, path

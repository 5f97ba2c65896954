"""LoRA adapters a group loads as requests name them, for a cluster that loads adapters while it runs.

Such a cluster (router/lora_registry.py) hands each request its adapter's folder with its name
(SamplingParams.lora_path), so a group never has to be told of a load: the first request naming an adapter here
loads it, between steps, as Ray Serve LLM's replicas load adapters on demand. A group keeps at most `max_loras` of
them; past that, the one that has gone unused longest and that no request is running is dropped, and read again
from its folder if a request names it later. The adapters a group starts with (lora_modules) or is given
(LLM.add_lora) are never dropped.

A name is its weights' for good (the cluster gives each load of an adapter a name of its own), so a dropped
adapter read again has the weights it had, and the KV blocks cached under its name stay right.
"""

import logging
from collections import OrderedDict
from collections.abc import Callable

from workers.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class AdapterCache:
    def __init__(self, runner: ModelRunner, max_loras: int):
        self.runner = runner
        self.max_loras = max_loras
        self._loaded: OrderedDict[str, str] = OrderedDict()  # name -> folder, least recently used first
        self.num_loads = 0  # running totals, for metrics
        self.num_drops = 0

    def use(self, name: str, folder: str, in_use: Callable[[], set[str]]) -> None:
        """Makes sure the adapter is loaded, then drops the least recently used ones that no request runs
        (`in_use()`, asked only after a load) while more than max_loras are loaded. Raises LoRAError (and loads
        nothing) for a folder that is not an adapter of this model."""
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        if self.runner.lora is not None and name in self.runner.lora.names:
            return  # loaded at start, or by LLM.add_lora
        self.runner.add_lora(name, folder)
        self._loaded[name] = folder
        self.num_loads += 1
        running = in_use()
        idle = [n for n in self._loaded if n != name and n not in running]
        while len(self._loaded) > self.max_loras and idle:
            dropped = idle.pop(0)
            self.runner.remove_lora(dropped)
            del self._loaded[dropped]
            self.num_drops += 1
            logger.info("LoRA adapter %r dropped: more than max_loras=%d adapters loaded, and it went unused "
                        "longest", dropped, self.max_loras)

"""A follower rank of a tensor-parallel group: it holds its shard of the model and KV cache and does what rank 0
tells it, in the order rank 0 did it, until told to stop."""

import logging

from workers.engine.config import EngineConfig
from workers.engine.model_runner import ModelRunner
from workers.engine.parallel import TensorParallel
from workers.engine.step_plan import CopyBlocks, DropAdapter, LoadAdapter, PlanReader, StepPlan, Stop
from workers.kv_commands import TransferError
from workers.kv_transfer import KVEndpoint, run_transfer

logger = logging.getLogger(__name__)


class Follower:
    def __init__(self, config: EngineConfig, tp: TensorParallel, progress: bool = False):
        if tp.is_driver:
            raise ValueError("rank 0 drives the group; it runs an LLMEngine, not a Follower")
        self.runner = ModelRunner(config, progress, tp)
        self.kv = KVEndpoint(tp.rank, self.runner.device, config.cache.max_kv_channels,
                             config.cache.kv_transfer_timeout_s)
        self.reader = PlanReader(tp)
        self.tp = tp

    def run(self) -> None:
        """The follower's whole life: apply messages until Stop (or until rank 0's process group breaks)."""
        while True:
            message = self.reader.receive()
            if isinstance(message, StepPlan):
                self.runner.execute(self.reader.apply(message), sample=False)
            elif isinstance(message, Stop):
                break
            elif isinstance(message, LoadAdapter):
                # Rank 0 read the same folder; a rank that cannot (a folder its node lacks) ends the group.
                self.runner.add_lora(message.name, message.folder)
            elif isinstance(message, DropAdapter):
                self.runner.remove_lora(message.name)
            elif isinstance(message, CopyBlocks):
                self.runner.copy_blocks(message.copies)
            else:
                try:
                    run_transfer(self.kv, message, self.runner.kv_caches, self.tp)
                except TransferError as e:  # rank 0 fails the request; this rank has already dropped the channel
                    logger.warning("rank %d: %s", self.tp.rank, e)
        self.kv.close()

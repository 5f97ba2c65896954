"""What every benchmark records about the machine it ran on, so figures are never read without their context."""

import os
import platform


def machine_info() -> dict:
    import torch
    import transformers

    return dict(python=platform.python_version(), platform=platform.platform(), processor=platform.processor(),
                torch=torch.__version__, transformers=transformers.__version__,
                torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads(),
                cpu_count=os.cpu_count(), cpus_usable=len(os.sched_getaffinity(0)), loadavg_start=os.getloadavg())

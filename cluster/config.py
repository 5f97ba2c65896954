"""The one place that reads the environment.

Everything below cluster/ takes plain arguments; this module turns environment variables into them.
"""

import os
from pathlib import Path

from workers.engine.model_store import default_cache_dir


def cache_dir() -> Path:
    """Where converted models live: $TANDEM_CACHE_DIR, else ~/.cache/tandem."""
    return Path(os.environ["TANDEM_CACHE_DIR"]) if os.environ.get("TANDEM_CACHE_DIR") else default_cache_dir()

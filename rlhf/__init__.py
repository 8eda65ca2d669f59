"""rlhf-suite: the spine every stage shares (artifacts, config, data, models, CLI)."""

from rlhf.errors import RlhfError

__all__ = ["RlhfError"]
__version__ = "0.1.0"

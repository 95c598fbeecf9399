"""vimbench: Vision Mamba vs DeiT across resolutions (throughput, memory, FLOPs, scan vs attention)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vimbench")
except PackageNotFoundError:  # a checkout that was not installed
    __version__ = "0+unknown"

from vimbench.models.registry import count_params, create_model, list_models, model_entry  # noqa: E402

__all__ = ["__version__", "count_params", "create_model", "list_models", "model_entry"]

"""vimbench: Vision Mamba vs DeiT across resolutions (throughput, memory, FLOPs, scan vs attention)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vimbench")
except PackageNotFoundError:  # a checkout that was not installed
    __version__ = "0+unknown"

from vimbench.layout import map_checkout_folders  # noqa: E402

map_checkout_folders()  # vimbench.kernels and vimbench.baselines in an uninstalled checkout

from vimbench.kernels.attention import register_attention_backend  # noqa: E402
from vimbench.kernels.selective_scan import register_scan_backend  # noqa: E402
from vimbench.models.registry import count_params, create_model, list_models, model_entry, register_model  # noqa: E402

__all__ = ["__version__", "count_params", "create_model", "list_models", "model_entry", "register_attention_backend",
           "register_model", "register_scan_backend"]

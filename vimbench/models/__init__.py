"""The models vimbench measures: one registry and one factory (``create_model``), the Vim family here,
DeiT and any timm model from ``vimbench.baselines``."""
from vimbench.models.registry import (count_params, create_model, list_models, model_entry, model_variants,
                                      register_model)

__all__ = ["count_params", "create_model", "list_models", "model_entry", "model_variants", "register_model"]

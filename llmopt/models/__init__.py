"""Resolve a model argument (a local HF directory or a built-in name) and load it."""

from llmopt.models.builtin import BUILTIN_MODELS, cache_dir, materialize_builtin
from llmopt.models.files import ModelFiles, inspect_model_dir
from llmopt.models.loading import LoadedModel, LoadSpec, load_model, resolve_model

__all__ = [
    "BUILTIN_MODELS",
    "LoadSpec",
    "LoadedModel",
    "ModelFiles",
    "cache_dir",
    "inspect_model_dir",
    "load_model",
    "materialize_builtin",
    "resolve_model",
]

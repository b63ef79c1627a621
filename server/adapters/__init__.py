"""Adapters: value types (weights.py), formats, validation of untrusted uploads, durable store, registry with hot swap, tiered cache.

Flow: upload bytes -> validate.parse_upload -> store (immutable versions) -> registry (tenant -> name ->
versions, in-flight refs) -> cache (device slots <- host memory <- disk), used by the engine thread.
"""
from server.adapters.refs import validate_name
from server.adapters.validate import AdapterLimits, parse_upload
from server.adapters.weights import (
    AdapterKind,
    AdapterWeights,
    BottleneckTarget,
    ClassificationHead,
    Ia3Target,
    LoraTarget,
)
from server.model.shape import BaseModelShape

__all__ = [
    "AdapterKind", "AdapterLimits", "AdapterWeights", "BaseModelShape", "BottleneckTarget",
    "ClassificationHead", "Ia3Target", "LoraTarget", "parse_upload", "validate_name",
]

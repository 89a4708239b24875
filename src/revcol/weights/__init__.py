"""The authors' published weights: the table (``published``), the download cache (``cache``), and what a
``pretrained=`` value means (``pretrained``)."""

from revcol.weights.cache import cache_dir, cache_path, download, is_cached
from revcol.weights.pretrained import (
    PretrainedChoice,
    choose_pretrained,
    load_chosen,
    load_weights,
    named_entry,
    resolve,
)
from revcol.weights.published import DEFAULT_TAGS, MIRROR_ROOT, WEIGHTS, PublishedWeights

__all__ = [
    "DEFAULT_TAGS",
    "MIRROR_ROOT",
    "WEIGHTS",
    "PretrainedChoice",
    "PublishedWeights",
    "cache_dir",
    "cache_path",
    "choose_pretrained",
    "download",
    "is_cached",
    "load_chosen",
    "load_weights",
    "named_entry",
    "resolve",
]

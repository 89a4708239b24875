"""The authors' published weights: the table (``published``), the download cache (``cache``), and what a
``pretrained=`` value means (``pretrained``)."""

from revcol.weights.cache import cache_dir, cache_path, download, is_cached
from revcol.weights.pretrained import load_weights, named_entry, resolve
from revcol.weights.published import DEFAULT_TAGS, MIRROR_ROOT, WEIGHTS, PublishedWeights

__all__ = [
    "DEFAULT_TAGS",
    "MIRROR_ROOT",
    "WEIGHTS",
    "PublishedWeights",
    "cache_dir",
    "cache_path",
    "download",
    "is_cached",
    "load_weights",
    "named_entry",
    "resolve",
]

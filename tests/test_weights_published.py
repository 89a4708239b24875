"""The authors' published weights as data (``revcol.weights.published``): each tag's file, resolution, score and
classes as their READMEs give them, the default tags, and the size bound of each download.

Nothing here reaches the network.
"""

from __future__ import annotations

from helpers.server import TEST_ENTRY

import revcol
from revcol.core.network import parameter_count
from revcol.weights import published as weights_published
from revcol.weights.published import DEFAULT_TAGS, WEIGHTS

# The authors' README: (variant, tag) -> file, training resolution, ImageNet-1k top-1, classes of its heads.
EXPECTED_TABLE = {
    ("revcol_tiny", "in1k"): ("revcol_tiny_1k.pth", 224, 82.2, 1000),
    ("revcol_small", "in1k"): ("revcol_small_1k.pth", 224, 83.5, 1000),
    ("revcol_base", "in1k"): ("revcol_base_1k.pth", 224, 84.1, 1000),
    ("revcol_base", "in22k"): ("revcol_base_22k.pth", 224, None, 21841),
    ("revcol_base", "in22k_ft_in1k"): ("revcol_base_22k_1kft_224.pth", 224, 85.6, 1000),
    ("revcol_base", "in22k_ft_in1k_384"): ("revcol_base_22k_1kft_384.pth", 384, 86.7, 1000),
    ("revcol_large", "in22k"): ("revcol_large_22k.pth", 224, None, 21841),
    ("revcol_large", "in22k_ft_in1k"): ("revcol_large_22k_1kft_224.pth", 224, 86.6, 1000),
    ("revcol_large", "in22k_ft_in1k_384"): ("revcol_large_22k_1kft_384.pth", 384, 87.6, 1000),
    # RevCol-H: MegData-168M pretraining (its classes are not published), then ImageNet-1k at 640
    ("revcol_huge", "megdata"): ("revcol_huge_megdata.pth", 224, None, None),
    ("revcol_huge", "megdata_ft_in1k"): ("revcol_huge_megdata_in1k.pth", 640, 90.0, 1000),
    # Downstream (their Detection/README.md and Segmentation/README.md): COCO at test scale 800, ADE20K crops
    ("revcol_tiny", "in1k_ft_coco"): ("cmr_tiny_3x_in1k_AP508.pth", 800, None, None),
    ("revcol_small", "in1k_ft_coco"): ("cmr_revcol_small_3x_in1k.pth", 800, None, None),
    ("revcol_base", "in1k_ft_coco"): ("cmr_base_3x_in1k.pth", 800, None, None),
    ("revcol_base", "in22k_ft_coco"): ("cmr_base_3x_in22k_AP55.pth", 800, None, None),
    ("revcol_large", "in22k_ft_coco"): ("cmr_large_3x_in22k_AP559.pth", 800, None, None),
    ("revcol_tiny", "in1k_ft_ade20k"): ("upernet_revcol_tiny_fp16_512x512_160k_ade20k.pth", 512, None, None),
    ("revcol_small", "in1k_ft_ade20k"): ("upernet_revcol_small_fp16_512x512_160k_ade20k.pth", 512, None, None),
    ("revcol_base", "in1k_ft_ade20k"): ("upernet_revcol_base_512x512_160k_ade20k.pth", 512, None, None),
    ("revcol_base", "in22k_ft_ade20k"): ("upernet_revcol_base_640x640_160k_ade20k.pth", 640, None, None),
    ("revcol_large", "in22k_ft_ade20k"): ("upernet_revcol_large_fp16_640x640_160k_ade20k.pth", 640, None, None),
    ("revcol_huge", "megdata_ft_ade20k"): ("upernet_revcol_huge_fp16_640x640_160k_ade20k.pth", 640, None, None),
    ("revcol_huge", "megdata_k7"): ("revcol_huge_k7padded.pth", 224, None, None),
}


def test_table_maps_each_tag_to_the_authors_file():
    table = {
        (v, t): (e.filename, e.resolution, e.top1, e.num_classes)
        for v, tags in WEIGHTS.items()
        for t, e in tags.items()
    }
    assert table == EXPECTED_TABLE
    for variant, tags in WEIGHTS.items():
        assert variant in revcol.VARIANTS
        assert all(e.variant == variant and e.tag == tag for tag, e in tags.items())
    assert "revcol_xlarge" not in WEIGHTS  # no published file


def test_default_tags_are_the_224px_in1k_classifiers():
    assert DEFAULT_TAGS == {
        "revcol_tiny": "in1k",
        "revcol_small": "in1k",
        "revcol_base": "in22k_ft_in1k",
        "revcol_large": "in22k_ft_in1k",
        "revcol_huge": "megdata_ft_in1k",  # its only ImageNet-1k classifier, fine-tuned at 640
    }
    for variant, tag in DEFAULT_TAGS.items():
        assert WEIGHTS[variant][tag].resolution == (640 if variant == "revcol_huge" else 224)
        assert WEIGHTS[variant][tag].num_classes == 1000


def test_size_bounds_follow_the_published_parameter_counts():
    for entry in (e for tags in WEIGHTS.values() for e in tags.values()):
        spec = revcol.VARIANTS[entry.variant]
        config = (spec.channels, spec.layers, spec.num_subnet, entry.kernel_size, spec.level0_from_coarsest)
        backbone = parameter_count(*config)
        assert entry.max_bytes == int(entry.params_m * 1e6) * 24 + weights_published.SIZE_SLACK, entry
        # room at least for the backbone in float32 with the two Adam moments of an optimizer state saved with it
        assert entry.max_bytes > 12 * backbone + weights_published.SIZE_SLACK, entry
    assert WEIGHTS["revcol_tiny"]["in1k"].max_bytes > 114 << 20  # the real file (114 MB) fits
    assert TEST_ENTRY.max_bytes == weights_published.MAX_DOWNLOAD_BYTES  # no count published: the generous cap

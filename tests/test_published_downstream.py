"""The authors' COCO and ADE20K files and the k7-padded RevCol-H in the published table (revcol.weights.published):
every file with its results and kernel size, fetched from its folder on the mirror, never a default.

Loading them by tag through every entry point: test_pretrained_values.py.
"""

from __future__ import annotations

from revcol.weights import cache as weights_cache
from revcol.weights.published import DEFAULT_TAGS, MIRROR_ROOT, WEIGHTS

# The authors' Detection/README.md and Segmentation/README.md: tag -> file, folder, results, kernel size.
COCO = "COCO detection, Cascade Mask R-CNN 3x (mmdetection)"
ADE = "ADE20K segmentation, UperNet 160k (mmsegmentation)"
EXPECTED = {
    ("revcol_tiny", "in1k_ft_coco"): ("cmr_tiny_3x_in1k_AP508.pth", COCO, {"box AP": 50.8, "mask AP": 44.0}, 3),
    ("revcol_small", "in1k_ft_coco"): ("cmr_revcol_small_3x_in1k.pth", COCO, {"box AP": 52.6, "mask AP": 45.5}, 3),
    ("revcol_base", "in1k_ft_coco"): ("cmr_base_3x_in1k.pth", COCO, {"box AP": 53.0, "mask AP": 45.9}, 3),
    ("revcol_base", "in22k_ft_coco"): ("cmr_base_3x_in22k_AP55.pth", COCO, {"box AP": 55.0, "mask AP": 47.5}, 3),
    ("revcol_large", "in22k_ft_coco"): ("cmr_large_3x_in22k_AP559.pth", COCO, {"box AP": 55.9, "mask AP": 48.4}, 3),
    ("revcol_tiny", "in1k_ft_ade20k"): (
        "upernet_revcol_tiny_fp16_512x512_160k_ade20k.pth",
        ADE,
        {"mIoU": 47.4, "mIoU ms+flip": 47.6},
        3,
    ),
    ("revcol_small", "in1k_ft_ade20k"): (
        "upernet_revcol_small_fp16_512x512_160k_ade20k.pth",
        ADE,
        {"mIoU": 47.9, "mIoU ms+flip": 49.0},
        3,
    ),
    ("revcol_base", "in1k_ft_ade20k"): (
        "upernet_revcol_base_512x512_160k_ade20k.pth",
        ADE,
        {"mIoU": 49.0, "mIoU ms+flip": 50.1},
        3,
    ),
    ("revcol_base", "in22k_ft_ade20k"): (
        "upernet_revcol_base_640x640_160k_ade20k.pth",
        ADE,
        {"mIoU": 52.7, "mIoU ms+flip": 53.3},
        3,
    ),
    ("revcol_large", "in22k_ft_ade20k"): (
        "upernet_revcol_large_fp16_640x640_160k_ade20k.pth",
        ADE,
        {"mIoU": 53.4, "mIoU ms+flip": 53.7},
        3,
    ),
    ("revcol_huge", "megdata_ft_ade20k"): (
        "upernet_revcol_huge_fp16_640x640_160k_ade20k.pth",
        ADE,
        {"mIoU": 57.8, "mIoU ms+flip": 58.0},
        7,
    ),
    ("revcol_huge", "megdata_k7"): (
        "revcol_huge_k7padded.pth",
        "MegData-168M pretraining, depthwise kernels padded to 7x7 afterwards",
        {},
        7,
    ),
}


def test_the_table_holds_every_downstream_file_of_the_authors():
    table = {
        (e.variant, e.tag): (e.filename, e.trained_for, dict(e.scores), e.kernel_size)
        for tags in WEIGHTS.values()
        for e in tags.values()
        if e.is_downstream
    }
    assert table == EXPECTED


def test_downstream_files_come_from_their_folders_on_the_mirror(monkeypatch):
    monkeypatch.delenv(weights_cache.URL_ENV, raising=False)
    for (variant, tag), (filename, trained_for, _, _) in EXPECTED.items():
        entry = WEIGHTS[variant][tag]
        folder = "detection" if trained_for == COCO else "segmentation"
        url = f"{MIRROR_ROOT}{folder}/{filename}"
        assert url.startswith("https://huggingface.co/LarryTsai/RevCol/resolve/main/revcol_models/")
        assert not entry.in_release and entry.url == entry.mirror_url == url
        assert weights_cache.candidate_urls(entry) == [url]
        assert entry.num_classes is None and entry.top1 is None  # no classifier in these files
    for tag in DEFAULT_TAGS.values():  # pretrained=True stays an ImageNet classifier
        assert not any(e.is_downstream and e.tag == tag for tags in WEIGHTS.values() for e in tags.values())

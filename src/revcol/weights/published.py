"""The authors' published weights as data: each file's variant, tag, name, training and published scores.

``WEIGHTS`` and ``DEFAULT_TAGS`` are the one place these facts live; ``revcol info`` and the tables of the docs
(``docs/generate.py``) are printed from them. Downloading is ``revcol.weights.cache``'s."""

from __future__ import annotations

from dataclasses import dataclass

PRIMARY_BASE = "https://github.com/megvii-research/RevCol/releases/download/checkpoint/"


MIRROR_ROOT = "https://huggingface.co/LarryTsai/RevCol/resolve/main/revcol_models/"


MIRROR_BASE = MIRROR_ROOT + "classification/"


# float32, six times over: the model, an EMA copy, the two Adam moments of an optimizer state, and room to spare
BYTES_PER_PARAMETER = 4 * 6


SIZE_SLACK = 256 << 20


MAX_DOWNLOAD_BYTES = 64 << 30  # the bound of a file whose parameter count is not published


@dataclass(frozen=True)
class PublishedWeights:
    """One file of the authors' release: the variant it fits, its tag, and how it was trained and scored."""

    variant: str
    tag: str
    filename: str
    resolution: int  # input size of the training (ImageNet; ADE20K: crop; COCO: test scale's short side)
    top1: float | None  # ImageNet-1k top-1 accuracy in %; None for the pretraining-only files (22k, MegData)
    num_classes: int | None  # of the classification heads in the file (not loaded); None: not published / none
    in_release: bool = True  # False: the file is only on the authors' Hugging Face repository
    folder: str = "classification"  # its folder there (classification, detection, segmentation)
    trained_for: str = "ImageNet classification"
    scores: tuple[tuple[str, float], ...] = ()  # a downstream file's published results, e.g. (("box AP", 50.8),)
    kernel_size: int = 3  # of the depthwise convolutions: the model that loads this file has to be built with it
    params_m: float | None = None  # the authors' parameter count of the model in the file, in millions

    @property
    def url(self) -> str:
        """Where the file is fetched first: the authors' GitHub release, or the mirror for a file not in it."""
        return PRIMARY_BASE + self.filename if self.in_release else self.mirror_url

    @property
    def mirror_url(self) -> str:
        """The same file in the authors' Hugging Face repository, under its folder."""
        base = MIRROR_BASE if self.folder == "classification" else f"{MIRROR_ROOT}{self.folder}/"
        return base + self.filename

    @property
    def max_bytes(self) -> int:
        """The most a download of this file may bring: generous for its parameter count, else a fixed cap."""
        if self.params_m is None:
            return MAX_DOWNLOAD_BYTES
        return int(self.params_m * 1e6) * BYTES_PER_PARAMETER + SIZE_SLACK

    @property
    def is_downstream(self) -> bool:
        """A detector's or segmenter's file: only its backbone is loaded."""
        return self.folder != "classification"


_IN22K = "ImageNet-22k pretraining"


_COCO = "COCO detection, Cascade Mask R-CNN 3x (mmdetection)"


_ADE = "ADE20K segmentation, UperNet 160k (mmsegmentation)"


def _coco(variant: str, tag: str, filename: str, box: float, mask: float, params_m: float) -> PublishedWeights:
    scores = (("box AP", box), ("mask AP", mask))
    return PublishedWeights(
        variant, tag, filename, 800, None, None, False, "detection", _COCO, scores, params_m=params_m
    )


def _ade(variant: str, tag: str, filename: str, crop: int, miou: float, ms: float, params_m: float, kernel=3):
    scores = (("mIoU", miou), ("mIoU ms+flip", ms))
    return PublishedWeights(
        variant, tag, filename, crop, None, None, False, "segmentation", _ADE, scores, kernel, params_m
    )


_PUBLISHED = (
    PublishedWeights("revcol_tiny", "in1k", "revcol_tiny_1k.pth", 224, 82.2, 1000, params_m=30),
    PublishedWeights("revcol_small", "in1k", "revcol_small_1k.pth", 224, 83.5, 1000, params_m=60),
    PublishedWeights("revcol_base", "in1k", "revcol_base_1k.pth", 224, 84.1, 1000, params_m=138),
    PublishedWeights("revcol_base", "in22k", "revcol_base_22k.pth", 224, None, 21841, trained_for=_IN22K, params_m=138),
    PublishedWeights("revcol_base", "in22k_ft_in1k", "revcol_base_22k_1kft_224.pth", 224, 85.6, 1000, params_m=138),
    PublishedWeights("revcol_base", "in22k_ft_in1k_384", "revcol_base_22k_1kft_384.pth", 384, 86.7, 1000, params_m=138),
    PublishedWeights(
        "revcol_large", "in22k", "revcol_large_22k.pth", 224, None, 21841, trained_for=_IN22K, params_m=273
    ),
    PublishedWeights("revcol_large", "in22k_ft_in1k", "revcol_large_22k_1kft_224.pth", 224, 86.6, 1000, params_m=273),
    PublishedWeights(
        "revcol_large", "in22k_ft_in1k_384", "revcol_large_22k_1kft_384.pth", 384, 87.6, 1000, params_m=273
    ),
    # RevCol-H: pretrained on the authors' MegData-168M (number of classes not published), fine-tuned at 640 px.
    PublishedWeights(
        "revcol_huge",
        "megdata",
        "revcol_huge_megdata.pth",
        224,
        None,
        None,
        in_release=False,
        trained_for="MegData-168M pretraining",
        params_m=2100,
    ),
    PublishedWeights(
        "revcol_huge", "megdata_ft_in1k", "revcol_huge_megdata_in1k.pth", 640, 90.0, 1000, False, params_m=2100
    ),
    # Downstream: the authors' Detection/README.md and Segmentation/README.md (parameters of the whole detector
    # or segmenter, as published: UperNet-B's 122 M is below its backbone's 138 M). Their backbones are ImageNet
    # (or MegData) initialised, then trained with the task.
    _coco("revcol_tiny", "in1k_ft_coco", "cmr_tiny_3x_in1k_AP508.pth", 50.8, 44.0, 88),
    _coco("revcol_small", "in1k_ft_coco", "cmr_revcol_small_3x_in1k.pth", 52.6, 45.5, 118),
    _coco("revcol_base", "in1k_ft_coco", "cmr_base_3x_in1k.pth", 53.0, 45.9, 196),
    _coco("revcol_base", "in22k_ft_coco", "cmr_base_3x_in22k_AP55.pth", 55.0, 47.5, 196),
    _coco("revcol_large", "in22k_ft_coco", "cmr_large_3x_in22k_AP559.pth", 55.9, 48.4, 330),
    _ade("revcol_tiny", "in1k_ft_ade20k", "upernet_revcol_tiny_fp16_512x512_160k_ade20k.pth", 512, 47.4, 47.6, 60),
    _ade("revcol_small", "in1k_ft_ade20k", "upernet_revcol_small_fp16_512x512_160k_ade20k.pth", 512, 47.9, 49.0, 90),
    _ade("revcol_base", "in1k_ft_ade20k", "upernet_revcol_base_512x512_160k_ade20k.pth", 512, 49.0, 50.1, 122),
    _ade("revcol_base", "in22k_ft_ade20k", "upernet_revcol_base_640x640_160k_ade20k.pth", 640, 52.7, 53.3, 122),
    _ade("revcol_large", "in22k_ft_ade20k", "upernet_revcol_large_fp16_640x640_160k_ade20k.pth", 640, 53.4, 53.7, 306),
    _ade(
        "revcol_huge", "megdata_ft_ade20k", "upernet_revcol_huge_fp16_640x640_160k_ade20k.pth", 640, 57.8, 58.0, 2421, 7
    ),
    # The initialisation of that UperNet: the MegData backbone with its depthwise kernels padded to 7x7.
    PublishedWeights(
        "revcol_huge",
        "megdata_k7",
        "revcol_huge_k7padded.pth",
        224,
        None,
        None,
        False,
        "segmentation",
        "MegData-168M pretraining, depthwise kernels padded to 7x7 afterwards",
        kernel_size=7,
        params_m=2160,  # not published: RevCol-H's 2155 M with 7x7 instead of 3x3 kernels
    ),
)


def _by_variant(entries: tuple[PublishedWeights, ...]) -> dict[str, dict[str, PublishedWeights]]:
    table: dict[str, dict[str, PublishedWeights]] = {}
    for entry in entries:
        table.setdefault(entry.variant, {})[entry.tag] = entry
    return table


# variant -> tag -> file. revcol_xlarge has no published file, so no entry.
WEIGHTS: dict[str, dict[str, PublishedWeights]] = _by_variant(_PUBLISHED)


# What pretrained=True loads: the best 224-px ImageNet-1k classifier of each variant (RevCol-H has only a 640-px one).
DEFAULT_TAGS: dict[str, str] = {
    "revcol_tiny": "in1k",
    "revcol_small": "in1k",
    "revcol_base": "in22k_ft_in1k",
    "revcol_large": "in22k_ft_in1k",
    "revcol_huge": "megdata_ft_in1k",
}

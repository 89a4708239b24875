"""Distributed training: FSDP2 sharding per column (``fsdp``) and sharded checkpoint folders
(``checkpoints``)."""

from revcol.distributed._folder import CHECKSUMS
from revcol.distributed.checkpoints import load_checkpoint, save_checkpoint
from revcol.distributed.fsdp import BF16_POLICY, cpu_fsdp_supported, shard

__all__ = ["BF16_POLICY", "CHECKSUMS", "cpu_fsdp_supported", "load_checkpoint", "save_checkpoint", "shard"]

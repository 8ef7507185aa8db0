"""Entry point for torchrun: ``torchrun --nproc_per_node N scripts/retrofit_torchrun.py MODEL --data ...``
takes the arguments of ``dms retrofit``; each process trains its share of every batch, with the
model sharded by FSDP2 (the default with N > 1, or ``--fsdp``) or replicated (``--sharding ddp``).
Memory per process: add ``--plan --world-size N`` to the same arguments (docs/memory.md)."""
import sys

from dms.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrofit", *sys.argv[1:]]))

"""Entry point for torchrun: ``torchrun --nproc_per_node N scripts/retrofit_torchrun.py MODEL --data ...``
takes the arguments of ``dms retrofit``; each process trains its share of every batch (DDP)."""
import sys

from dms.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrofit", *sys.argv[1:]]))

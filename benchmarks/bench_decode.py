"""Decode speed and KV memory, DMS cache vs transformers DynamicCache (CPU); the logic and its
description live in dms/cli/bench.py (also run as ``dms bench``).

    python benchmarks/bench_decode.py            # 4K, 16K, 32K context
    python benchmarks/bench_decode.py --quick    # CI smoke run
"""
import argparse

from dms.cli import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    bench.run(parser.parse_args())

"""Writes the task tokenizer to a folder: python scripts/build_tokenizer.py OUT_DIR"""
import argparse

from dms.tasks.tokenizer import save_tokenizer

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", help="folder to write tokenizer.json and tokenizer_config.json to")
    tok = save_tokenizer(parser.parse_args().out_dir)
    print(f"vocabulary size {len(tok)}")

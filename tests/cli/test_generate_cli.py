"""``dms generate`` on a tiny local checkpoint with a word-level tokenizer."""
from __future__ import annotations

from conftest import forced_dms_model

from dms.cli import main


def _save_tokenizer(path, vocab_size: int = 128):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                            eos_token="[EOS]").save_pretrained(path)


def test_generate_streams_and_reports(tmp_path, capsys):
    forced_dms_model("qwen3", "adapter").save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(f"w{i}" for i in range(10, 40)))
    assert main(["generate", str(tmp_path), "--prompt-file", str(prompt), "--max-new-tokens", "20"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) >= 10  # streamed words (seeded model + greedy: deterministic)
    assert "compression ratio" in err and "MiB uncompressed" in err
    ratio = float(err.split("compression ratio ")[1].split("x")[0])
    assert ratio > 1.0


def test_bench_smoke(capsys):
    """``dms bench --quick`` runs end to end (figures are for BENCHMARKS.md, not asserted here
    beyond what the forced decisions guarantee)."""
    assert main(["bench", "--quick"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("context")]
    assert len(lines) == 2
    for line in lines:
        ratio = float(line.split("(CR ")[1].split(")")[0])
        assert 7.0 < ratio < 9.0


def test_generate_ignore_eos_goes_past_the_end(tmp_path, capsys):
    """The checkpoint's end token is made the first token it writes: without --ignore-eos the
    completion is that one token, with it generation runs to --max-new-tokens."""
    import json

    forced_dms_model("qwen3", "adapter").save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(f"w{i}" for i in range(10, 40)))
    args = ["generate", str(tmp_path), "--prompt-file", str(prompt), "--max-new-tokens", "12"]
    assert main(args) == 0
    first = int(capsys.readouterr().out.split()[0][1:])  # greedy and seeded: the same first word each run
    config_path = tmp_path / "generation_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config_path.write_text(json.dumps({**config, "eos_token_id": first}))

    assert main(args) == 0
    assert "30 prompt tokens, 1 new" in capsys.readouterr().err
    assert main(args + ["--ignore-eos"]) == 0
    assert "30 prompt tokens, 12 new" in capsys.readouterr().err

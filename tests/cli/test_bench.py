"""``dms bench --batched``: at equal KV memory, each cache's batch is the largest its bytes allow."""
from __future__ import annotations

import pytest

from dms.cli import main
from dms.cli.bench import measure_batched


def test_batched_batches_fit_the_budget_and_dms_fits_more(capsys):
    budget = 12 * 2 ** 20
    row = measure_batched(context=384, budget=budget, steps=2, warmup=1, window=16, ratio=8.0, threads=1)
    per_dense = 2 * 4 * 8 * 384 * 64 * 4  # layers x KV heads x context x head_dim x fp32, keys and values
    assert row["static_batch"] == budget // per_dense == 2
    assert row["static_kv_bytes"] == row["static_batch"] * per_dense <= budget
    assert row["dms_kv_bytes"] <= budget < row["dms_kv_bytes"] * (row["dms_batch"] + 1) / row["dms_batch"]
    assert row["dms_batch"] > 2 * row["static_batch"] and 7.0 < row["compression"] < 9.0
    assert row["static_tok_s"] > 0 and row["dms_tok_s"] > 0
    assert "StaticCache batch 2" in capsys.readouterr().out


def test_batched_quick_command_and_a_budget_too_small(capsys):
    assert main(["bench", "--batched", "--quick"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    with pytest.raises(ValueError, match="holds no 8192-token sequence"):
        measure_batched(context=8192, budget=2 ** 20, steps=2, warmup=1, window=16, ratio=8.0, threads=1)

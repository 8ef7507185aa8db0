"""Two-process retrofit under torchrun with --sharding ddp (gloo on CPU): completes, and both
ranks hold identical trained weights. FSDP: test_fsdp.py."""
import json
import textwrap

import torch
from conftest import run_torchrun

from dms.models.tiny import tiny_model

# Each rank trains, then dumps its own copy of the trainable parameters for the test to compare.
_WORKER = textwrap.dedent("""
    import os, sys, torch
    from dms.train import retrofit
    model_dir, data, out = sys.argv[1:4]
    model = retrofit(model_dir, data=[data], output_dir=out, steps=3, seq_len=32, window=4, target_cr=3.0,
                     batch_size=1, grad_accum=2, lr=1e-2, variant="neuron", progress=False,
                     sharding="ddp")
    rank = os.environ["RANK"]
    torch.save({n: p.detach().clone() for n, p in model.named_parameters() if "q_proj" in n},
               os.path.join(out, f"params_rank{rank}.pt"))
""")


def test_torchrun_two_processes_gloo(tmp_path):
    model_dir = tmp_path / "plain"
    tiny_model("llama").save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    with open(tmp_path / "data.jsonl", "w") as f:
        for _ in range(20):
            f.write(json.dumps({"input_ids": torch.randint(3, 128, (40,), generator=g).tolist()}) + "\n")
    (tmp_path / "worker.py").write_text(_WORKER)
    out = tmp_path / "out"
    code, stderr = run_torchrun(tmp_path / "worker.py", [model_dir, tmp_path / "data.jsonl", out], timeout=120)
    assert code == 0, stderr[-3000:]
    a = torch.load(out / "params_rank0.pt")
    b = torch.load(out / "params_rank1.pt")
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.equal(a[n], b[n]), n
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    # 2 ranks x 2 micro-batches x 1 sequence of 32 tokens per step.
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["tokens"] == 128 for r in log)

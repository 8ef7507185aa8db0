"""FSDP2 retrofit (dms.train.fsdp) and its checkpoints (dms.train.checkpoint): two processes under
torchrun (gloo) against one, resuming at another world size, a kill while saving, and the
one-line errors. The one-process runs happen in this process (a gloo group of one, set up as
torchrun would), so the file launches torchrun once."""
import json
import os
import textwrap

import pytest
import torch
from conftest import free_port, run_torchrun

from dms.models.tiny import tiny_model
from dms.train import TrainConfig, Trainer, retrofit
from dms.train.checkpoint import KILL_IN_SAVE_ENV

# Runs of one scenario share every option but the output folder; ramp and lr do not depend on
# `steps`, so a 4-step run is the first 4 steps of a 6-step one.
RUNS = {
    # frozen base, borrowed neurons (the teacher is the student's sharded weights, eviction off)
    "neuron": dict(variant="neuron", lr=1e-2),
    # full fine-tune, adapter variant, tied head, activation checkpointing (a sharded teacher copy)
    "full": dict(variant="adapter", train_mode="full", lr=1e-3, activation_checkpointing=True, tied=True),
}


def _options(root, name, **kw):
    opts = dict(RUNS[name])
    opts.pop("tied", None)
    opts.update(data=[str(root / "data.jsonl")], output_dir=str(root / name), steps=6, ramp_steps=4,
                seq_len=32, window=4, target_cr=3.0, batch_size=1, global_batch_size=2, save_every=2,
                progress=False, sharding="fsdp")
    opts.update(kw)
    return opts


# Every rank runs the same list of retrofits in one process group (retrofit uses a group that
# exists); the last one may be killed while saving.
_WORKER = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from dms.train import retrofit
    dist.init_process_group("gloo")
    for model_dir, opts in json.load(open(sys.argv[1])):
        retrofit(model_dir, **opts)
""")


def _torchrun(tmp_path, jobs, nproc=2, env=None):
    (tmp_path / "worker.py").write_text(_WORKER)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    return run_torchrun(tmp_path / "worker.py", [tmp_path / "jobs.json"], nproc=nproc, env=env)


@pytest.fixture
def one_process(monkeypatch):
    """Runs retrofit(...) as the only process of a torchrun job (gloo group of one)."""
    def run(model_dir, **opts):
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        for k in ("RANK", "LOCAL_RANK"):
            monkeypatch.setenv(k, "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
        return retrofit(model_dir, **opts)

    return run


def _log(folder):
    with open(os.path.join(folder, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _same_losses(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "kl", "evicted_fraction"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)


def _same_weights(a, b):
    import dms

    wa, wb = dms.from_pretrained(a).state_dict(), dms.from_pretrained(b).state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    for name in RUNS:
        tiny_model("qwen3", tie_word_embeddings=RUNS[name].get("tied", False)).save_pretrained(root / f"base-{name}")
    g = torch.Generator().manual_seed(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(24):
            n = int(torch.randint(20, 40, (1,), generator=g))
            f.write(json.dumps({"input_ids": torch.randint(3, 128, (n,), generator=g).tolist()}) + "\n")
    return root


def test_two_processes_match_one_and_resume_across_world_sizes(setup, one_process, tmp_path):
    root = setup
    # One process: the reference runs.
    for name in RUNS:
        one_process(str(root / f"base-{name}"), **_options(root, name, output_dir=str(root / f"{name}-1p")))
    # Two processes: the same runs; resumed from the one-process checkpoints; and a run killed
    # while writing its step-4 checkpoint (the launch fails, by design, at that point).
    jobs = [(str(root / f"base-{n}"), _options(root, n, output_dir=str(root / f"{n}-2p"))) for n in RUNS]
    jobs += [(str(root / f"base-{n}"), _options(root, n, output_dir=str(root / f"{n}-2p-from-1p"),
                                                resume_from=str(root / f"{n}-1p" / "checkpoint-000004")))
             for n in RUNS]
    jobs.append((str(root / "base-neuron"), _options(root, "neuron", output_dir=str(root / "killed"))))
    code, stderr = _torchrun(tmp_path, jobs, env={KILL_IN_SAVE_ENV: str(root / "killed" / "checkpoint-000004")})
    assert code != 0 and (root / "neuron-2p-from-1p" / "config.json").is_file(), stderr[-3000:]

    for name in RUNS:
        one_p, two_p = str(root / f"{name}-1p"), str(root / f"{name}-2p")
        assert [r["tokens"] for r in _log(one_p)] == [r["tokens"] for r in _log(two_p)]
        _same_losses(_log(one_p), _log(two_p))
        _same_weights(one_p, two_p)
        # Saved by 1, resumed by 2 (steps 5-6); saved by 2, resumed by 1 (steps 3-6).
        _same_losses(_log(one_p)[4:], _log(str(root / f"{name}-2p-from-1p")))
        _same_weights(one_p, str(root / f"{name}-2p-from-1p"))
        back = str(root / f"{name}-1p-from-2p")
        one_process(str(root / f"base-{name}"), **_options(root, name, output_dir=back,
                                                           resume_from=str(root / f"{name}-2p" / "checkpoint-000002")))
        _same_losses(_log(one_p)[2:], _log(back))
        _same_weights(one_p, back)

    # Killed after writing every shard of checkpoint-4 but before completing it: the newest
    # complete checkpoint is step 2, and "latest" continues from there like the uninterrupted run.
    killed = root / "killed"
    assert (killed / ".tmp-checkpoint-000004").is_dir() and not (killed / "checkpoint-000004").exists()
    one_process(str(root / "base-neuron"), **_options(root, "neuron", output_dir=str(killed), resume_from="latest"))
    assert (killed / "checkpoint-000004").is_dir() and not (killed / ".tmp-checkpoint-000004").exists()
    _same_losses(_log(str(root / "neuron-1p")), _log(str(killed)))
    _same_weights(str(root / "neuron-1p"), str(killed))


def test_the_teacher_is_sharded_and_has_no_optimizer_state(setup, one_process, monkeypatch):
    """Full fine-tune: the teacher's parameters are DTensors (sharded) and outside the optimizer."""
    from torch.distributed.tensor import DTensor

    seen = {}
    train = Trainer.train

    def inspect(self):
        seen["teacher"] = [p for p in self.teacher.parameters()]
        seen["optimized"] = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        seen["student"] = [p for p in self.model.parameters()]
        return train(self)

    monkeypatch.setattr(Trainer, "train", inspect)
    root = setup
    one_process(str(root / "base-full"), **_options(root, "full", output_dir=str(root / "inspect"), steps=1, save_every=0))
    assert seen["teacher"] and all(isinstance(p, DTensor) and not p.requires_grad for p in seen["teacher"])
    assert not seen["optimized"] & {id(p) for p in seen["teacher"]}
    assert all(isinstance(p, DTensor) for p in seen["student"])


# -- one-line errors ---------------------------------------------------------------------------

def test_fsdp_without_torchrun_is_a_one_line_error(setup, monkeypatch, capsys):
    from dms.cli import main

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    root = setup
    code = main(["retrofit", str(root / "base-neuron"), "--data", str(root / "data.jsonl"), "--output-dir",
                 str(root / "x"), "--fsdp", "--steps", "1", "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "needs torchrun" in err, err
    with pytest.raises(ValueError, match="needs torchrun"):
        retrofit(str(root / "base-neuron"), **_options(root, "neuron", output_dir=str(root / "x")))


def test_world_size_that_does_not_divide_the_batch(setup):
    cfg = TrainConfig(**_options(setup, "neuron", global_batch_size=3, sharding="none"))
    with pytest.raises(ValueError, match=r"global_batch_size 3 is not a multiple of batch_size 1 x 2 processes") as e:
        Trainer(str(setup / "base-neuron"), cfg, rank=0, world=2)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="grad_accum or global_batch_size"):
        TrainConfig(**_options(setup, "neuron", grad_accum=2))


def test_resuming_a_different_model(setup, one_process, tmp_path):
    root = setup
    one_process(str(root / "base-neuron"), **_options(root, "neuron", output_dir=str(tmp_path / "a"), steps=2,
                                                      save_every=1))
    checkpoint = str(tmp_path / "a" / "checkpoint-000001")
    other = tmp_path / "other"
    tiny_model("qwen3", num_hidden_layers=3).save_pretrained(other)
    with pytest.raises(ValueError, match="belongs to a different model") as e:
        one_process(str(other), **_options(root, "neuron", output_dir=str(tmp_path / "o"), resume_from=checkpoint))
    assert "\n" not in str(e.value) and "num_hidden_layers" in str(e.value)
    with pytest.raises(ValueError, match="written with FSDP sharding"):
        retrofit(str(root / "base-neuron"), **_options(root, "neuron", output_dir=str(tmp_path / "p"), sharding="none",
                                                       resume_from=checkpoint))

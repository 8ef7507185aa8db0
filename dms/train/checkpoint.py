"""Retrofit checkpoints: atomic directories, sharded (DCP) save and resume, consolidated export.

A checkpoint is written into ``.tmp-<name>`` next to its final place and renamed once every
process has finished writing, so a run killed while saving leaves the previous complete
checkpoint as the newest ``checkpoint-*``; ``resume_from="latest"`` picks that one.

Under FSDP a checkpoint holds the sharded model and AdamW state in torch.distributed.checkpoint
(DCP) format, which re-shards on load, so it resumes on any number of processes, plus
``training_state.pt`` (step, samples, config, model shape, original neuron rows). The final
model is exported once, consolidated, in the published DMS format (``dms.from_pretrained``).
"""
from __future__ import annotations

import contextlib
import copy
import glob
import os
import re
import shutil
import signal

import torch
import torch.distributed as dist

# Fault injection for the tests: rank 0 kills itself after every rank has written the files of
# the checkpoint at this absolute path, before the rename that completes it.
KILL_IN_SAVE_ENV = "DMS_FAULT_KILL_IN_SAVE"
_NAME = re.compile(r"checkpoint-(\d+)$")


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


@contextlib.contextmanager
def atomic_dir(path: str, rank: int, world: int):
    """Yields a temporary directory that becomes ``path`` when every rank leaves the block."""
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        os.makedirs(tmp)
    _barrier(world)
    yield tmp
    _barrier(world)
    if rank == 0:
        if os.environ.get(KILL_IN_SAVE_ENV) == path:
            os.kill(os.getpid(), signal.SIGKILL)
        old = os.path.join(os.path.dirname(path), ".old-" + os.path.basename(path))
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier(world)


def publish_files(tmp: str, directory: str) -> None:
    """Move the files of ``tmp`` into ``directory`` (which also holds logs and checkpoints),
    config.json last: a reader sees no model until its weights are all in place."""
    os.makedirs(directory, exist_ok=True)
    names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
    for name in names:
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    os.rmdir(tmp)


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete ``checkpoint-*`` directory with the highest step, or None."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))
             if (m := _NAME.search(p)) and os.path.isdir(p)]
    return max(found)[1] if found else None


def model_shape(config) -> dict:
    """What must match for a checkpoint to belong to this model."""
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
    return {k: getattr(config, k, None) for k in keys}


def save_sharded(directory: str, student, optimizer) -> None:
    """Collective: every rank writes its shards of the model and optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(student, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory)


def load_sharded(directory: str, student, optimizer) -> None:
    """Collective: load shards written by any number of processes into this sharding."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(student, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def export_consolidated(tmp: str, student, model, tokenizer, rank: int) -> None:
    """Collective: gather the full weights on rank 0 (in CPU memory, one tensor at a time on the
    device) and write them in the published format, as ``save_pretrained`` of a plain model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    prefix = "model."
    weights = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    config = copy.deepcopy(model.config)
    config._attn_implementation_internal = None  # "dms" is set by the DMS class, transformers refuses it
    with torch.device("meta"):
        plain = type(model)(config)  # the DMS class: installs DMS from the config's dms_* keys
    plain.load_state_dict(weights, strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)

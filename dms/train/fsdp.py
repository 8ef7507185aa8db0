"""FSDP2 sharding of a retrofit (``torch.distributed.fsdp.fully_shard``).

Each decoder layer is one FSDP unit and the student wrapper (embeddings, final norm, output
head) is the root, so every process holds 1/world of the weights, gradients and AdamW state,
and a layer's full weights exist only while it runs. On CUDA the units compute in bfloat16 and
reduce gradients in float32 (the sharded parameters keep the loaded dtype). The teacher is
never replicated: in adapter-only mode it is the student's own sharded weights run with
eviction off; in full fine-tune mode it is a second sharded copy with no gradients or optimizer
state, whose output head is gathered once per step for the KL.

The decisions leave each layer as a side output (dms.models.last_decisions), not through the
layer's output, and FSDP unshards a layer for backward when the gradient of its *output*
arrives. Autograd's order (newest node first) happens to deliver that gradient before the
decisions' (the same trajectory with or without the tie, 2026-12-01), but nothing promises it:
``_TieSideOutputs`` makes it a dependency, routing each layer's decisions through its output.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "RANK" in os.environ)


def resolve_sharding(sharding: str, world: int) -> str:
    """auto: fsdp when torchrun started more than one process, else none. fsdp needs a process
    group (torchrun, even with one process) because its checkpoints are collective."""
    if sharding == "auto":
        return "fsdp" if world > 1 else "none"
    if sharding == "fsdp" and not (dist.is_initialized() or launched_by_torchrun()):
        raise ValueError("sharding 'fsdp' (--fsdp) needs torchrun: torchrun --nproc_per_node N "
                         "scripts/retrofit_torchrun.py MODEL --fsdp ...")
    if sharding == "ddp" and world == 1:
        raise ValueError("sharding 'ddp' needs more than one process (torchrun --nproc_per_node N)")
    return sharding


class _TieSideOutputs(torch.autograd.Function):
    """Identity on (hidden, *decisions) whose backward runs only once the gradient of ``hidden``
    is there, i.e. after FSDP's pre-backward hook on the layer output has unsharded the layer."""

    @staticmethod
    def forward(ctx, hidden, *side):
        # Copies, not views: FSDP warns about views (an in-place op on one would skip its hook);
        # the originals are then garbage, so this costs a copy, not memory.
        return (hidden.clone(), *(s.clone() for s in side))

    @staticmethod
    def backward(ctx, grad_hidden, *grad_side):
        return (grad_hidden, *grad_side)


def _tie_hook(index: int, runtime):
    def hook(module, args, output):
        if runtime.mode != "train" or not torch.is_grad_enabled():
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        decision = runtime.last_decisions.get(index)
        if decision is None or not decision.requires_grad:
            return output
        hidden, runtime.last_decisions[index] = _TieSideOutputs.apply(hidden, decision)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def shard_student(student: nn.Module, mesh, device: torch.device) -> None:
    """``student`` wraps the DMS model as ``student.model``; sharded in place."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from dms.models.patch import runtime

    policy = _policy(device)
    rt = runtime(student.model)
    for i, layer in enumerate(student.model.model.layers):
        # Registered before fully_shard so it runs before FSDP's post-forward hook sees the output.
        layer.register_forward_hook(_tie_hook(i, rt))
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(student, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(student, "hidden")


def shard_teacher(teacher: nn.Module, mesh, device: torch.device):
    """Shard a frozen full-fine-tune teacher in place: layers + its decoder as the root. Its
    output head, outside any unit, becomes a sharded DTensor; returns ``gather_head``."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    policy = _policy(device)
    tied = teacher.lm_head.weight is teacher.model.embed_tokens.weight
    for layer in teacher.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # Explicit: a root keeps its weights gathered after forward until backward, which a teacher
    # never runs, so its embeddings would stay replicated.
    fully_shard(teacher.model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    if tied:
        head = teacher.model.embed_tokens.weight
    else:
        head = distribute_tensor(teacher.lm_head.weight.detach(), mesh, [Shard(0)])
    del teacher.lm_head.weight  # the full copy would be replicated on every process
    compute = policy.param_dtype or head.dtype

    def gather_head() -> nn.Module:
        with torch.no_grad():
            return _Head(head.full_tensor().to(compute))

    return gather_head


class _Head:
    """The teacher's output head, gathered: what kl_student_teacher reads of an nn.Linear."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self.bias = weight, None


def _policy(device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def local_rows(param: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tensor to write, row indices in it, which of ``rows`` they are): the process's own shard
    of a dim-0-sharded DTensor and the ``rows`` it holds (shifted), or the tensor and all ``rows``."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param, rows, torch.ones(rows.shape, dtype=torch.bool)
    local = param.to_local()
    n = param.shape[0]
    per = -(-n // param.device_mesh.size())  # FSDP2 shards dim 0 in torch.chunk pieces
    start = min(param.device_mesh.get_local_rank() * per, n)
    if local.shape[0] != min(per, n - start):
        raise RuntimeError(f"unexpected FSDP shard of {tuple(param.shape)}: local {tuple(local.shape)}")
    mine = (rows >= start) & (rows < start + local.shape[0])
    return local, rows[mine] - start, mine

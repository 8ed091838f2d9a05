"""Several processes: one rank per process under ``torchrun``, data-parallel, rank 0 writes.

Every rank holds the whole model (``strategy=ddp``) or a shard of it (``strategy=fsdp``, FSDP2's
``fully_shard``), works on its share of each step's batch, and divides its loss by the *global*
batch's count (answers or tokens, all-reduced), so that the gradients summed over ranks equal the
one-process gradient of the whole batch:

    g = sum_r d/dtheta [ sum_{i in shard r} l_i / N_global ] = d/dtheta [ sum_i l_i / N_global ]

Gradients are summed once per optimizer step, after the micro-batches (a ``ddp`` rank's number of
micro-batches may differ from another's, since answers with zero advantage are skipped and token
budgets split rows unevenly; a per-backward hook, as in torch's DDP wrapper, would deadlock on that).
FSDP2 runs collectives inside every forward, so under ``fsdp`` the ranks pad their micro-batch
counts to the largest one with empty passes (``equalise``), and the sampler runs unsharded.

One process (no ``torchrun``) is the world of size 1: every function here is then a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistributedConfig:
    # ddp: every rank holds the whole model, gradients summed once per optimizer step;
    # fsdp: parameters, gradients and optimizer state sharded over ranks (FSDP2 fully_shard)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # the number of processes this run must have (0: whatever the launcher started); set it so that a
    # launcher falling back to one process (accelerate launch --cpu does) is an error, not a quiet run
    world_size: int = 0
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPUs, gloo on CPUs
    timeout_minutes: float = 30.0  # a collective waiting longer than this fails instead of hanging

    def validate(self) -> None:
        if self.world_size < 0:
            raise ValueError(f"distributed.world_size must be >= 0 (0: any), got {self.world_size}")
        if self.timeout_minutes <= 0:
            raise ValueError("distributed.timeout_minutes must be > 0")


class World:
    """This process's place among the run's processes (rank, size), and the collectives the recipes use."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, strategy: str = "ddp"):
        self.rank, self.size, self.local_rank, self.strategy = rank, size, local_rank, strategy

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1 and self.strategy == "fsdp"

    def share(self, items: list, pieces: int = 1) -> list:
        """This rank's part of ``items``: each of ``pieces`` consecutive equal blocks split in ``size`` parts,
        rank r taking part r of every block. With pieces = number of minibatches, rank r's minibatch m
        is part r of the one-process minibatch m, so N ranks optimise the same minibatches as one."""
        if self.size == 1:
            return list(items)
        n = len(items)
        if n % (pieces * self.size):
            raise ValueError(f"{n} items do not split into {pieces} block(s) x {self.size} ranks")
        block, part = n // pieces, n // (pieces * self.size)
        return [items[b * block + self.rank * part + i] for b in range(pieces) for i in range(part)]

    def places(self, n: int, pieces: int = 1) -> torch.Tensor:
        """[n] the index in the whole batch of each of this rank's n items, as ``share`` dealt them."""
        part = n // pieces  # items per rank in each block of the batch
        local = torch.arange(n)
        return (local // part) * part * self.size + self.rank * part + local % part

    def local_rows(self, rows: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
        """The local indices of the items among ``rows`` (indices into the whole batch) this rank holds."""
        if self.size == 1:
            return rows
        position = torch.full((len(places) * self.size,), -1, dtype=torch.long)  # whole-batch index -> local
        position[places] = torch.arange(len(places))
        found = position[rows]
        return found[found >= 0]

    def sum(self, value):
        """The sum over ranks of a float or a tensor (returned as the same kind)."""
        if self.size == 1:
            return value
        tensor = torch.as_tensor(value, dtype=torch.float64).clone()
        dist.all_reduce(tensor)
        return float(tensor) if not isinstance(value, torch.Tensor) else tensor.to(value.dtype)

    def max(self, value: int) -> int:
        if self.size == 1:
            return value
        tensor = torch.tensor(value, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor)

    def sum_dict(self, values: dict) -> dict:
        """Each number in ``values`` summed over ranks; a key some ranks lack counts 0 there."""
        if self.size == 1:
            return values
        keys = sorted(set().union(*self.gather_objects(sorted(values))))
        summed = self.sum(torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64))
        return {k: float(v) for k, v in zip(keys, summed.tolist())}

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank-ordered concatenation along dim 0 of every rank's ``tensor`` (same shape on all ranks)."""
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_objects(self, obj) -> list:
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def sum_gradients(self, model: torch.nn.Module) -> None:
        """g <- sum over ranks of g, for every parameter with a gradient (in one flat all-reduce).

        A parameter without a gradient (every row skipped: zero advantage) gets a zero one, on one rank
        as on many, so skipping rows stays an optimisation: the optimizer steps as it would on zeros.
        Under fsdp the sharded parameters' gradients were already reduce-scattered in backward, as a
        mean over ranks (FSDP2's default; the sum it could do instead needs PREMUL_SUM, which gloo
        lacks), so they are multiplied by the number of ranks; the others (a value head outside the
        shards) are summed here.
        """
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.size == 1:
            return
        if self.sharded:
            for p in params:
                if _is_dtensor(p.grad):
                    p.grad.mul_(self.size)
        grads = [p.grad for p in params if not _is_dtensor(p.grad)]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Under fsdp, shard ``model`` in place (each decoder layer, then the root)."""
        if not self.sharded:
            return model
        from torch.distributed.fsdp import fully_shard

        layers = _decoder_layers(model)
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        log.info("FSDP2: %d decoder layers and the root sharded over %d ranks", len(layers), self.size)
        return model

    @contextlib.contextmanager
    def unsharded(self, model: torch.nn.Module):
        """Under fsdp, the whole parameters gathered on every rank for the duration (the sampler and the
        no-grad passes run a rank-dependent number of forwards, which per-forward gathers would deadlock)."""
        if not self.sharded or not hasattr(model, "unshard"):
            yield
            return
        modules = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "set_reshard_after_forward")]
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
        for m in modules:
            m.unshard()
        try:
            yield
        finally:
            for m in modules:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)

    # Under fsdp a checkpoint holds whole tensors (gathered on every rank, written by rank 0), so it is
    # an ordinary Hugging Face directory and resumes on any number of ranks.

    def full_model_state(self, model: torch.nn.Module) -> dict | None:
        """The whole weights of a sharded model (a collective: every rank calls it); None when unsharded."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_model_state(self, model: torch.nn.Module, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self, model: torch.nn.Module, optimizer) -> dict:
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model: torch.nn.Module, optimizer, state: dict) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def equalise(self, count: int) -> int:
        """The number of micro-batch passes every rank must run: its own under ddp, the largest under fsdp."""
        return self.max(count) if self.sharded else count


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers causal LM (model.model.layers), the units FSDP shards."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList):
            return list(module)
    return []


_WORLD = World()


def launched_world_size() -> int:
    """How many processes the launcher started (WORLD_SIZE), known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world() -> World:
    """The world this process is part of (size 1 until ``init_world`` runs under a launcher)."""
    return _WORLD


def init_world(config: DistributedConfig) -> World:
    """Join the process group that ``torchrun`` (or ``accelerate launch``) describes in the environment.

    Checks the expected world size, so that a launcher that quietly started one process (or a
    different number) stops the run at once. Idempotent: a second call returns the same world.
    """
    global _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.world_size and size != config.world_size:
        raise RuntimeError(
            f"distributed.world_size={config.world_size}, but this process is one of {size} "
            f"(WORLD_SIZE={os.environ.get('WORLD_SIZE', 'unset')}): the launcher started a different number "
            "of processes (accelerate launch --cpu, for one, runs a single process); launch with "
            f"torchrun --nproc_per_node {config.world_size}")
    if size == 1:
        _WORLD = World(strategy=config.strategy)
        return _WORLD
    if not dist.is_initialized():
        backend = config.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=config.timeout_minutes))
    _WORLD = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                   config.strategy)
    if _WORLD.is_main:
        log.info("distributed: %d ranks (%s, %s)", _WORLD.size, dist.get_backend(), config.strategy)
    return _WORLD


def shutdown_world() -> None:
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()

"""How a model is spread over devices and compiled: the one place to change sharding.

* ``parallelize(model, mesh, compile=...)``: what ``MoDLightningModule.configure_model`` applies
  under every Lightning strategy. With a device mesh (``ModelParallelStrategy``, FSDP2) each
  transformer block becomes its own ``fully_shard`` unit and the root holds the rest (embedding,
  final norm, LM head), so the tied embedding / LM head weight lives in one unit only, as FSDP
  requires of a shared parameter. Without a mesh (one device, DDP) nothing is sharded here.
* ``without_graphs(compile, mode)``: what a pass without backward runs in (eagerly, for blocks
  compiled with CUDA graphs).
* ``end_process_group()``: what the command line calls on every rank once a run has succeeded.

FSDP2 is the one sharded strategy (``configs/fsdp.yaml``): Lightning's ``FSDPStrategy`` (FSDP1) refuses the
CPU, where every test here runs, and FSDP2's per-parameter sharding covers what it did. Routing is decided
by the config, not by a block's class, so sharded blocks route as before; routers and predictors (a few
thousand parameters each) stay in the root unit.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..model.errors import UserError


def fsdp_mesh(mesh):
    """The FSDP2 mesh to use from ``ModelParallelStrategy``'s (data_parallel, tensor_parallel) mesh.

    modlm has no tensor parallelism; both dimensions shard or replicate parameters. The strategy's
    "auto" sizes give (nodes, devices per node): shard within a node, replicate across nodes (HSDP,
    a 2-D mesh to ``fully_shard``). A dimension of size 1 is dropped, so a 1-node run, or
    ``data_parallel_size=world, tensor_parallel_size=1``, shards over every rank (plain FSDP).
    Every rank reads different data either way (the data module shards by global rank).
    """
    if mesh.ndim == 1:
        return mesh
    outer, inner = mesh.mesh_dim_names
    if mesh[inner].size() == 1:
        return mesh[outer]
    if mesh[outer].size() == 1:
        return mesh[inner]
    return mesh


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""``torch.compile`` modes that capture CUDA graphs."""


def parallelize(
    model: nn.Module, mesh=None, compile: bool = False, mode: Optional[str] = None, accumulation: int = 1
) -> nn.Module:
    """Compile each transformer block (if asked, in ``torch.compile``'s ``mode``), then shard blocks
    and root over ``mesh`` (FSDP2).

    The order is torchtitan's and nanoGPT's: compile, then shard. With ``Module.compile`` the two
    orders give the same program (compilation is in place and traces lazily, at the first call,
    after the FSDP2 hooks exist; FSDP2 marks its hooks as not traceable, so its all-gathers and
    reshards run eagerly around each compiled block either way). Compiling first is also the order
    that stays right if this ever uses ``torch.compile(block)``, which returns a wrapper: FSDP must
    then wrap the compiled module, so that its hooks stay outside the compiled code. Returns
    ``model``, modified in place.

    Every block of one kind is one graph (a block's computation does not depend on where it sits),
    so depth costs no recompilation. CUDA graphs (``mode="reduce-overhead"`` or ``"max-autotune"``)
    replay each block's kernels with one launch and its memory at fixed addresses: what a
    launch-bound small model needs on one GPU; under FSDP2 each step all-gathers the weights into
    new memory, so those modes are refused with a mesh (``max-autotune-no-cudagraphs`` is fine).
    They are refused with gradient accumulation (``accumulation`` batches per optimizer step) too:
    the second backward of a step adds into gradients that the first one's graph owns, which torch
    reports as "accessing gradient tensor output of CUDAGraphs that has been overwritten". Passes
    without backward run without graphs (``without_graphs``).
    """
    if compile and mode in CUDA_GRAPH_MODES:
        if mesh is not None:
            raise UserError(
                f"--model.compile_mode {mode} captures CUDA graphs, which FSDP2's all-gathered weights do "
                "not fit: use max-autotune-no-cudagraphs (or default) with a sharded model"
            )
        if accumulation > 1:
            raise UserError(
                f"--model.compile_mode {mode} captures CUDA graphs, whose gradients gradient accumulation "
                f"(--trainer.accumulate_grad_batches {accumulation}) would overwrite: accumulate with "
                "max-autotune-no-cudagraphs (or default)"
            )
    if compile:
        for block in model.blocks:
            block.compile(mode=mode)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        mesh = fsdp_mesh(mesh)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def without_graphs(compile: bool, mode: Optional[str]) -> Iterator[None]:
    """What a pass without backward (validation, calibration) runs in: for blocks compiled with
    CUDA graphs (``mode`` in ``CUDA_GRAPH_MODES``), eagerly (``torch.compiler.set_stance
    ("force_eager")``, which leaves the compiled code cached for training); otherwise compiled.

    Why: torch's CUDA-graph trees begin a new generation at every compiled call while no backward is
    pending, and a new generation frees the outputs of the one before. Blocks are compiled one by
    one, so in a pass without backward block i + 1 reads block i's output after it was overwritten
    ("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run"); in a
    training step the pending backward keeps the whole forward in one generation. The causal pass
    of validation would also record a new graph for every new count of picked tokens. Eager, these
    passes pay their launches, a small share of a run. Read from torch 2.13's
    ``torch/_inductor/cudagraph_trees.py``; the CPU tests check that no compiled code runs in them,
    not the graphs themselves (no GPU has run this yet).
    """
    if compile and mode in CUDA_GRAPH_MODES:
        with torch.compiler.set_stance("force_eager"):
            yield
    else:
        yield


def end_process_group(settle_s: float = 0.25) -> None:
    """Destroy the process group a finished run leaves, then let gloo's threads finish with Python.

    A gloo collective issued during ``backward`` keeps that thread's state, which holds a Python
    object (autograd's saved context), and the gloo worker thread that ran it frees it, taking the
    GIL, a moment after the collective completes. If the interpreter has begun to shut down by
    then, that thread is killed inside C++ and the process aborts ("terminate called without an
    active exception", SIGABRT) after a run that succeeded; the launcher reports a failed rank and
    the other node's agent waits out its exit barrier. Sleeping hands the GIL to those threads
    while Python is alive: in a two-process FSDP2 script on gloo that exits right after its last
    backward, 14 of 70 launches aborted without it and none of 100 with it. Call this after the
    run's last collective: it is local and waits for no other rank. No group, nothing to do.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(settle_s)

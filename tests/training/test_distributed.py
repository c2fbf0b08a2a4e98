"""Data parallel and sharded training on 2 CPU processes (gloo), and reduced precision.

Each distributed test trains 8 steps in one go and, separately, 4 steps then 4 more resumed from
``--ckpt_path last``; the resumed steps must log the same losses as the uninterrupted run (the
LR schedule is pinned to 8 steps with ``--model.lr_decay_steps`` so both plan the same run).
"""

import pytest
import torch
import torch.distributed as dist

from modlm import ModelConfig, MoDTransformer
from modlm.model.errors import UserError
from tests.helpers import (
    assert_same_losses_after_resume as assert_same_losses_after_resume_,
)
from tests.helpers import (
    free_port,
    run_train,
    scalars,
    tiny_args,
)

pytestmark = pytest.mark.slow

N, K = 8, 4
TWO_CPUS = (
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "2",
    "--model.lr_decay_steps",
    str(N),
    "--checkpoint.every_n_train_steps",
    str(K),
    "--trainer.val_check_interval",
    str(K),
)


def train_and_resume(tmp_path, data, *strategy: str) -> tuple[dict, dict]:
    """Scalars of an N-step run, and of a K-step run resumed to N; asserts every process exited 0."""
    full = run_train("fit", *tiny_args(tmp_path / "full", data, *TWO_CPUS, *strategy, "--trainer.max_steps", str(N)))
    assert full.returncode == 0, full.stderr[-4000:]
    first = run_train("fit", *tiny_args(tmp_path / "cut", data, *TWO_CPUS, *strategy, "--trainer.max_steps", str(K)))
    assert first.returncode == 0, first.stderr[-4000:]
    assert (tmp_path / "cut" / "checkpoints" / "last.ckpt").exists()
    resumed = run_train(
        "fit",
        *tiny_args(tmp_path / "cut", data, *TWO_CPUS, *strategy, "--trainer.max_steps", str(N), "--ckpt_path", "last"),
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return (
        scalars(tmp_path / "full" / "lightning_logs" / "version_0"),
        scalars(tmp_path / "cut" / "lightning_logs" / "version_0"),
    )  # the resumed run goes on in it


def assert_same_losses_after_resume(want: dict, got: dict) -> None:
    assert_same_losses_after_resume_(want, got, K, N)
    assert want["train/loss"][N - 1] < want["train/loss"][0]  # it learns


def test_ddp_two_processes_train_and_resume(tmp_path, tiny_tokenizer):
    want, got = train_and_resume(tmp_path, tiny_tokenizer, "--trainer.strategy", "ddp")
    assert_same_losses_after_resume(want, got)


def test_fsdp2_two_processes_train_and_resume(tmp_path, tiny_tokenizer):
    """ModelParallelStrategy with its default mesh (1 node x 2 devices): configure_model shards every
    block and the root with fully_shard over the 2 ranks; checkpoints are sharded folders."""
    strategy = ("--trainer.strategy", '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}')
    want, got = train_and_resume(tmp_path, tiny_tokenizer, *strategy)
    assert_same_losses_after_resume(want, got)
    assert (tmp_path / "cut" / "checkpoints" / "last.ckpt").is_dir()  # a distributed checkpoint

    # The sharded folder is read like any checkpoint (consolidated by torch's distributed-checkpoint
    # tools): it evaluates to the loss the run validated on, and generates.
    import json

    from modlm.cli.eval import main as eval_main
    from modlm.cli.generate import main as generate_main

    sharded = tmp_path / "full" / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval.json"
    assert eval_main([str(sharded), "--json", str(out), "--quiet", "--decode_tokens", "2", "--prompt_tokens", "2"]) == 0
    assert json.loads(out.read_text())["topk.loss"] == pytest.approx(want["val/loss"][N - 1], abs=1e-5)
    assert generate_main([str(sharded), "def f(", "--max_new_tokens", "4"]) == 0


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true"])
def test_reduced_precision_single_process(tmp_path, tiny_tokenizer, precision):
    root = tmp_path / precision
    done = run_train(
        "fit", *tiny_args(root, tiny_tokenizer, "--trainer.precision", precision, "--trainer.max_steps", "10")
    )
    assert done.returncode == 0, done.stderr[-4000:]
    logged = scalars(root / "lightning_logs" / "version_0")
    losses = [logged["train/loss"][s] for s in sorted(logged["train/loss"])]
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    weights = torch.bfloat16 if precision == "bf16-true" else torch.float32  # mixed: fp32 master weights
    assert all(v.dtype == weights for v in ckpt["state_dict"].values())


def test_parallelize_compiles_then_shards_every_block_and_the_root():
    """The sharding layer of compilation, FSDP2 on a 1-process gloo group: ``parallelize`` makes
    each block and the root a ``fully_shard`` unit, a block compiled before it is sharded stays
    compiled, a mesh's size-1 dimension is dropped, and the sharded model computes what the plain
    one does. (How the module's ``compile`` flag reaches the blocks, and that compiled blocks
    compute the eager step, is ``test_module.py``'s layer.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from modlm.training.parallel import fsdp_mesh, parallelize

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        assert fsdp_mesh(mesh).ndim == 1
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_seq_len=16, capacity=0.25)
        plain, compiled, sharded = MoDTransformer(cfg), MoDTransformer(cfg), MoDTransformer(cfg)
        sharded.load_state_dict(plain.state_dict())
        parallelize(compiled, mesh, compile=True)
        assert isinstance(compiled, FSDPModule) and all(isinstance(b, FSDPModule) for b in compiled.blocks)
        assert all(b._compiled_call_impl is not None for b in compiled.blocks)
        parallelize(sharded, mesh)
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        assert sharded(x, targets=x).loss.item() == pytest.approx(plain(x, targets=x).loss.item(), abs=1e-6)
        # CUDA graphs keep memory at fixed addresses, which FSDP2's all-gathered weights are not
        with pytest.raises(UserError, match="reduce-overhead"):
            parallelize(MoDTransformer(cfg), mesh, compile=True, mode="reduce-overhead")
        parallelize(MoDTransformer(cfg), mesh, compile=True, mode="max-autotune-no-cudagraphs")
    finally:
        dist.destroy_process_group()


def test_end_process_group_leaves_no_group_and_needs_none():
    """What the command line calls after a run that succeeded: the group is gone afterwards (so
    gloo's threads are not left to the interpreter's shutdown), and a run without one is left alone."""
    from modlm.training.parallel import end_process_group

    end_process_group(settle_s=0)  # no group: nothing to do, no error
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        dist.all_reduce(torch.ones(3))
        end_process_group(settle_s=0)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

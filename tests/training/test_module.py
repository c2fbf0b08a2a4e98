"""The LightningModule: loss, logged metrics, optimizer groups, LR schedule, checkpoints, NaN guard.

Random token windows and tiny models; every test fixes its seed and asserts an exact property.
"""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from modlm.flops import training_flops
from modlm.training.batch import split_batch
from modlm.training.callbacks import NonFiniteLossError, NonFiniteLossGuard
from modlm.training.checkpoint import CheckpointMismatchError
from modlm.training.module import MoDLightningModule
from modlm.training.optim import WarmupCosine, param_groups

V, T = 64, 16
TINY = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=T, capacity=0.25, route_every=2)


def module(**overrides) -> MoDLightningModule:
    torch.manual_seed(0)
    return MoDLightningModule(**{**TINY, "warmup_steps": 2, **overrides})


def windows(n=32, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (n, T + 1), generator=torch.Generator().manual_seed(seed))


def trainer(tmp_path, max_steps=4, **kwargs) -> pl.Trainer:
    defaults = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        val_check_interval=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_training_loss_is_cross_entropy_plus_aux():
    m = module()
    batch = windows(4)
    step = m.training_step(batch, 0)
    out = m.model(batch[:, :-1], routing="topk", targets=batch[:, 1:])
    assert out.aux_loss.item() > 0  # a routed model with a predictor has a real aux loss
    torch.testing.assert_close(step["loss"], out.loss + out.aux_loss, rtol=0, atol=0)
    report = step["report"]  # what the callbacks read: this step's mixtures and FLOPs
    assert [r.layer for r in report.mixtures] == [r.layer for r in out.routing] and report.mixtures
    assert all(torch.equal(a.selected, b.selected) for a, b in zip(report.mixtures, out.routing))
    assert report.flops == m.flops_per_batch == training_flops(m.config, T) * 4


@pytest.mark.parametrize("form", ["tensor", "pair", "dict"])
def test_split_batch_forms_agree(form):
    b = windows(2)
    given = {"tensor": b, "pair": (b[:, :-1], b[:, 1:]), "dict": {"input_ids": b[:, :-1], "targets": b[:, 1:]}}[form]
    x, y = split_batch(given)
    assert torch.equal(x, b[:, :-1]) and torch.equal(y, b[:, 1:])


@pytest.mark.parametrize("route_every", [2, 0])
def test_logged_metrics(tmp_path, route_every):
    m = module(route_every=route_every)
    t = trainer(tmp_path)
    t.fit(m, DataLoader(windows(), batch_size=4), DataLoader(windows(8, seed=2), batch_size=4))
    got = t.callback_metrics
    assert {"train/loss", "train/aux_loss", "val/loss", "val/ppl"} <= set(got)
    assert got["val/ppl"].item() == pytest.approx(math.exp(got["val/loss"].item()), rel=1e-5)
    if route_every:
        assert got["val/ppl_causal"].item() == pytest.approx(math.exp(got["val/loss_causal"].item()), rel=1e-5)
    else:
        assert "val/loss_causal" not in got and got["train/aux_loss"].item() == 0.0


def test_validation_loss_is_token_mean_over_batches(tmp_path):
    m = module()
    val = windows(8, seed=2)
    t = trainer(tmp_path)
    (metrics,) = t.validate(m, DataLoader(val, batch_size=4), verbose=False)
    with torch.no_grad():
        m.eval()
        expected = m.model(val[:, :-1], targets=val[:, 1:]).loss.item()
        causal = m.model(val[:, :-1], routing="causal", targets=val[:, 1:]).loss.item()
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["val/loss_causal"] == pytest.approx(causal, rel=1e-5)


def test_param_groups_decay_matrices_only_and_count_tied_weight_once():
    m = module()
    decay, no_decay = param_groups(m.model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert any(p is m.model.embed.weight for p in decay["params"])  # embed == lm_head, listed once
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == m.model.num_params()


def test_warmup_cosine_shape():
    s = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0) and s(60) == pytest.approx(0.55)
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="steps"):
        WarmupCosine(10, 0, 0.1)


def test_schedule_spans_max_steps(tmp_path):
    m = module(lr=1e-2, warmup_steps=2, min_lr_ratio=0.0)
    t = trainer(tmp_path, max_steps=6, limit_val_batches=0)
    t.fit(m, DataLoader(windows(), batch_size=4))
    fn = t.lr_scheduler_configs[0].scheduler.lr_lambdas[0]  # one per param group, the same object
    assert fn.total_steps == 6
    # after 6 steps the cosine has reached its floor (0) exactly
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_no_max_steps_is_a_clear_error(tmp_path):
    m = module()
    t = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="max_steps"):
        t.fit(m, DataLoader(windows(), batch_size=4))


def test_checkpoint_rebuilds_model_with_no_other_input(tmp_path):
    m = module(capacity=0.5)
    t = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    t.fit(m, DataLoader(windows(), batch_size=4))
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    loaded = MoDLightningModule.load_from_checkpoint(path)
    assert loaded.config == m.config
    x = windows(2)[:, :-1]
    m.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(m.model(x).logits, loaded.model(x).logits)


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    """The module's layer: loading a checkpoint whose tensors do not fit the module
    (``on_load_checkpoint``) raises ``CheckpointMismatchError`` naming the tensors and both shapes,
    before torch's longer ``load_state_dict`` error. (The command line refuses another shape earlier,
    by its hyperparameters: ``test_train.py``.)"""
    m = module()
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(m, DataLoader(windows(), batch_size=4))
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    other = module(d_model=48, n_heads=2)
    t2 = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    with pytest.raises(CheckpointMismatchError, match=r"embed\.weight: checkpoint \(64, 32\) vs model \(64, 48\)"):
        t2.fit(other, DataLoader(windows(), batch_size=4), ckpt_path=path)


def test_non_finite_loss_stops_before_any_checkpoint(tmp_path):
    """The guard's layer: ``NonFiniteLossGuard`` raises at the first non-finite loss, naming that
    step, before its backward and before a checkpoint of it is written (every earlier one kept).
    How a run of the command line reports it and keeps its own checkpoints is ``test_train.py``'s."""
    data = windows()
    m = module(lr=1e-3)
    bad_step = 3

    class Poison(pl.Callback):
        """Turn the loss into NaN at one step, as a diverging run would."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == bad_step - 1:
                pl_module.model.norm.weight.data.fill_(float("nan"))

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_last=True, save_top_k=-1)
    t = trainer(
        tmp_path,
        max_steps=6,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[Poison(), NonFiniteLossGuard(), ckpt],
    )
    with pytest.raises(NonFiniteLossError, match=f"step {bad_step}"):
        t.fit(m, DataLoader(data, batch_size=4))
    saved = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert saved == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["global_step"] == bad_step - 1


@pytest.mark.slow
def test_compile_flag_compiles_each_block_and_the_compiled_blocks_compute_the_eager_step():
    """The module's layer of compilation: ``compile=True`` reaches every block through
    ``configure_model`` (idempotent: validate/test after fit call it again) and the compiled blocks,
    with torch's default backend (inductor), compute the eager model's loss and gradients. That
    ``parallelize`` keeps the compile when it shards is ``test_distributed.py``'s layer. One routed
    block, so inductor compiles once (forward and backward, about 15 s on a CPU)."""
    from torch._dynamo.utils import counters

    shape = dict(n_layers=1, route_every=1)
    compiled, eager = module(**shape, compile=True), module(**shape)
    compiled.configure_model()
    compiled.configure_model()
    eager.configure_model()
    assert all(block._compiled_call_impl is not None for block in compiled.model.blocks)
    assert all(block._compiled_call_impl is None for block in eager.model.blocks)
    torch._dynamo.reset()
    counters.clear()
    batch = windows(4)
    losses = []
    for m in (compiled, eager):
        out = m.model(batch[:, :-1], routing="topk", targets=batch[:, 1:])
        (out.loss + out.aux_loss).backward()
        losses.append((out.loss, out.aux_loss))
    assert counters["stats"]["unique_graphs"] >= 1, "the compiled block never ran"
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(compiled.model.named_parameters(), eager.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_validation_charges_the_causal_pass_at_what_it_computed():
    """A validation step runs a top-k pass and a causal pass; the causal one is charged at the
    tokens its padded batches held (the most any row picked), not at top-k's k."""
    from modlm.flops import forward_flops

    m = module().eval()
    batch = windows(4)
    with torch.no_grad():
        report = m.validation_step(batch, 0)["report"]
        causal = m.model(batch[:, :-1], routing="causal")
    k_max = [int(r.selected.sum(dim=1).max()) for r in causal.routing]
    assert k_max != [m.config.topk_tokens(T)] * len(k_max), "the test needs a causal pass of another size"
    want = 4 * (forward_flops(m.config, T) + forward_flops(m.config, T, tokens_per_routed_block=k_max))
    assert report.flops == want == m.flops_per_batch
    assert [torch.equal(a.selected, b.selected) for a, b in zip(report.causal_mixtures, causal.routing)] == [
        True
    ] * len(k_max)

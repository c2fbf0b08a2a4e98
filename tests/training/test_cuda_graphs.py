"""Blocks compiled with CUDA graphs (``--model.compile_mode reduce-overhead`` or ``max-autotune``):
passes without backward (validation, the calibration of every save) run eagerly, and gradient
accumulation is refused in one line.

No GPU here: torch's CUDA-graph trees cannot run, so what is checked is where compiled code runs.
Every compiled function is forced onto a backend that runs the traced code as it is and notes
whether autograd was recording (``torch.compiler.set_stance(force_backend=...)``, in place of
inductor and its graphs); it must never run in a pass without backward. Why those passes break
under CUDA graphs is ``modlm.training.parallel.without_graphs``'s docstring."""

import pytest
import torch
from torch.utils.data import DataLoader

from modlm.cli.train import main as train_main
from modlm.model.errors import UserError
from modlm.training.parallel import parallelize
from tests.helpers import tiny_args
from tests.training.test_module import module, trainer, windows


def compiled_runs() -> tuple[list, object]:
    """A dynamo backend that runs the traced code as it is and notes, at every run, whether autograd
    was recording: forced on every compiled function (``torch.compiler.set_stance``'s
    ``force_backend``) in place of inductor and its CUDA graphs, which need a GPU."""
    runs = []

    def backend(graph, example_inputs):
        def run(*args):
            runs.append(torch.is_grad_enabled())
            return graph(*args)

        return run

    return runs, backend


@pytest.mark.slow  # dynamo traces the block: 2-4 s
@pytest.mark.parametrize("mode, graphs", [("reduce-overhead", True), (None, False)])
def test_passes_without_backward_run_no_compiled_code_under_cuda_graphs(mode, graphs):
    """With blocks compiled into CUDA graphs, a validation step runs eagerly (its passes have no
    backward, so CUDA-graph trees would free each block's output before the next block reads it);
    training steps run the compiled blocks, and without CUDA graphs so does validation."""
    runs, backend = compiled_runs()
    m = module(compile=True, compile_mode=mode, n_layers=1, route_every=1)  # one block: one graph to trace
    m.configure_model()
    torch._dynamo.reset()
    batch = windows(4)
    with torch.compiler.set_stance("default", force_backend=backend):
        m.training_step(batch, 0)["loss"].backward()
        assert runs and all(runs), "the training step must run the compiled blocks"
        runs.clear()
        with torch.no_grad():
            m.validation_step(batch, 0)
    assert (runs == []) == graphs, runs


def test_gradient_accumulation_under_cuda_graphs_is_refused_in_one_line(tmp_path):

    m = module(compile=True, compile_mode="reduce-overhead")
    with pytest.raises(UserError, match=r"accumulate_grad_batches 2") as err:
        trainer(tmp_path, accumulate_grad_batches=2).fit(m, DataLoader(windows(8), batch_size=4))
    assert "\n" not in str(err.value)
    for mode in ("default", "max-autotune-no-cudagraphs"):  # compiled without CUDA graphs: accumulating is fine
        parallelize(module().model, compile=True, mode=mode, accumulation=2)


@pytest.mark.slow  # a tiny fit, its blocks traced by dynamo: ~20 s
def test_a_fit_runs_compiled_code_only_in_passes_with_a_backward(tmp_path, tiny_tokenizer):
    """Training steps run the compiled blocks; the sanity check, both validations and both saves'
    calibrations do not, and the saves still carry their calibrated thresholds."""
    runs, backend = compiled_runs()
    args = tiny_args(
        tmp_path,
        tiny_tokenizer,
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "2",
        "--checkpoint.every_n_train_steps",
        "2",
        "--trainer.num_sanity_val_steps",
        "1",
        "--model.compile",
        "true",
        "--model.compile_mode",
        "reduce-overhead",
    )
    torch._dynamo.reset()
    with torch.compiler.set_stance("default", force_backend=backend):
        assert train_main(["fit", *args]) == 0
    assert runs and all(runs), f"{runs.count(False)} compiled runs without autograd"
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    thresholds = [v for k, v in saved["state_dict"].items() if k.endswith(".decision.threshold")]
    assert saved["global_step"] == 4 and len(thresholds) == 1 and float(thresholds[0]) != 0.0

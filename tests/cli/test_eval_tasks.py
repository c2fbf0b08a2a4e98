"""``modlm-eval CKPT --tasks ...``: lm-evaluation-harness tasks from the command line, on local tasks
(JSON files and lm-eval YAML written here, ``tests.helpers.harness_tasks``): a dense model's figures
are lm-eval's own ``hf`` model's on the same folder, a routed model's JSON states its routing, what
each routed block processed and whether its scores leak, and bad input is one line with nothing
written. lm-eval's task loading takes seconds per run: every test here is slow."""

from __future__ import annotations

import json

import pytest

from modlm.cli.eval import main as eval_main
from tests.helpers.harness_tasks import TASKS, harness_model, harness_tokenizer, write_tasks

pytestmark = pytest.mark.slow
ALL = ",".join(TASKS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The three local tasks, and two models as transformers folders with their tokenizer: a dense one
    (a standard LlamaForCausalLM folder) and a routed one (modlm's remote-code folder)."""
    root = tmp_path_factory.mktemp("harness")
    tokenizer = harness_tokenizer()
    found = {"tasks": write_tasks(root / "tasks", questions=12)}
    for name, routed in (("dense", False), ("routed", True)):
        kind = harness_model(routed, max_seq_len=64).to_hf(root / name, tokenizer=tokenizer)
        assert kind == ("remote-code" if routed else "standard")
        found[name] = root / name
    return found


def run(folders, model: str, out, *extra) -> tuple[int, dict]:
    argv = [
        str(folders[model]),
        "--tasks",
        ALL,
        "--include_path",
        str(folders["tasks"]),
        "--json",
        str(out),
        "--quiet",
        "--device",
        "cpu",
        *map(str, extra),
    ]
    code = eval_main(argv)
    return code, (json.loads(out.read_text()) if code == 0 else {})


def test_dense_figures_equal_lm_evals_hf_model_on_the_same_folder(folders, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    code, ours = run(folders, "dense", tmp_path / "ours.json", "--num_fewshot", 1, "--limit", 8, "--batch_size", 3)
    assert code == 0
    hf = HFLM(pretrained=str(folders["dense"]), device="cpu", batch_size=1, dtype="float32")
    local = TaskManager(include_path=str(folders["tasks"]), include_defaults=False)
    theirs = lm_eval.simple_evaluate(
        model=hf, tasks=list(TASKS), num_fewshot=1, limit=8, log_samples=False, task_manager=local
    )
    compared = 0
    for task, metrics in theirs["results"].items():
        for name, value in metrics.items():
            if "," not in name or not isinstance(value, float):
                continue
            metric, _ = name.split(",")
            assert ours[f"harness.{task}.{metric}"] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, metric)
            compared += 1
    assert compared >= 9  # acc, acc_norm, three perplexities, exact_match and their standard errors
    assert 0 < ours["harness.docstring_mc.acc"] < 1 and ours["harness.docstring_mc.samples"] == 8
    assert ours["harness.docstring_mc.num_fewshot"] == 1 and ours["harness.routing"] == "causal"
    assert ours["harness.leaking"] is False and not any("capacity_used" in key for key in ours)
    assert ours["harness.stdlib_ppl.flops_per_token"] > 0 and ours["harness.docstring_gen.tokens"] > 0


def test_routed_model_states_its_routing_and_what_each_block_processed(folders, tmp_path):
    code, causal = run(folders, "routed", tmp_path / "causal.json")
    assert code == 0
    code, topk = run(folders, "routed", tmp_path / "topk.json", "--routing", "topk")
    assert code == 0
    assert causal["harness.routing"] == "causal" and causal["harness.leaking"] is False
    assert topk["harness.routing"] == "topk" and topk["harness.leaking"] is True
    assert topk["harness.docstring_mc.leaking"] and topk["harness.stdlib_ppl.leaking"]
    assert not topk["harness.docstring_gen.leaking"]  # a generated token sees nothing after it under either routing
    for task in TASKS:
        for layer in (1, 3):
            share = causal[f"harness.{task}.capacity_used.layer_{layer}"]
            assert 0.05 < share < 0.95 and share != 0.5, (task, layer, share)
    # top-k processes k = floor(T / 2) of every row of T tokens: at most half, at least half less one per row
    shares = [topk[f"harness.{task}.capacity_used.layer_3"] for task in TASKS]
    assert all(0.4 < s <= 0.5 for s in shares)
    assert causal["harness.stdlib_ppl.word_perplexity"] != topk["harness.stdlib_ppl.word_perplexity"]
    assert causal["harness.stdlib_ppl.flops_per_token"] != topk["harness.stdlib_ppl.flops_per_token"]
    assert causal["harness.tokens"] == sum(causal[f"harness.{task}.tokens"] for task in TASKS)


def test_an_unknown_task_names_the_closest_known_ones_and_writes_nothing(folders, tmp_path, capsys):
    out = tmp_path / "out.json"
    out.write_text("{}\n")  # an older result must survive a failed run untouched
    argv = [str(folders["dense"]), "--include_path", str(folders["tasks"]), "--json", str(out), "--quiet"]
    assert eval_main([*argv, "--tasks", "docstring_mc,hellaswg"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "unknown task 'hellaswg'" in err and "closest: hellaswag" in err
    assert eval_main([*argv, "--tasks", "docstring_mcq"]) == 2
    assert "closest: docstring_mc" in capsys.readouterr().err
    assert out.read_text() == "{}\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_hub_task_while_offline_says_so_in_one_line(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "out.json"
    assert eval_main([str(folders["dense"]), "--tasks", "arc_easy", "--json", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "task arc_easy: its data is on the Hugging Face Hub (allenai/ai2_arc)" in err
    assert "offline mode is on (HF_DATASETS_OFFLINE" in err
    assert not out.exists()

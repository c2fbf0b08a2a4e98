"""What the command lines print for ``--help`` and for a mistake.

``--help`` explains every flag modlm defines (the model's, the data's, the callbacks'), under group
titles that are whole sentences; a mistyped flag or subcommand is one line naming the closest valid
ones, with exit status 2 and no usage.
"""

import re
from dataclasses import fields

import pytest

from modlm.cli import eval as eval_cli
from modlm.cli import generate as generate_cli
from modlm.cli import prepare as prepare_cli
from modlm.cli.train import main
from modlm.model.config import ModelConfig

MODLM_GROUPS = (
    "model",
    "data",
    "preemption",
    "routing_stats",
    "flops",
    "routing_heatmap",
    "dashboard",
    "throughput",
    "harness",
)
LINKED = {"vocab_size", "max_seq_len"}  # set from the data's arguments, shown under "Linked arguments"


def fit_help(capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def help_entries(text: str) -> dict[str, str]:
    """``{"--model.capacity": "Fraction of a sequence ..."}``: each option's help, its trailing
    ``(type: ..., default: ...)`` cut off (argparse's layout: the flag two spaces in, its aliases
    after commas, its help after two or more spaces or on the lines below, 24 spaces in)."""
    entries, current = {}, None
    for line in text.splitlines():
        # a list flag has its appending twin beside it: "--model.capacities CAPACITIES, --model.capacities+ ..."
        start = re.match(r"^  (--[\w.]+)(?: \S+)?(?:, --[\w.]+\+?(?: \S+)?)*(?: {2,}(.*))?$", line)
        if start:
            current = start.group(1)
            entries[current] = start.group(2) or ""
        elif current and line.startswith(" " * 24):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {flag: re.sub(r"\s*\(type: .*\)\s*$", "", help_).strip() for flag, help_ in entries.items()}


def test_every_flag_modlm_defines_is_explained(capsys):
    entries = help_entries(fit_help(capsys))
    model_fields = {f.name for f in fields(ModelConfig)} - LINKED
    assert {f"--model.{name}" for name in model_fields} <= set(entries)
    ours = {flag: text for flag, text in entries.items() if flag.split(".")[0][2:] in MODLM_GROUPS and "." in flag}
    assert len(ours) > 50
    unexplained = sorted(flag for flag, text in ours.items() if not text)
    assert not unexplained, unexplained
    assert entries["--model.capacity"].startswith("Fraction of a sequence each routed block processes")


def test_group_titles_are_whole_sentences_and_linked_arguments_have_help(capsys):
    text = fit_help(capsys)
    titles = [line[:-1] for line in text.splitlines() if re.match(r"^\S.*:$", line)]
    assert len(titles) > 10
    for title in titles:
        assert title.count("(") == title.count(")") and title.count("``") % 2 == 0, title
    linked = text.split("Linked arguments:")[1]
    assert "lacks type and help" not in linked
    assert "Number of token ids" in linked and "Longest sequence the model accepts" in linked


@pytest.mark.parametrize(
    "argv, wanted",
    [
        (["fit", "--model.capcity", "0.3"], "unknown option --model.capcity (did you mean --model.capacity?)"),
        (["fit", "--trainer.max_stpes=3"], "unknown option --trainer.max_stpes (did you mean --trainer.max_steps?)"),
        (["fti"], "unknown command 'fti': did you mean fit?"),
        (["fit", "--model.capacity", "lots"], 'Parser key "model.capacity": Expected a'),
    ],
)
def test_a_mistake_is_one_line_with_the_closest_names_and_exit_2(argv, wanted, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("modlm: error: ") and wanted in err and "--help lists every option" in err


@pytest.mark.parametrize(
    "cli, argv, wanted",
    [
        (eval_cli, ["run.ckpt", "--data.bach_size", "3"], "--data.batch_size"),
        (prepare_cli, ["corpus", "out", "--num-proc", "3"], "--num_proc"),
        (generate_cli, ["run.ckpt", "--temprature", "0.5"], "--temperature"),
    ],
)
def test_the_other_commands_answer_a_mistyped_flag_in_one_line(cli, argv, wanted, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"did you mean {wanted}?" in err, err

"""The README holds to the code: every relative link in README.md and docs/ leads to a file, and the
quickstart's commands run (shortened to a tiny run), parsed from README.md itself so the two cannot drift."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, run_train, tiny_args

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    """The link targets of a Markdown page that name a file of this repository (no URL, no bare anchor)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # code blocks hold no links
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file(page):
    missing = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]  # "#x": the page
    assert missing == []


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation but ``-`` and ``_`` dropped, spaces
    as ``-``, a repeated one numbered."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    found: set[str] = set()
    for title in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n, candidate = 0, slug
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_anchor_names_a_heading_of_its_page(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.split("#")[0]).resolve() for t in relative_links(REPO / "README.md")}
    assert [p.name for p in PAGES[1:-1] if p.resolve() not in linked] == []


def quickstart() -> list[list[str]]:
    """The commands of the README's first code block, one argv per command (`a && b` gives two)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    assert block and text[: block.start()].count("\n") < 40, "the quickstart block starts within the first 40 lines"
    commands = []
    for line in block.group(1).splitlines():
        words = shlex.split(line, comments=True)
        while "&&" in words:
            i = words.index("&&")
            commands.append(words[:i])
            words = words[i + 1 :]
        if words:
            commands.append(words)
    return commands


def test_the_quickstart_names_install_train_tests_and_generate():
    programs = [" ".join(c[:3]) for c in quickstart()]
    assert programs[:5] == [
        "pip install -r",
        "python train.py fit",
        "pip install -r",
        "python -m pytest",
        "python -m pytest",
    ]
    assert programs[5].startswith("modlm-generate ") and len(programs) == 6


@pytest.mark.slow
def test_the_quickstart_commands_run(tmp_path, tiny_tokenizer):
    # The pip install and pytest lines are not run here: CI runs exactly those (installing, then the
    # default and the slow tests); this test runs the two that a newcomer's model goes through.
    commands = quickstart()
    fit = next(c for c in commands if c[:2] == ["python", "train.py"])
    generate = next(c for c in commands if c[0] == "modlm-generate")
    # The generate line reads the checkpoint the default run writes: the README's path must be it.
    root = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())["trainer"]["default_root_dir"]
    checkpoint = Path(generate[1])
    assert checkpoint.parts[: len(Path(root).parts)] == Path(root).parts
    run_root = tmp_path / root
    # The README's fit, shortened to a tiny run under tmp (the tiny preset's model and data, 2 steps).
    done = run_train(
        *fit[2:], *tiny_args(run_root, tiny_tokenizer, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")
    )
    assert done.returncode == 0, done.stderr[-2000:]
    written = tmp_path / checkpoint
    assert written.exists()
    # modlm-generate as the package installs it (its entry point, run from this checkout's code).
    argv = [
        sys.executable,
        "-c",
        "import sys; from modlm.cli.generate import main; sys.exit(main())",
        str(written),
        *generate[2:],
        "--max_new_tokens",
        "8",
        "--seed",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(argv, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    prompt = generate[2]
    assert out.stdout.startswith(prompt) and len(out.stdout) > len(prompt) + 1

"""README.md's quick start, run as written: the commands are read from its "Quick start" code block, so the test
breaks when the README drifts from what the tool does. Then its torch-free Python example runs on the result, and
every sample photo the README names exists (a fresh clone has them)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PHOTOS = sorted(p.name for p in (ROOT / "examples" / "photos").iterdir())


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _commands(block: str) -> list[list[str]]:
    commands = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands.append(shlex.split(line))
    return commands


def test_quick_start_runs_as_written(tmp_path):
    blocks = _blocks(_section("Quick start"), "bash")
    assert len(blocks) == 1, "the quick start should be one bash block"
    commands = _commands(blocks[0])
    assert [c[:2] for c in commands] == [["graphlrp", "compile"], ["graphlrp", "explain"]], commands
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the clone's files, at the paths the README uses
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for command in commands:
        done = subprocess.run([sys.executable, "-m", "graphlrp.cli", *command[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"$ {shlex.join(command)}\n{done.stdout}\n{done.stderr}"
    out = tmp_path / commands[1][commands[1].index("-o") + 1]
    stems = [Path(name).stem for name in PHOTOS]
    for stem in stems:
        for kind in ("heatmap.png", "overlay.png", "relevance.npy"):
            assert (out / f"{stem}_{kind}").is_file(), f"{stem}_{kind} missing; wrote {sorted(os.listdir(out))}"
        relevance = np.load(out / f"{stem}_relevance.npy")
        assert relevance.ndim == 3 and np.isfinite(relevance).all() and np.abs(relevance).sum() > 0

    # the README's Python example that needs no torch, on the explainer the quick start wrote
    runtime = [b for b in _blocks(_section("Examples"), "python") if "graphlrp.load(" in b]
    assert len(runtime) == 1
    done = subprocess.run([sys.executable, "-c", runtime[0]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_photos_the_readme_names_are_shipped_with_their_notice():
    named = set(re.findall(r"examples/photos/([\w.-]+)", README))
    assert named and named <= set(PHOTOS), named - set(PHOTOS)
    notice = (ROOT / "examples" / "NOTICE").read_text(encoding="utf-8")
    for name in PHOTOS:
        assert name in notice, f"{name} has no entry in examples/NOTICE"
        assert (ROOT / "examples" / "photos" / name).stat().st_size <= 100_000


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_states_the_test_command_ci_runs():
    # .ci/run runs exactly the README's test command
    assert "```bash\npython -m pytest -q\n```" in _section("Tests")
    assert "\npython -m pytest -q\n" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")

"""The card's commands as a user who installed the wheel runs them: from an empty folder, recipes by name.

Builds the wheel (not an editable install), unpacks it into a private site folder, and runs
`python -m qirl.cli` there with that folder first on the path, so nothing of the repository is visible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL_GRPO = [
    "train.iterations=2", "train.prompts_per_iter=2", "train.group_size=2", "train.raft_keep=1",
    "train.micro_batch=4",
    "sampling.num_steps=3", "sampling.window_size=2", "eval.every=0", "run.tensorboard=false",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next((root / "dist").glob("qirl-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(root / "site"), str(wheel)],
                   check=True, capture_output=True)
    return {**os.environ, "PYTHONPATH": str(root / "site"), "OMP_NUM_THREADS": "1"}


def qirl(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qirl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_cards_commands_run_from_an_empty_folder_on_the_installed_wheel(installed, tmp_path) -> None:
    work = tmp_path / "empty"
    work.mkdir()
    where = subprocess.run([sys.executable, "-c", "import qirl; print(qirl.__file__)"], cwd=work, env=installed,
                           capture_output=True, text=True, check=True).stdout
    assert "site" in where and str(ROOT) not in where  # the wheel, not the repository

    listed = qirl(installed, work, "recipes", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert {"t2i", "edit", "distill", "curate", "qwen-image/t2i"} <= set(rows)
    assert rows["t2i"]["runs"] == "grpo" and rows["t2i"]["command"].startswith("qirl grpo")

    unknown = qirl(installed, work, "grpo", "nosuch")
    assert unknown.returncode == 2 and "built-in: " in unknown.stderr and "t2i" in unknown.stderr

    missing = qirl(installed, work, "distill", "--teachers", "t2i,edit", "--quiet")  # no teacher runs yet
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "`qirl grpo t2i run.out_dir=runs/grpo_t2i`" in missing.stderr
    assert "`qirl grpo edit run.out_dir=runs/grpo_edit`" in missing.stderr

    for name in ("t2i", "recipes/edit.yaml"):  # a name, and the docs' path from a folder that has no recipes/
        run = qirl(installed, work, "grpo", name, *SMALL_GRPO, "--quiet")
        assert run.returncode == 0, run.stderr
    assert (work / "runs" / "grpo_t2i" / "model").is_dir() and (work / "runs" / "grpo_edit" / "model").is_dir()

    (work / "prompts.jsonl").write_text(
        json.dumps({"prompt": "a red circle", "category": "single"}) + "\n"
        + json.dumps({"prompt": "a blue square above a green triangle", "category": "spatial"}) + "\n"
    )
    curated = qirl(installed, work, "curate", "prompts.jsonl", "sampling.group_size=2", "sampling.num_steps=2",
                   "sampling.window_size=1", "filter.threshold=0", "--quiet")
    assert curated.returncode == 0, curated.stderr
    assert "{'" not in curated.stdout and "per_category" in curated.stdout  # nested results as tables
    assert (work / "runs" / "curate" / "curated.jsonl").is_file()

    distilled = qirl(installed, work, "distill", "--teachers", "t2i,edit", "train.iterations=1",
                     "train.prompts_per_iter=2", "train.micro_batch=2", "rollout.num_steps=2", "eval.every=0",
                     "run.tensorboard=false", "--quiet", "--json")
    assert distilled.returncode == 0, distilled.stderr
    summary = json.loads(distilled.stdout)
    assert summary["steps"] == 1 and summary["teachers"] == {"t2i": "runs/grpo_t2i", "edit": "runs/grpo_edit"}

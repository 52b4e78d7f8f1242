"""
The fork test: each system is a file a DR-MoE fork can delete, and adding a model is one file and one line.

- A copy without baselines.py, mlvpt.py, backbone_moe.py, divdr.py, studies/, results/ and the tests of those
  files trains DR-MoE for one epoch, evaluates its checkpoint, refuses --model mlvpt in one line (no
  traceback) that names the missing file, and its remaining tests are all collected (none imports a
  deleted file).
- A copy without any one of the four system files still builds and describes DR-MoE.
- docs/adding-a-model.md's example, saved as the file it says with its one line in zoo.SYSTEMS, trains and
  its gate's health is logged like every router's.

    python -m pytest -q tests/test_fork.py
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_FILES = ("baselines.py", "mlvpt.py", "backbone_moe.py", "divdr.py")
# The tests of the system files and of the studies, deleted with them.
SYSTEM_TESTS = ("tests/test_baselines.py", "tests/test_mlvpt.py", "tests/test_divdr.py", "tests/test_backbone_moe.py",
                "tests/test_compare.py", "tests/test_noise.py")
RUN = ["--epochs", "1", "--limit", "64", "--batch-size", "32"]


def copy_of(dest, drop=()):
    """The project's files (what git tracks, and what it does not ignore) copied to dest, less `drop`."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True).stdout.split()
    for rel in listed:
        if any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in drop) or not os.path.isfile(os.path.join(ROOT, rel)):
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))
    return dest


def run(cwd, *args):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def start(cwd, *args):
    """The same, started and left running: several at once."""
    return subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")),
                    reason="the copy lists the project's files with git")
def test_a_dr_moe_fork_without_every_system_trains_and_evaluates(tmp_path):
    fork = copy_of(str(tmp_path / "fork"), SYSTEM_FILES + SYSTEM_TESTS + ("studies/", "results/"))
    assert not any(os.path.exists(os.path.join(fork, f)) for f in SYSTEM_FILES)
    out = os.path.join(fork, "run")
    p = run(fork, "train.py", *RUN, "--out-dir", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.load(open(os.path.join(out, "metrics.json")))["model"] == "drmoe"
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert {"load", "entropy", "dead"} <= set(log[-1]["routers"]["gate"]) and os.path.isfile(os.path.join(out, "routing.png"))
    # Three independent checks at once (two cores; each pays torch's import): evaluate the checkpoint, refuse
    # --model mlvpt in one line, and collect the remaining tests (none imports a deleted file).
    procs = [start(fork, "evaluate.py", "--checkpoint", os.path.join(out, "best.pt")), start(fork, "train.py", "--model", "mlvpt"),
             start(fork, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider")]
    (ev_out, ev_err), (_, ml_err), (col_out, _) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 0 and "mAP" in ev_out, ev_err[-3000:]
    lines = ml_err.strip().splitlines()
    assert procs[1].returncode == 2 and len(lines) == 1 and "mlvpt.py" in lines[0] and "Traceback" not in ml_err, ml_err
    last = col_out.strip().splitlines()[-1]
    assert procs[2].returncode == 0 and "tests collected" in last and "error" not in last, col_out[-3000:]


@pytest.mark.skipif(shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")),
                    reason="the copy lists the project's files with git")
def test_without_any_one_system_dr_moe_still_builds(tmp_path):
    """Four copies, each without one system file, each building and describing DR-MoE (run at once)."""
    procs = {gone: start(copy_of(str(tmp_path / gone), (gone, "studies/", "results/", "tests/")), "train.py", "--describe")
             for gone in SYSTEM_FILES}
    for gone, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "drmoe:" in out, (gone, err[-3000:])


@pytest.mark.skipif(shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")),
                    reason="the copy lists the project's files with git")
def test_adding_a_model_is_one_file_and_one_line(tmp_path):
    """docs/adding-a-model.md: its mixhead.py and its one zoo.py line, exactly as the page gives them."""
    page = open(os.path.join(ROOT, "docs", "adding-a-model.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    code, line = blocks[0], blocks[1].strip()
    fork = copy_of(str(tmp_path / "fork"), ("studies/", "results/", "tests/"))
    open(os.path.join(fork, "mixhead.py"), "w").write(code)
    zoo = open(os.path.join(fork, "zoo.py")).read()
    zoo = zoo.replace("SYSTEMS = {\n", "SYSTEMS = {\n    " + line + "\n", 1)
    open(os.path.join(fork, "zoo.py"), "w").write(zoo)
    out = os.path.join(fork, "run")
    p = run(fork, "train.py", "--model", "mixhead", *RUN, "--out-dir", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mixhead gate" in p.stdout   # the epoch line shows its gate's load
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    gate = log[-1]["routers"]["mixhead gate"]
    assert len(gate["load"]) == 4 and abs(sum(gate["load"]) - 1) < 1e-4
    assert json.load(open(os.path.join(out, "metrics.json")))["model"] == "mixhead"

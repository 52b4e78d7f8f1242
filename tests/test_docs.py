"""
The README and docs/ as behaviour: a moved file or a renamed flag cannot leave a dead link or a dead command.

- Every relative link in README.md, docs/*.md and results/*/README.md points at a file that exists, and
  every #anchor at a heading of that file (GitHub's slugs).
- Every `python ...` command in README.md and docs/*.md (code blocks and inline code) names a script or
  module that exists, and every --flag it passes is one that script's --help lists.
- The cheap ones run as written: --help, --describe, and each study's --report, which rebuilds its table
  from the committed runs (in a copy of the study's folder, so the committed files stay as they are).
- The README is a map: under 300 lines, its file map names model.py, gating.py and experts.py, and it has
  the paper-to-code table.

Run: python -m pytest -q tests/test_docs.py
"""
import functools
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from tiny import names_a_deleted_part  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINKED = DOCS + sorted(glob.glob(os.path.join(ROOT, "results", "*", "README.md")))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set:
    text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)   # a '#' inside a code block is no heading
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def links(path: str):
    text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+://|mailto:", target):
            yield target


@pytest.mark.parametrize("doc", LINKED, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_link_resolves(doc):
    for target in links(doc):
        if names_a_deleted_part(target):   # a fork without that part: the doc's link is the forker's to drop
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(doc), file)) if file else doc
        assert os.path.exists(dest), f"{os.path.relpath(doc, ROOT)}: link to {target}: no such file"
        if anchor:
            assert dest.endswith(".md") and anchor in anchors(dest), \
                f"{os.path.relpath(doc, ROOT)}: link to {target}: no heading with that anchor in {os.path.relpath(dest, ROOT)}"


def commands() -> list:
    """(doc, command) for every `python ...` line of a code block and every inline `python ...` span."""
    found = []
    for doc in DOCS:
        text = open(doc).read()
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
        lines = [l for b in blocks for l in b.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`(python [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " "))
        for line in lines:
            line = re.sub(r"\s+#\s.*$", "", line.strip())                         # a trailing comment
            line = re.sub(r"^pip install -r requirements.txt && ", "", line)
            if line.startswith("python ") and not line.startswith("python -c"):
                found.append((os.path.relpath(doc, ROOT), line))
    return found


def entry(argv: list) -> list:
    """The argv prefix that names the program: ['train.py'] or ['-m', 'studies.compare']."""
    return argv[1:3] if argv[1] == "-m" else argv[1:2]


@functools.lru_cache(maxsize=None)
def help_text(program: tuple) -> str:
    r = subprocess.run([sys.executable, *program, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=120)
    return r.stdout


COMMANDS = commands()


def test_the_docs_hold_commands():
    assert len(COMMANDS) > 40 and any(c.startswith("python -m studies.compare") for _, c in COMMANDS)


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}: {c[:60]}" for d, c in COMMANDS])
def test_every_command_names_a_program_and_its_flags(doc, command):
    if names_a_deleted_part(command):
        pytest.skip("about a part this copy does not have")
    argv = shlex.split(command.replace("$RUN", "RUN"))
    program = entry(argv)
    if program[0] == "-m" and program[1].split(".")[0] not in ("studies", "lib"):
        return   # python -m pytest, python -m venv: not this project's programs
    path = program[1].replace(".", os.sep) + ".py" if program[0] == "-m" else program[0]
    assert os.path.isfile(os.path.join(ROOT, path)), f"{doc}: {command}: no {path}"
    flags = [a.split("=")[0] for a in argv if a.startswith("--")]
    listed = help_text(tuple(program)) if flags else ""
    for flag in flags:
        assert re.search(re.escape(flag) + r"(?![\w-])", listed), f"{doc}: {command}: {flag} is not a flag of {path}"


def runs_cheaply(command: str) -> bool:
    return any(f in shlex.split(command) for f in ("--help", "--describe", "--report"))


CHEAP = sorted({c for _, c in COMMANDS if runs_cheaply(c)})


def first_table(path: str) -> list:
    """The first markdown table of a file, as its lines."""
    lines = open(path).read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


@pytest.mark.parametrize("command", CHEAP)
def test_cheap_commands_run_as_written(command, tmp_path):
    """A --report reads a committed study: it runs on a copy of that folder (the command's --out), so the
    committed files stay untouched, and its table must be the committed one. The bootstrap over test images
    (minutes at 10,000 images) is skipped here with --draws 0: the table compared is the first, the
    configurations' means, which the bootstrap does not touch."""
    if names_a_deleted_part(command):
        pytest.skip("about a part this copy does not have")
    argv = shlex.split(command)
    if "--report" in argv and "--out" in argv:
        i = argv.index("--out") + 1
        committed = os.path.join(ROOT, argv[i])
        copy = tmp_path / argv[i]
        shutil.copytree(committed, copy)
        argv[i] = str(copy)
        argv += [] if "--draws" in argv else ["--draws", "0"]
    r = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=300)
    assert r.returncode == 0, f"{command}\n{r.stderr[-2000:]}"
    if "--report" in argv:
        written = re.search(r"wrote (\S+\.md)", r.stdout).group(1)
        name = os.path.basename(written)
        assert first_table(written) == first_table(os.path.join(committed, name)), f"{command}: {name} differs"


def test_the_readme_is_a_map():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) < 300
    tree = text[text.index("## The files, in reading order"):text.index("## The systems")]
    for f in ("experts.py", "gating.py", "model.py", "train.py", "lib/", "studies/", "docs/"):
        assert re.search(rf"^{re.escape(f)}\s", tree, flags=re.M), f"the file map does not name {f}"
    # Every root .py file is on the map.
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        assert re.search(rf"^{re.escape(os.path.basename(path))}\s", tree, flags=re.M), os.path.basename(path)
    table = text[text.index("## From the papers to the code"):]
    for system in ("DR-MoE", "HSQ", "ML-VPT", "sweet spot", "DivDR", "ML-GCN", "Query2Label", "ASL"):
        assert system in table, f"the paper-to-code table has no row for {system}"
    # Each test the table names exists (in a fork, whose deleted parts took their tests along, those it kept).
    fork = any(names_a_deleted_part(part) for part in ("baselines", "mlvpt", "backbone_moe", "divdr"))
    for test_file, name in re.findall(r"`(test_\w+\.py)::(\w+)`", table):
        if fork and not os.path.isfile(os.path.join(ROOT, "tests", test_file)):
            continue
        assert re.search(rf"^def {name}\(", open(os.path.join(ROOT, "tests", test_file)).read(), flags=re.M), name

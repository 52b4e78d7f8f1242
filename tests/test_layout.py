"""
The house's layout, as behaviour: a reader finds each idea in one file, and the files stack without a circle.

- The import graph of the root files and the two folders (lib/ below the root, studies/ above it) has no
  circle, and every import goes down the tiers of TIER: lib < the parts < the models < zoo < config <
  the scripts < studies. Every root file has a tier, so a new file has to be placed.
- model.py imports only DR-MoE's parts (backbones, experts, gating; lib for its config field): the other
  systems are built by name in zoo.py.
- Each concept file runs on its own (`python gating.py`, ...) and prints a worked example with its shapes.
- train.main is a short, top-down story (under 150 lines).

Run: python -m pytest -q tests/test_layout.py
"""
import ast
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("lib", "studies")
# Lower tiers are imported by higher ones, never the other way round.
TIER = {"lib": 0,                                                     # plumbing: imports nothing of the root
        "experts": 1, "gating": 1, "metrics": 1, "data": 1, "losses": 1,   # parts that stand alone
        "backbones": 2,                                               # any torchvision backbone -> a map
        "model": 3,                                                   # DR-MoE over a backbone
        # The systems, one tier: sideways imports are refused, so no system needs another.
        "baselines": 4, "mlvpt": 4, "backbone_moe": 4, "divdr": 4,
        "zoo": 5,                                                     # every model and system by name
        "config": 6,                                                  # the flags of every config
        "evaluate": 7, "train": 8,                                    # the scripts (train validates with evaluate.predict)
        "studies": 9}                                                 # the study machinery, on top of everything
SYSTEMS = ("baselines", "mlvpt", "backbone_moe", "divdr")
# What a DR-MoE fork keeps (zoo.py beside it, which names the systems by string and imports them with importlib).
CORE = ("experts", "gating", "model", "backbones", "data", "metrics", "losses", "train", "evaluate", "config", "lib")
CONCEPT_FILES = ["experts.py", "gating.py", "model.py", "losses.py", "backbone_moe.py", "baselines.py", "mlvpt.py",
                 "divdr.py", "zoo.py"]


def node_of(path: str) -> str:
    """A file's node in the graph: its module name at the root, its folder's name inside lib/ or studies/."""
    rel = os.path.relpath(path, ROOT)
    return rel.split(os.sep)[0] if os.sep in rel else rel[:-3]


def imported(path: str) -> set:
    """The project nodes a file imports, at module level or inside functions alike."""
    names = set()
    for n in ast.walk(ast.parse(open(path).read())):
        if isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            names.add(n.module.split(".")[0])
    return {m for m in names if m in TIER or os.path.isfile(os.path.join(ROOT, m + ".py"))}


def graph() -> dict:
    edges = {}
    for path in glob.glob(os.path.join(ROOT, "*.py")) + [p for f in FOLDERS for p in glob.glob(os.path.join(ROOT, f, "*.py"))]:
        node = node_of(path)
        edges.setdefault(node, set()).update(imported(path) - {node})
    return edges


def test_every_root_file_has_a_tier_and_imports_only_lower_tiers():
    edges = graph()
    assert not set(edges) - set(TIER), f"files without a tier (place them in TIER): {set(edges) - set(TIER)}"
    upward = [(a, b) for a, targets in edges.items() for b in targets if TIER[b] >= TIER[a]]
    assert not upward, f"imports from a lower file to a higher one (or sideways): {upward}"


def test_the_import_graph_has_no_circle():
    """Independent of the tiers: a depth-first search over the graph finds no path back to a node on it."""
    edges, state = graph(), {}

    def visit(node, path):
        state[node] = "open"
        for nxt in edges.get(node, ()):
            assert state.get(nxt) != "open", f"import circle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for node in edges:
        if node not in state:
            visit(node, [node])


def test_the_core_reaches_no_system_and_no_system_another():
    """The core (and zoo.py, through which it builds models) reaches none of the four system files, following
    imports transitively; and no system file imports another."""
    edges = graph()
    for start in CORE + ("zoo",):
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for nxt in edges.get(node, ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert not seen & set(SYSTEMS), f"{start} reaches {sorted(seen & set(SYSTEMS))}"
    for system in SYSTEMS:
        assert not edges.get(system, set()) & set(SYSTEMS), f"{system} imports {edges[system] & set(SYSTEMS)}"


def test_the_loop_names_no_system():
    """train.py, evaluate.py and config.py call models and systems through zoo.py only: no system's file or
    name appears in them, comments included."""
    names = re.compile(r"mlvpt|ml-vpt|divdr|backbone_moe|backbone moe|baselines\.py|import baselines", re.I)
    for f in ("train.py", "evaluate.py", "config.py"):
        found = names.findall(open(os.path.join(ROOT, f)).read())
        assert not found, f"{f} names {sorted(set(found))}"


def test_model_py_reads_alone():
    assert imported(os.path.join(ROOT, "model.py")) == {"backbones", "experts", "gating", "lib"}
    # ... and DR-MoE's reader needs four files: experts.py, gating.py, model.py and train.py, whose own
    # imports are the core's and zoo.py (the registry), never a system.


def test_train_main_is_short():
    tree = ast.parse(open(os.path.join(ROOT, "train.py")).read())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 < 150


@pytest.mark.parametrize("script", CONCEPT_FILES)
def test_each_concept_file_runs_alone_and_prints_its_shapes(script):
    if not os.path.isfile(os.path.join(ROOT, script)):
        pytest.skip(f"{script} is not in this copy (a DR-MoE fork)")
    """The first thing a reader does next to a paper: run the file. It must exit 0 and print tensor shapes
    (tuples such as (2, 3, 8)) beside the legend's letters (B, L, D, ...)."""
    r = subprocess.run([sys.executable, script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    shapes = re.findall(r"\(\d+(?:, \d+)+\)", r.stdout)
    assert len(shapes) >= 2 and re.search(r"\((B|L|N|T|S)(, [A-Za-z_]+)+\)", r.stdout), r.stdout

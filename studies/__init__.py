"""
The study machinery: what turns many train.py runs into the tables and pictures of results/. Run from the
repository root as modules, e.g. `python -m studies.compare --set models --report`. These files import the
root's files; no root file imports them.

    sets.py      which configurations each study trains, and why each row is there
    compare.py   trains a set over seeds (resumable), then writes its table, tests and pictures
    tables.py    the tables: mean +- std over seeds, paired t with Holm, bootstrap intervals
    noise.py     evaluation noise: the bootstrap over test images, detectable differences
    bench.py     speed: one training step of each model, the expert layer, the data loader
"""

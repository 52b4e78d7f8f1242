"""
The library the scripts stand on, none of it an idea from a paper: a reader of the models never needs to
open it. Nothing here imports a file of the root, so every root file may import from here.

    checkpoint.py    write a run's checkpoint atomically, read it back with weights_only=True, RNG states
    rundir.py        what a run folder holds: one run, never trained over; best.pt's contents; the summary
    distributed.py   torchrun + DistributedDataParallel: setup, the collectives the loop needs, gather_rows
    synthetic.py     the embedded benchmark's renderer: scenes, objects, labels (data.py wraps it)
    owndata.py       your own data's file formats: a CSV per split, COCO-style json; DatasetError
    predictions.py   per-label F1 thresholds, predictions for a folder of images into a CSV
    analysis.py      gate statistics and the heterogeneity test behind evaluate.py --analysis
    plots.py         the charts, drawn with Pillow alone (no matplotlib)
    routing.py       every router's record and health, one way for all: route, collect, Watch, summary
    kmeans.py        k-means with k-means++ starts (DivDR's partitions, ML-VPT's label groups)
    flags.py         config_field (a field with its --help) and the one-line-error parser
"""

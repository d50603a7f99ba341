"""Experiment (2026-12-07): recycling with Token Recycling's published template instead of ours.

    python bench/results/recycling_tau/paper_shape.py 80 --methods recycling --fixed-nodes 64 \
        --max-new-tokens 96 --json OUT

The first argument: how many of the template's paths to use, in its order. The paths are the
80-node, depth-6 tree of the authors' code (Luowaterbi/TokenRecycling,
model/recycling/tree_template_.py, version "2.2.2"; widths 8, 21, 25, 15, 8, 3 by depth), written
out here as data. Everything else is bench/tau_fixed_cost.py.
"""
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from treedec.drafters import recycling
PAPER = [[0], [1], [2], [3], [4], [5], [6], [7],
 [0,0], [0,1], [0,2], [0,3], [0,4], [0,5], [0,6], [0,7], [1,0], [1,1], [1,2], [1,3], [2,0], [2,1], [2,2], [3,0], [3,1], [4,0], [5,0], [6,0], [7,0],
 [0,0,0], [0,0,1], [0,0,2], [0,0,3], [0,0,4], [0,0,5], [0,0,6], [0,0,7], [0,1,0], [0,1,1], [0,1,2], [0,2,0], [0,2,1], [0,3,0], [0,4,0], [0,5,0], [0,6,0], [0,7,0], [1,0,0], [1,0,1], [1,1,0], [2,0,0], [3,0,0], [4,0,0], [5,0,0],
 [0,0,0,0], [0,0,0,1], [0,0,0,2], [0,0,0,3], [0,0,0,4], [0,0,1,0], [0,0,1,1], [0,0,2,0], [0,0,3,0], [0,0,4,0], [0,1,0,0], [0,2,0,0], [1,0,0,0], [2,0,0,0], [3,0,0,0],
 [0,0,0,0,0], [0,0,0,0,1], [0,0,0,0,2], [0,0,0,1,0], [0,0,0,2,0], [0,0,1,0,0], [0,1,0,0,0], [1,0,0,0,0],
 [0,0,0,0,0,0], [0,0,0,0,0,1], [0,0,0,1,0,0]]
count = int(sys.argv.pop(1))  # how many of the paper's paths (in its order)
recycling.rank_template = lambda num_nodes, width, max_depth: [tuple(p) for p in PAPER[:count]]
sys.argv[0] = str(ROOT / "bench" / "tau_fixed_cost.py")
runpy.run_path(sys.argv[0], run_name="__main__")

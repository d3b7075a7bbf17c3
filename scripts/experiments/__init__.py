"""The experiment runner behind scripts/reproduce.py and scripts/demo.py, one idea a module:
grid (the YAML under configs/experiments), runs (fairseq commands), cache, cell, metrics, tables,
ablation, plot."""

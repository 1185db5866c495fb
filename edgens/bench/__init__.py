"""Benchmarks behind ``edgens bench``: one module per concept.

- :mod:`edgens.bench.sweep`: training the runs of a lam sweep (reusing finished runs, resuming interrupted ones);
  :mod:`edgens.bench.lam_results` tabulates them, with the stacking baseline (``edgens bench lambda``).
- :mod:`edgens.bench.drop`: accuracy vs members dropped at random, kept with probability p, or kept in the greedy
  anytime order (``edgens bench drop``).
- :mod:`edgens.bench.specialists`: one-vs-rest specialist sub-ensembles (``edgens bench specialists``).
- :mod:`edgens.bench.dominance`: per-member error over epochs, entropy statistics, confusion matrices and filters
  (``edgens bench dominance``).
- :mod:`edgens.bench.report`: writing each bench's JSON, markdown table and plot.

The maths lives in :mod:`edgens.bench.analysis` (numpy only), the plots in :mod:`edgens.bench.plots` (matplotlib, an
extra); the selection algorithms in :mod:`edgens.selection`, the ensemble maths in :mod:`edgens.ensemble`. Reading
finished runs needs no torch (drop, specialists, lam_results, report, plots);
:mod:`edgens.bench.sweep` imports it only when a run must train, and :mod:`edgens.bench.dominance` uses it for the
module-dominance threshold and the checkpoint's first-layer weights.
"""

"""The machinery of `scripts/sweep_aug_dim.py`: train PFGM++ models at several D on one dataset with the project's
trainer, sample them with the library's solvers, measure them with error bars and report which D is best.

- `models`: one model of the sweep, trained in segments by `training/train_pfgm.py`, then measured.
- `sampling`: the only calls into the pipeline, the scheduler and `ode` (solvers, injected noise, quantised weights,
  RK45 within a budget of calls).
- `judges`: the quality figures with standard errors (the digits classifier, or a pixel-space sliced W2).
- `statistics`: estimates over seeds with error bars, and the result layout's accessors.
- `jobs`: models trained `--jobs` at a time, each result kept and reused by a rerun with the same settings.
- `report`, `plots`: the sweep's markdown report and its plots.

`benchmarks/evidence/` runs the same machinery with the evidence settings and adds the papers' claims and the 2-D toys.
"""

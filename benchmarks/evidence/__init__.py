"""The papers' claims at CPU scale (`run.py`, `make evidence`): the D sweep of `scripts/aug_dim_sweep` with the
evidence settings, the 2-D toys (`toy2d`), the claims' verdicts (`claims`), the section of docs/benchmarks.md
(`markdown`) and its plots (`plots`). `scripts/` must be on the import path (run.py puts it there)."""

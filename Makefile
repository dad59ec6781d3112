# Two commands do all the set-up on a fresh machine: `make train` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13 lies on this project's machines; elsewhere pick the build you need.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test train lint format bench evidence evidence-reduced evidence-quick evidence-img2img evidence-img2img-superres sweep

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

# A second `make train` into the same pfgm-digits/ is refused: `make train TRAIN_ARGS=--overwrite_output_dir` replaces
# the first run, `TRAIN_ARGS="--resume_from_checkpoint latest"` continues it.
train: $(VENV)/.installed
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no training/train_pfgm.py $(TRAIN_ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Every speed ratio of docs/benchmarks.md, docs/training.md and docs/pipeline.md, each printed with the CPU, threads,
# load and spread (about 10 minutes on 2 idle cores, and 3 more for recipe_timing.py).
# On a GPU: python benchmarks/gpu_check.py.
bench: $(VENV)/.installed
	$(PY) benchmarks/bench_field_target.py --threads 1 --json field_target_1thread.json
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_field_target.py --threads 2 --no-official --json field_target_2threads.json
	$(PY) benchmarks/bench_stable_target.py --threads 1 --json stable_target_D128.json
	$(PY) benchmarks/bench_stable_target.py --threads 1 --aug_dim inf --json stable_target_Dinf.json
	$(PY) benchmarks/bench_scheduler_step.py --json scheduler_step.json
	$(PY) benchmarks/bench_trainer.py --repeats 5 --steps 600 --skip_field
	$(PY) benchmarks/bench_trainer.py --skip_trainer
	$(PY) benchmarks/bench_pipeline_ode.py
	$(PY) benchmarks/bench_latent.py --json latent.json
	$(PY) benchmarks/recipe_timing.py

# Choose D for your data: PFGM++ at several D trained and compared with error bars (scripts/sweep_aug_dim.py --help);
# without SWEEP_ARGS, the embedded digits at D = 8, 128, 2048, inf with two seeds (~40 min on 2 idle cores). Report
# and plots in outputs/sweep_aug_dim/, e.g. `make sweep SWEEP_ARGS="--train_data_dir my_images --resolution 32"`.
sweep: $(VENV)/.installed
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib
	$(PY) scripts/sweep_aug_dim.py $(SWEEP_ARGS)

# The papers' claims at CPU scale: the sweep's `--preset evidence` plus the 2-D toys and the claims' verdicts; rewrites
# the evidence section of docs/benchmarks.md and docs/evidence_*.png (~65 min on 2 idle cores, STF and Restart included; results kept in
# outputs/evidence/full are reused by a rerun with the same settings).
evidence: $(VENV)/.installed
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib
	$(PY) benchmarks/evidence/run.py

# What fits a shared 2-core machine in about an hour: D = 8, 128, 2048, inf and STF at 128 and inf, 1500 steps, 400
# samples, Heun only, smaller toys; rewrites the docs' evidence section, which then says how it differs from the above.
evidence-reduced: $(VENV)/.installed
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib
	$(PY) benchmarks/evidence/run.py --reduced

# The same machinery at toy sizes, a few minutes: a machinery check, not evidence. Prints one line per claim and the
# path of the report and plots (outputs/evidence/quick); the docs untouched.
evidence-quick: $(VENV)/.installed
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib
	$(PY) benchmarks/evidence/run.py --quick

# Does a small D help image-to-image? PPFM's claim on the digits' denoising task (benchmarks/img2img_evidence.py):
# D = 64, 128, inf, 2 seeds, 12000 steps each with a cosine cool-down of the learning rate over the last 4500, two
# training jobs, trained on the digits' training split and scored on the 359 held-out digits: first the models at
# the end of training (a JSON), then those of step 6000, on the held-out plateau before they overfit the 1438
# training digits, for the docs. Trained models are cached in outputs/img2img_evidence/models and resumed, so a rerun
# only evaluates. Rewrites its section of docs/benchmarks.md and docs/img2img_*.png; the wall time on the 2-core
# machine is in docs/img2img.md.
# evidence-img2img-superres: the same on the super-resolution task (its own section), with the models at the end of
# training: on this task the held-out figures stay flat from step 6000 to 12000 (docs/img2img.md).
IMG2IMG_ARGS ?= --seeds 2 --jobs 2
evidence-img2img: $(VENV)/.installed
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib
	$(PY) benchmarks/img2img_evidence.py --task denoise --steps 12000 $(IMG2IMG_ARGS) \
		--output outputs/img2img_evidence/results_step12000.json
	$(PY) benchmarks/img2img_evidence.py --task denoise --steps 12000 --evaluate_step 6000 $(IMG2IMG_ARGS) \
		--output outputs/img2img_evidence/results.json --docs docs/benchmarks.md --plots_dir docs
evidence-img2img-superres: $(VENV)/.installed
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib
	$(PY) benchmarks/img2img_evidence.py --task superres --steps 12000 $(IMG2IMG_ARGS) \
		--output outputs/img2img_evidence/results_superres.json --docs docs/benchmarks.md --plots_dir docs

# Two commands on a fresh clone (Python 3.11; torch is pinned):
#   make demo   install once, build MD-Mini, train DATPRL on its 9 tasks (CPU: about ten minutes), then benchmark
#               it beside the shipped release model against the degraded inputs on the 9 test sets and on the
#               unseen check
#   make test   install once, lint, then run the test suite (all of it: exactly what .ci/run runs)
# Also: make demo-ablation (prompt-free backbone, task pool only, full DATPRL; 3 seeds each at the demo's budget),
#       make demo-methods (the related methods as prompt modes beside DATPRL, one seed each at the demo's budget),
#       make release-model (the shipped release model's long training, file, benchmarks and card; THREADS=1),
#       make test-fast (the suite without the slow end-to-end subprocess tests, for the edit loop),
#       make lint (flake8 and isort at 120 columns, configured in setup.cfg).
# Installation is stamped in $(VENV)/.installed and reruns only when setup.py or requirements/ change.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
MD_MINI := datasets/md_mini

.PHONY: install demo demo-ablation demo-methods release-model test test-fast lint clean

install: $(STAMP)

$(STAMP): setup.py $(wildcard requirements/*.txt)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install setuptools wheel
	# basicsr's sdist would pull a second torch into an isolated build env, and its metadata pulls tb-nightly
	$(PIP) install --no-build-isolation --no-deps basicsr==1.4.2
	$(PIP) install -r requirements/runtime.txt -r requirements/test.txt
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

# --overwrite replaces only an earlier MD-Mini build (one of another format after an update); a finished build with
# the same settings is reused, and a folder holding anything else is refused (datasets/README.md)
$(MD_MINI)/manifest.json: $(STAMP)
	$(PY) -m datprl_arch.mdmini --out $(MD_MINI) --overwrite

# template descriptions encoded by the deterministic stand-in encoder (docs/method.md: CLIP RN50 for real training)
$(MD_MINI)/texts.pt: $(MD_MINI)/manifest.json
	$(PY) -m datprl_arch.tools.encode_descriptions $(MD_MINI)/*/descriptions.json --out $@ --encoder hash --overwrite

# the ten-minute model beside the release model shipped in the package (docs/model_card.md), one table per benchmark
DEMO_CKPT := experiments/datprl_md_mini/models/net_g_latest.pth
demo: $(MD_MINI)/texts.pt
	$(PY) -m datprl_arch.train -opt options/demo/md_mini_train.yml --auto_resume
	$(PY) -m datprl_arch.benchmark -opt options/demo/md_mini_test.yml --ckpt $(DEMO_CKPT) --ckpt release
	$(PY) -m datprl_arch.benchmark -opt options/demo/md_mini_unseen.yml --ckpt $(DEMO_CKPT) --ckpt release

demo-ablation: $(MD_MINI)/texts.pt
	$(PY) -m datprl_arch.ablation

# DATPRL, task pool only, prompt-free, MiO (sequential + explicit, sequential + adaptive), TAP, DPPD, SwinIR DATPRL
METHODS := options/demo/md_mini_train.yml options/demo/md_mini_taskpool.yml options/demo/md_mini_baseline.yml \
	options/train/md_mini_mio_explicit.yml options/train/md_mini_mio_adaptive.yml options/train/md_mini_tap.yml \
	options/train/md_mini_dppd.yml options/train/md_mini_swinir.yml
SEEDS ?= 0
# the comparison's budget: 2,000 iterations for every method (the demo's own files train 2,300)
METHODS_BUDGET := train:total_iter=2000 'train:scheduler:periods=[2000]' train:prompt_analysis_freq=2000
demo-methods: $(MD_MINI)/texts.pt
	$(PY) -m datprl_arch.ablation --configs $(METHODS) --seeds $(SEEDS) --name datprl_md_mini_methods \
		--force_yml $(METHODS_BUDGET)

# The release model (docs/model_card.md): the long training (resumable: stop it and run make release-model again),
# then the shipped file, its benchmarks on validation, test and the unseen check, the learning curve and the card.
# THREADS=1 beside other work (README, "Threads").
RELEASE_RUN := experiments/datprl_md_mini_release
RELEASE_ITER := $(shell $(PYTHON) -c "import yaml; print(yaml.safe_load(open('options/release/md_mini_release.yml'))['train']['total_iter'])" 2>/dev/null)
THREADS ?= 2
release-model: $(MD_MINI)/texts.pt
	$(PY) -m datprl_arch.train -opt options/release/md_mini_release.yml --auto_resume --threads $(THREADS)
	$(PY) -m datprl_arch.tools.release --ckpt $(RELEASE_RUN)/models/net_g_latest.pth \
		--recipe options/release/md_mini_release.yml --overwrite
	for split in val test unseen; do \
		$(PY) -m datprl_arch.benchmark -opt options/demo/md_mini_$$split.yml --ckpt release \
			--name md_mini_release_$$split --threads $(THREADS) --quiet || exit 1; done
	$(PY) -m datprl_arch.tools.learning_curve $(RELEASE_RUN)/metrics.json=DATPRL \
		--inputs results/md_mini_release_val/report.json --out docs/img/learning_curve.png
	$(PY) -m datprl_arch.tools.model_card --report validation=results/md_mini_release_val/report.json \
		--report test=results/md_mini_release_test/report.json --report unseen=results/md_mini_release_unseen/report.json \
		--analysis $(RELEASE_RUN)/prompt_analysis/$(RELEASE_ITER) --notes docs/model_card_notes.md \
		--training "make release-model THREADS=$(THREADS)" --out docs/model_card.md

test: lint
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(PY) -m flake8 .
	$(PY) -m isort --check-only --diff .

clean:
	rm -rf $(MD_MINI) experiments/datprl_md_mini* results/datprl_md_mini*

# on a CUDA machine (about ten minutes): demo training in bf16 and fp16, torchrun auto-resume, bench, the test suite;
# figures in results/gpu_check/<date_time>/figures.md (scripts/gpu_check.sh --dry-run shows the commands)
.PHONY: gpu-check
gpu-check: $(MD_MINI)/texts.pt
	PYTHON=$(PY) scripts/gpu_check.sh

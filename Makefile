# The README's two commands: `make demo` (the main job end to end, offline) and `make test`.
# Both first make sure the environment exists: a virtualenv cached outside the clone, keyed
# by the hash of requirements.txt, and Debian's real Fashion-MNIST files; `make test` also
# Debian's headless Chromium and its driver (the browser tests) and SLURM (a single-node
# cluster the job-array tests start). `make slurm-demo` runs the demo grid as a SLURM job array.

SHELL := /bin/bash
REQ_HASH := $(shell sha256sum requirements.txt | cut -c1-16)
VENV ?= $(HOME)/.cache/mobilenet-compression/venv-$(REQ_HASH)
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist
CHROMEDRIVER := /usr/bin/chromedriver
SLURMCTLD := /usr/sbin/slurmctld
SLURM_DIR ?= /tmp/mobilenet-compression-slurm
export WANDB_MODE ?= offline

.PHONY: setup demo test venv-path slurm-demo

setup: $(VENV)/.installed $(FASHION_MNIST)

# The virtualenv's path (the one mobilenet_compression.environment names), so that the online
# workflow runs from it too: make setup && source "$$(make -s venv-path)/bin/activate"
venv-path:
	@echo $(VENV)

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

$(FASHION_MNIST):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq dataset-fashion-mnist

# Headless Chromium and its driver: tests/test_explorer.py drives the plan explorer page in it.
$(CHROMEDRIVER):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq chromium chromium-driver

# 1. A short FP32 training on real Fashion-MNIST (2 epochs over the 55,000 training images,
#    no augmentation, the cosine schedule stepped every batch: about 90% test accuracy,
#    README.md), W&B offline, into checkpoints/ (the path sweeps/bits.yaml names). An
#    existing checkpoints/best.pt is reused, never overwritten.
checkpoints/best.pt: | setup
	$(PY) train.py --dataset fashion-mnist --data_dir ./data --width_multiplier 0.35 \
		--epochs 2 --augment none --lr_schedule step --batch_size 128 --lr 0.1 --seed 42 \
		--checkpoint_dir checkpoints

# 2. The whole 5x5 bits sweep, offline, two runs at a time; then summary.md and the plots, in
#    runs/demo/<sweep id>/ (untracked), so a fresh clone really runs it instead of resuming
#    the copy committed in results/.
demo: checkpoints/best.pt
	$(PY) sweep.py --sweep sweeps/bits.yaml --agents 2 --results_dir runs/demo

# SLURM's controller, compute daemon, client and munge: tests/test_slurm.py and slurm-demo.
$(SLURMCTLD):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq slurmctld slurmd slurm-client munge

# The demo grid as a job array on a single-node SLURM cluster started here (as root), one run
# per task, two at a time (one core each); then its report, in runs/slurm-demo/<sweep id>/.
slurm-demo: checkpoints/best.pt $(SLURMCTLD)
	bash slurm/local_cluster.sh start $(SLURM_DIR)
	$(PY) sweep.py --sweep sweeps/bits.yaml --list --results_dir runs/slurm-demo
	SLURM_CONF=$(SLURM_DIR)/slurm.conf VENV=$(VENV) sbatch --wait --array=0-24 \
		--cpus-per-task=1 --output=runs/slurm-demo/slurm-%A_%a.out \
		slurm/sweep_array.sbatch sweeps/bits.yaml runs/slurm-demo; \
		status=$$?; bash slurm/local_cluster.sh stop $(SLURM_DIR); exit $$status
	$(PY) sweep.py --report $$(dirname runs/slurm-demo/*/grid.json)

test: setup $(CHROMEDRIVER) $(SLURMCTLD)
	$(PY) -m pytest -q -n 2 --dist loadfile

# The README's two commands: `make demo` (the main job end to end, offline) and `make test`.
# Both first make sure the environment exists: a virtualenv cached outside the clone, keyed
# by the hash of requirements.txt, and Debian's real Fashion-MNIST files.

SHELL := /bin/bash
REQ_HASH := $(shell sha256sum requirements.txt | cut -c1-16)
VENV ?= $(HOME)/.cache/mobilenet-compression/venv-$(REQ_HASH)
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist
DEMO_DIR ?= runs/demo
export WANDB_MODE ?= offline

.PHONY: setup demo test clean-demo

setup: $(VENV)/.installed $(FASHION_MNIST)

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

$(FASHION_MNIST):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq dataset-fashion-mnist

# A short FP32 training on real Fashion-MNIST, W&B offline. Re-running reuses the checkpoint.
$(DEMO_DIR)/checkpoints/best.pt: | setup
	$(PY) train.py --dataset fashion-mnist --data_dir $(DEMO_DIR)/data --width_multiplier 0.35 \
		--epochs 4 --max_train_samples 20000 --batch_size 128 --lr 0.1 --seed 42 \
		--checkpoint_dir $(DEMO_DIR)/checkpoints

demo: $(DEMO_DIR)/checkpoints/best.pt

test: setup
	$(PY) -m pytest -q

clean-demo:
	rm -rf $(DEMO_DIR)

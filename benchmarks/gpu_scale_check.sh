#!/usr/bin/env bash
# verify --forward at scale, on a machine with a GPU, from the source tree, offline.
#
#   bash benchmarks/gpu_scale_check.sh                        # 1.5B parameters, bf16, on cuda
#   SIZE=tiny DEVICE=cpu bash benchmarks/gpu_scale_check.sh   # the same steps in seconds, on a CPU
#
# 1. pytest -m gpu (the tests that skip without CUDA);
# 2. a tied Qwen2-1.5B-shaped model built from its config (random weights, bf16, ~3 GB),
#    saved with every name stored (lm_head too), deduped by tiecli, then
#    verify --forward --against on one device, the same placed by accelerate
#    (--device-map auto under a memory budget that offloads part of it), and a
#    perturbed copy that must fail with forward-mismatch;
# 3. the same proof written by hand with transformers (from_pretrained twice, one seeded
#    input, torch.equal of the logits), for comparison.
# Prints one table; exits 1 when a step does not end as it must.
#
# Environment: SIZE (1.5b | tiny), DEVICE (cuda | cpu), PYTHON (python), WORK (a scratch
# folder; a temporary one by default, removed at the end unless KEEP=1), MAX_MEMORY (the
# --max-memory of the placed run; defaults below), SKIP_PYTEST=1.
set -uo pipefail

SIZE=${SIZE:-1.5b}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -z "${WORK:-}" ]]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/tiecli-scale-XXXXXX")
    [[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
case "$SIZE/$DEVICE" in
    tiny/cpu) DEFAULT_MEMORY="cpu=300KB,disk=1GB" ;;  # three layers of four go to disk
    tiny/*) DEFAULT_MEMORY="0=300KB,cpu=300KB,disk=1GB" ;;
    */cpu) DEFAULT_MEMORY="cpu=1GiB,disk=8GiB" ;;
    *) DEFAULT_MEMORY="0=1GiB,cpu=1GiB,disk=8GiB" ;;  # GPU, CPU offload and disk offload
esac
MAX_MEMORY=${MAX_MEMORY:-$DEFAULT_MEMORY}

ROWS=()
FAILED=0

# step NAME EXPECTED_EXIT_CODES COMMAND...: run, time, keep stdout in $WORK/NAME.out
# (EXPECTED_EXIT_CODES: one code, or several separated by commas)
step() {
    local name=$1 want=$2
    shift 2
    local t0 t1 rc
    t0=$(date +%s.%N)
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
    rc=$?
    t1=$(date +%s.%N)
    local verdict="ok"
    if [[ ",$want," != *",$rc,"* ]]; then
        verdict="FAILED (exit $rc, wanted $want)"
        FAILED=1
        echo "--- $name: exit $rc, wanted $want; stderr:" >&2
        tail -n 20 "$WORK/$name.err" >&2
    fi
    ROWS+=("$name|$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')|$rc|$verdict|$(summary "$name")")
}

# what a step's JSON says: equality, diff, placement, memory
summary() {
    "$PYTHON" - "$WORK/$1.out" <<'EOF' 2>/dev/null || true
import json, sys
try:
    d = json.loads(open(sys.argv[1]).read())
except ValueError:
    text = open(sys.argv[1]).read().strip().splitlines()
    print(text[-1][:90] if text else "")
    sys.exit()
f = d.get("forward") or {}
if "bytes_saved" in d:  # dedupe
    print(f"saved={d['bytes_saved'] / 2**20:,.1f}MiB removed={','.join(d['removed'])}")
if not f:
    print(d.get("summary", ""))
    sys.exit()
gib = lambda b: f"{b / 2**30:.2f}"
parts = [f"equal={f.get('outputs_equal')}", f"diff={f.get('max_abs_diff')}",
         f"ties_shared={f.get('ties_shared_on_device')}",
         f"host_peak={gib(f.get('peak_host_bytes', 0))}GiB"]
parts += [f"{k}_peak={gib(v)}GiB" for k, v in (f.get("device_peak_bytes") or {}).items()]
if f.get("device_map"):
    where = sorted(set(f["device_map"].values()))
    parts.append(f"placed={'+'.join(where)} offloaded={len(f.get('offloaded') or [])}")
codes = sorted({p["code"] for p in d.get("problems", [])})
if codes:
    parts.append("problems=" + ",".join(codes))
print(" ".join(parts))
EOF
}

# -- 1. the GPU-marked tests ------------------------------------------------------
if [[ "${SKIP_PYTEST:-0}" != 1 ]]; then
    # on a GPU every gpu-marked test must run: none collected (exit 5), or all skipped
    # because CUDA is missing, is a failed check, not a pass
    if [[ "$DEVICE" == cuda* ]]; then
        step cuda-present 0 "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
        step pytest-gpu 0 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests
    else
        step pytest-gpu 0,5 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests
    fi
fi

# -- 2. a 1.5B tied model: build, dedupe, prove, perturb ---------------------------
step build 0 "$PYTHON" - "$WORK" "$SIZE" "$DEVICE" <<'EOF'
import json, sys, time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

work, size, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if size == "tiny":
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
else:  # Qwen2-1.5B: 1.54B parameters with the embedding tied to the head
    shape = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936)
config = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                     architectures=["Qwen2ForCausalLM"])
torch.manual_seed(0)
on = "cuda" if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
started = time.perf_counter()
with torch.device(on):  # random init where it is fastest
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(work / "saved")  # what transformers writes: lm_head left out
# every name stored (lm_head a second copy), as converters and older tools write it
full = work / "full"
full.mkdir(exist_ok=True)
(full / "config.json").write_text((work / "saved" / "config.json").read_text())
sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
save_file(sd, full / "model.safetensors", metadata={"format": "pt"})
# a perturbed copy: one element of one layer's weight
sd["model.layers.1.mlp.down_proj.weight"][0, 0] += 0.125
bad = work / "perturbed"
bad.mkdir(exist_ok=True)
(bad / "config.json").write_text((full / "config.json").read_text())
save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
params = sum(p.numel() for p in model.parameters())
stored = (full / "model.safetensors").stat().st_size
print(json.dumps({"summary": f"{params / 1e6:,.1f}M parameters (tied), {stored / 2**20:,.1f} MiB "
                  f"stored with lm_head, built in {time.perf_counter() - started:.1f} s"}))
EOF

step dedupe 0 "$PYTHON" -m tiecli dedupe -q --json "$WORK/full" -o "$WORK/deduped"

step verify-forward 0 "$PYTHON" -m tiecli verify -q --json --forward --device "$DEVICE" \
    --against "$WORK/full" "$WORK/deduped"
step verify-perturbed 1 "$PYTHON" -m tiecli verify -q --json --forward --device "$DEVICE" \
    --against "$WORK/perturbed" "$WORK/deduped"
step verify-placed 0 "$PYTHON" -m tiecli verify -q --json --forward --device "$DEVICE" \
    --device-map auto --max-memory "$MAX_MEMORY" --against "$WORK/full" "$WORK/deduped"
step verify-placed-perturbed 1 "$PYTHON" -m tiecli verify -q --json --forward --device "$DEVICE" \
    --device-map auto --max-memory "$MAX_MEMORY" --against "$WORK/perturbed" "$WORK/deduped"

# -- 3. the same proof by hand with transformers -----------------------------------
for pair in "by-hand:full" "by-hand-perturbed:perturbed"; do
    name=${pair%%:*}
    ref=${pair##*:}
    want=0
    [[ $ref == perturbed ]] && want=1
    step "$name" "$want" "$PYTHON" - "$WORK/deduped" "$WORK/$ref" "$DEVICE" <<'EOF'
import json, sys
import torch
from transformers import AutoModelForCausalLM

a, b, device = sys.argv[1], sys.argv[2], sys.argv[3]
device = "cuda" if device == "auto" and torch.cuda.is_available() else device
ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
logits = []
for path in (a, b):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        logits.append(model(input_ids=ids).logits.float().cpu())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
equal = torch.equal(*logits)
diff = float((logits[0] - logits[1]).abs().max())
print(json.dumps({"summary": f"equal={equal} diff={diff:g}"}))
sys.exit(0 if equal else 1)
EOF
done

# -- the table ------------------------------------------------------------------------
printf '\nverify --forward at scale: SIZE=%s DEVICE=%s MAX_MEMORY=%s\n' "$SIZE" "$DEVICE" "$MAX_MEMORY"
printf '%-24s %8s %5s  %-10s %s\n' step seconds exit verdict details
for row in "${ROWS[@]}"; do
    IFS='|' read -r name secs rc verdict details <<<"$row"
    printf '%-24s %8s %5s  %-10s %s\n' "$name" "$secs" "$rc" "$verdict" "$details"
done
exit $FAILED

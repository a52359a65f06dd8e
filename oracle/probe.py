"""Load one checkpoint folder in one real consumer and write what it loaded.

    python oracle/probe.py CONSUMER OUT_DIR CASE_DIR...
CONSUMER: tf (transformers 4 or 5, whichever this venv has), vllm, mlx, llamacpp, reference.
Writes OUT_DIR/<case>.npz with `embed` / `head` (the weights the consumer serves, where it exposes them),
`logprobs` (log-softmax of the last position's logits for TOKENS) and OUT_DIR/<case>.json with `ok`,
`error` (the load or forward error, one line), `version` and `log` (warnings it printed).
`reference` (run in a transformers venv) writes `ref:<embed>|<head>` log-probs for every pairing
of the file's stored embedding/head tensors, to recognise what a consumer that exposes no
weights (llama.cpp's runtime) computes with.
Runs with no network: every hub lookup is disabled.
"""

from __future__ import annotations

import io
import json
import os
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

TOKENS = [1, 5, 17, 42, 99, 7, 63, 12]


def log_softmax(x):
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def config(case: Path) -> dict:
    return json.loads((case / "config.json").read_text())


def probe_tf(case: Path) -> tuple[dict, str]:
    import torch
    import transformers

    cfg = config(case)
    cls = (
        transformers.LlavaForConditionalGeneration
        if cfg["model_type"] == "llava"
        else transformers.AutoModelForCausalLM
    )
    kw = (
        {"dtype": torch.float32}
        if transformers.__version__ >= "4.56"
        else {"torch_dtype": torch.float32}
    )
    model = cls.from_pretrained(str(case), **kw)
    model.eval()
    with torch.no_grad():  # the forward first: a load that left a tensor unfilled fails here
        logits = model(input_ids=torch.tensor([TOKENS])).logits[0, -1]
    out = {
        "embed": model.get_input_embeddings().weight.detach().float().numpy().copy(),
        "head": model.get_output_embeddings().weight.detach().float().numpy().copy(),
        "logprobs": log_softmax(logits.numpy()),
    }
    return out, transformers.__version__


def probe_reference(case: Path) -> tuple[dict, str]:
    """Log-probs for every pairing of the file's stored embedding and head."""
    import torch
    import transformers

    names = json.loads((case.parent / "cases.json").read_text())
    entry = next(e for e in names if e["name"] == case.name)
    stored = {}
    if (case / "model.safetensors").exists():
        from safetensors.torch import load_file

        stored = load_file(str(case / "model.safetensors"))
    else:
        stored = torch.load(case / "pytorch_model.bin", weights_only=True)
    cands = {k: stored[k] for k in (entry["embed"], entry["head"]) if k in stored}
    cfg = config(case)
    text = cfg.get("text_config", cfg)
    base = {k: v for k, v in text.items() if k not in ("architectures", "model_type")}
    out = {}
    for ek, e in cands.items():
        for hk, h in cands.items():
            conf = transformers.AutoConfig.for_model(
                text.get("model_type", "llama"),
                **dict(base, vocab_size=e.shape[0], tie_word_embeddings=False),
            )
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(conf).eval()
            prefix = "language_model." if cfg["model_type"] == "llava" else ""
            sd = {k[len(prefix) :]: v for k, v in stored.items() if k.startswith(prefix)}
            sd["model.embed_tokens.weight"] = e
            model.lm_head = torch.nn.Linear(h.shape[1], h.shape[0], bias=False)
            sd["lm_head.weight"] = h
            model.load_state_dict(sd, strict=False)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([TOKENS])).logits[0, -1]
            out[f"ref:{ek}|{hk}"] = log_softmax(logits.numpy())
    return out, transformers.__version__


def probe_vllm(case: Path) -> tuple[dict, str]:
    import vllm
    from vllm import LLM, SamplingParams

    cfg = config(case)
    vocab = cfg.get("text_config", cfg)["vocab_size"]
    llm = LLM(
        model=str(case),
        dtype="float32",
        skip_tokenizer_init=True,
        enforce_eager=True,
        max_model_len=128,
        max_logprobs=vocab,
        max_num_seqs=1,
        seed=0,
        gpu_memory_utilization=0.08,  # on the CPU backend: the share of RAM it reserves
        limit_mm_per_prompt={"image": 0} if cfg["model_type"] == "llava" else None,
    )

    def grab(model):
        import torch

        def find(sub):
            for n, p in model.named_parameters():
                if n.endswith(sub):
                    return p.detach().float().cpu().numpy().copy()
            return None

        emb = find("embed_tokens.weight")
        head = find("lm_head.weight")
        if head is None and getattr(model, "lm_head", None) is not None:
            w = getattr(model.lm_head, "weight", None)
            head = w.detach().float().cpu().numpy().copy() if isinstance(w, torch.Tensor) else None
        if head is None and getattr(getattr(model, "language_model", None), "lm_head", None):
            head = model.language_model.lm_head.weight.detach().float().cpu().numpy().copy()
        return emb, head

    ((emb, head),) = llm.apply_model(grab)
    res = llm.generate(
        [{"prompt_token_ids": TOKENS}],
        SamplingParams(max_tokens=1, logprobs=vocab, temperature=0.0),
        use_tqdm=False,
    )
    lp = res[0].outputs[0].logprobs[0]
    import numpy as np

    vec = np.full(vocab, -np.inf)
    for tok, p in lp.items():
        vec[tok] = p.logprob
    out = {"logprobs": vec}
    if emb is not None:
        out["embed"] = emb
    if head is not None:
        out["head"] = head
    return out, vllm.__version__


def probe_mlx(case: Path) -> tuple[dict, str]:
    import mlx.core as mx
    import mlx_lm
    import numpy as np
    from mlx_lm.utils import load_model

    model, _ = load_model(case)
    inner = getattr(model, "language_model", model)
    out = {"embed": np.array(inner.model.embed_tokens.weight.astype(mx.float32))}
    if hasattr(inner, "lm_head"):
        out["head"] = np.array(inner.lm_head.weight.astype(mx.float32))
    logits = model(mx.array([TOKENS]))[0, -1].astype(mx.float32)
    out["logprobs"] = log_softmax(np.array(logits))
    try:
        from importlib.metadata import version

        return out, version("mlx-lm")
    except Exception:
        return out, getattr(mlx_lm, "__version__", "?")


def probe_llamacpp(case: Path, work: Path) -> tuple[dict, str]:
    import subprocess

    import numpy as np

    venv = Path(sys.executable).parent.parent
    convert = venv / "llama.cpp" / "convert_hf_to_gguf.py"
    gguf_path = work.with_suffix(".gguf")
    r = subprocess.run(
        [sys.executable, str(convert), str(case), "--outfile", str(gguf_path), "--outtype", "f32"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        raise RuntimeError("convert_hf_to_gguf.py: " + (lines[-1] if lines else "failed"))
    from gguf import GGUFReader

    out = {}
    reader = GGUFReader(str(gguf_path))
    for t in reader.tensors:
        if t.name in ("token_embd.weight", "output.weight"):
            arr = np.array(t.data, dtype=np.float32).reshape([int(x) for x in t.shape[::-1]])
            out["gguf_embed" if t.name == "token_embd.weight" else "gguf_head"] = arr
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf_path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0
    )
    llm.eval(TOKENS)
    out["logprobs"] = log_softmax(np.array(llm.scores[len(TOKENS) - 1]))
    ver = llama_cpp.__version__
    gguf_path.unlink()
    return out, ver


def probe_one(consumer: str, case: Path, out: Path) -> None:
    buf = io.StringIO()
    status = {"ok": False, "error": None, "version": None}
    arrays: dict = {}
    try:
        with redirect_stdout(buf), redirect_stderr(buf):
            if consumer == "tf":
                arrays, status["version"] = probe_tf(case)
            elif consumer == "reference":
                arrays, status["version"] = probe_reference(case)
            elif consumer == "vllm":
                arrays, status["version"] = probe_vllm(case)
            elif consumer == "mlx":
                arrays, status["version"] = probe_mlx(case)
            elif consumer == "llamacpp":
                arrays, status["version"] = probe_llamacpp(case, out)
            else:
                raise SystemExit(f"unknown consumer {consumer}")
        status["ok"] = True
    except Exception as e:  # the consumer refused: keep its one-line reason
        msg = " ".join(str(e).split())
        status["error"] = f"{type(e).__name__}: {msg}"[:600]
        status["traceback"] = traceback.format_exc()[-3000:]
    import numpy as np

    np.savez(out, **{k: np.asarray(v) for k, v in arrays.items()})
    status["log"] = buf.getvalue()[-6000:]
    out.with_suffix(".json").write_text(json.dumps(status, indent=1))


def main() -> int:
    """probe.py CONSUMER OUT_DIR CASE_DIR...: one process per consumer, one library import."""
    consumer, outdir = sys.argv[1], Path(sys.argv[2])
    outdir.mkdir(parents=True, exist_ok=True)
    for arg in sys.argv[3:]:
        case = Path(arg).resolve()
        probe_one(consumer, case, outdir / f"{case.name}.npz")
        print(case.name, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

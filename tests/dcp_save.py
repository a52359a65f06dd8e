"""Write torch distributed checkpoints of a tiny tied Llama, as training jobs do.

``python dcp_save.py OUT [SIZE]`` writes into OUT:

- ``config.json``: the model's config (tie_word_embeddings true);
- ``fsdp/``: 2 ranks (gloo, CPU, 127.0.0.1) train the model wrapped in FSDP2
  (``fully_shard``) for two steps, then ``dcp.save(model.state_dict())``: every
  tensor split on dimension 0 across the ranks' files, the tied pair stored twice;
- ``nested/``: the same ranks' ``{"model": ..., "optim": ...}`` state;
- ``single/``: one process's ``dcp.save`` of the trained model's full state dict;
- ``logits.pt``: the trained model's logits on ``INPUT``, the reference for loads.

With SIZE ``large`` the model is some 1 GB (for the benchmark) and only ``fsdp/``
and ``config.json`` are written.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch

INPUT = [[1, 5, 9, 17, 33, 65, 3, 2]]
SIZES = {
    "small": {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "layers": 2},
    "large": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192, "layers": 2},
}


def config(size: str):  # noqa: ANN201
    from transformers import LlamaConfig

    s = SIZES[size]
    return LlamaConfig(
        vocab_size=s["vocab_size"],
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["layers"],
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


def build(size: str):  # noqa: ANN201
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config(size))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def work(rank: int, world: int, port: int, out: str, size: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build(size)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    if size == "small":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.tensor(INPUT)
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    dcp.save(model.state_dict(), checkpoint_id=os.path.join(out, "fsdp"))
    if size == "small":
        # the same save, each rank's file one safetensors file (torch's other serialisation);
        # safetensors refuses two names of one storage, so the head goes as its own copy
        from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

        state = model.state_dict()
        state["lm_head.weight"] = state["lm_head.weight"].clone()
        dcp.save(
            state,
            storage_writer=FileSystemWriter(
                os.path.join(out, "fsdp-safetensors"),
                serialization_format=SerializationFormat.SAFETENSORS,
            ),
        )
        dcp.save(
            {"model": model.state_dict(), "optim": opt.state_dict()},
            checkpoint_id=os.path.join(out, "nested"),
        )
        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            torch.save(full, os.path.join(out, "full.pt"))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    import torch.distributed.checkpoint as dcp
    import torch.multiprocessing as mp

    out, size = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "small"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    cfg = config(size).to_dict() | {"architectures": ["LlamaForCausalLM"]}
    (out / "config.json").write_text(json.dumps(cfg))
    build(size)  # imported once here: the ranks are forked with it (CPU only, no CUDA state)
    mp.start_processes(work, args=(2, free_port(), str(out), size), nprocs=2, start_method="fork")
    if size != "small":
        return
    model = build(size)
    full = torch.load(out / "full.pt", weights_only=True)
    (out / "full.pt").unlink()
    model.load_state_dict(full, strict=False)
    model.eval()
    with torch.no_grad():
        torch.save(model(input_ids=torch.tensor(INPUT)).logits, out / "logits.pt")
    dcp.save(model.state_dict(), checkpoint_id=str(out / "single"), no_dist=True)


if __name__ == "__main__":
    main()

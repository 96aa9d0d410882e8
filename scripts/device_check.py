"""Helpers of scripts/device_check.sh, for a lent GPU machine that fetches nothing.

    python scripts/device_check.py build NAME DIR   # a random-weight model of NAME's real shape
    python scripts/device_check.py time LABEL OUT.jsonl -- MLPIM ARGS...

`build` saves, like a download (`model=hf model.path=DIR`), a model with the real shape of
SmolLM2-135M or Gemma 3 270M (their Hugging Face configs, as the dequantized GGUF files give
them) and random weights, over the word-level tokenizer of the IOI vocabulary (the vocabulary
size stays the real one): no GGUF file travels, and speed does not depend on the weights'
values. `time` runs `mlpim ARGS` in this process and appends one JSON line: wall seconds (of the
command, and of the process since its start, imports included), the peak GPU memory allocated,
the peak RSS, the device and the exit code.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: the process's own time counts them

import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

SMOLLM2 = {  # SmolLM2-135M-Instruct (LlamaConfig)
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
}
GEMMA3 = {  # Gemma 3 270M (Gemma3TextConfig; its default layer_types: 5 sliding-window to 1 global)
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "vocab_size": 262144,
    "max_position_embeddings": 32768,
    "sliding_window": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,  # rotary bases: the config's defaults, 1e6 global, 1e4 local
}
SHAPES = {"smollm2-135m": ("llama", SMOLLM2), "gemma3-270m": ("gemma3_text", GEMMA3)}


def build(name: str, path: Path, **changes) -> None:
    """Save a random-weight model of `name`'s shape (with `changes` to its config, for a quick
    try on a CPU) and the IOI word tokenizer at `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mlpim.config import compose
    from mlpim.engine.tiny import word_tokenizer
    from mlpim.tasks import task_vocabulary

    model_type, sizes = SHAPES[name]
    tok = word_tokenizer(task_vocabulary(compose(["model=tiny"]).dataset))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    sizes = {**sizes, **ids, "pad_token_id": tok.pad_token_id, **changes}
    conf = AutoConfig.for_model(model_type, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n / 1e6:.1f} M parameters, random weights, saved in {path}")


def timed(label: str, out: Path, args: list[str]) -> int:
    """Run `mlpim ARGS` here; append its times and peak memory to `out`; its exit code."""
    from mlpim.cli import main

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start, code = time.perf_counter(), 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    gib = lambda n: round(n / 2**30, 3)  # noqa: E731
    row = {
        "label": label,
        "args": " ".join(args),
        "exit": code,
        "seconds": round(time.perf_counter() - start, 2),
        "process_seconds": round(time.perf_counter() - START, 2),
        "peak_gpu_allocated_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
        "peak_rss_gib": gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return code


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "build":
        build(rest[0], Path(rest[1]))
    elif cmd == "time":
        label, out, sep, *args = rest
        assert sep == "--", "usage: device_check.py time LABEL OUT.jsonl -- MLPIM ARGS"
        sys.exit(timed(label, Path(out), args))
    else:
        sys.exit(f"unknown command {cmd!r}; see the docstring")

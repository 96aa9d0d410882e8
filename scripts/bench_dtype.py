"""`make bench`: the model's hot operations in float32 and bfloat16 on this CPU, side by side.

usage: python scripts/bench_dtype.py [--threads N] [--repeats R]

SmolLM2-135M's shapes (640 rows = 32 prompts x 20 tokens, d_model 576, d_mlp 1536, vocabulary
49,152). Each operation is timed in both dtypes in alternation, and the fastest of R calls is
kept, so that load from other jobs touches both alike. Whether bfloat16 pays on a CPU depends on
its 16-bit units (avx512_bf16, amx_bf16), which the first line names.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROWS, D, D_MLP, VOCAB = 640, 576, 1536, 49152


def cpu_units() -> str:
    """The CPU's model name and its 16-bit arithmetic flags, from /proc/cpuinfo where it exists."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if "model name" in ln), "")
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    units = [f for f in ("avx512_bf16", "amx_bf16", "avx512_fp16") if f in flags]
    return f"{name or 'unknown CPU'}; 16-bit units: {', '.join(units) or 'none'}"


def operations(dtype: torch.dtype) -> dict[str, tuple]:
    """name -> (function, arguments) in `dtype`, with fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x, w_lin, w_in, h = r(ROWS, D), r(D_MLP, D), r(D, D_MLP), r(ROWS, D_MLP)
    end, w_u, q, k = r(32, D), r(VOCAB, D), r(32 * 9, 1, 64), r(32 * 9, 64, 20)
    return {
        "F.linear(x, W), W out x in, 640 x 576 -> 1536": (F.linear, x, w_lin),
        "x @ W, W in x out, the same shapes": (torch.matmul, x, w_in),
        "unembedding of 32 END rows, 576 -> 49,152": (F.linear, end, w_u),
        "attention scores at END, 32 x 9 heads, 1 x 64 @ 64 x 20": (torch.bmm, q, k),
        "SiLU x up, 640 x 1536": (lambda a: F.silu(a) * a, h),
    }


def best_ms(fn, args, repeats: int) -> float:
    """The fastest of `repeats` calls, in milliseconds (one warm-up call first)."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    f32, bf16 = operations(torch.float32), operations(torch.bfloat16)
    print(f"{cpu_units()}; torch {torch.__version__}, {args.threads} thread(s), ms per call")
    print("\n| operation | float32 | bfloat16 | ratio |\n|---|---|---|---|")
    for name, (fn, *a32) in f32.items():
        _, *a16 = bf16[name]
        t32, t16 = [], []
        for _ in range(3):  # alternate, so that other load touches both
            t32.append(best_ms(fn, a32, args.repeats))
            t16.append(best_ms(fn, a16, args.repeats))
        print(f"| {name} | {min(t32):.2f} | {min(t16):.2f} | {min(t16) / min(t32):.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Train a 1-D DAS direction with pyvene 0.1.8's own training loop, and save it as pyvene does.

    python scripts/pyvene_direction.py OUT_DIR [--epochs 10] [--lr 0.01] [overrides ...]

pyvene, not mlpim, finds the direction: an `IntervenableModel` with a
`LowRankRotatedSpaceIntervention` (k=1) at `model.layers[L].mlp.down_proj.input`, trained by
`IntervenableModel.train_alignment` (Adam, linear warm-up and decay) on mlpim's IOI train pairs
(`mlpim.tasks.ioi.paper_pairs`: ABB<->BAB, END to END, cross-entropy on the patched answer), and
saved by `IntervenableModel.save` in OUT_DIR/pyvene. The same vector is written as
OUT_DIR/direction.npy, so that `mlpim check OUT_DIR/pyvene` and `mlpim check
OUT_DIR/direction.npy direction_site=mlp_post direction_layer=L` can be compared
(docs/bring-your-own.md).

Why that component: mlpim's MLP site is `mlp_post`, TransformerLens's `mlp.hook_post`, the input
of the MLP's output projection: act(gate) * up on SmolLM2's gated MLP. pyvene's named
`mlp_activation` is `act_fn`'s output, before the `* up` product (another space), and its
`mlp_input` is the MLP's d_model-wide input; the module path of `down_proj`'s input is exactly
`mlp_post`, and mlpim's pyvene reader maps it so. pyvene runs on the Hugging Face model
unwrapped (`mlpim.engine.models.load_hf`): the TransformerBridge swaps in its own modules, and
`train_alignment` removes every forward hook of the model it trains on. Before saving, the script
checks that pyvene's patch equals mlpim's at mlp_post on a test batch (the printed gap).

Overrides are mlpim's (model=..., site.layer=..., seed=..., dataset.*): the layer defaults to the
model's landmark `mlp_in_the_middle` (20 on SmolLM2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from mlpim.config import compose
from mlpim.engine.interventions import patched_end_logits, prepare
from mlpim.engine.models import load_hf
from mlpim.engine.patching import subspace
from mlpim.experiments.common import model_for, model_spec
from mlpim.tasks import pad_id, task_vocabulary
from mlpim.tasks.ioi import paper_pairs


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for pyvene/ and direction.npy (must be new)")
    p.add_argument("--epochs", type=int, default=10, help="train_alignment epochs")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (mlpim's default)")
    return p.parse_known_args(argv)


def right_padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    """Rows padded on the right: train_alignment passes input_ids only (no attention mask), and
    with causal attention the pads after END change nothing up to END."""
    width = max(map(len, rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def pyvene_batches(batches, pad: int) -> list[dict]:
    """mlpim's left-padded pair batches as train_alignment's inputs: base and source ids, the
    END position of each row (`source_0->base.0.pos`: source, `.1.pos`: base), and labels as
    (base END position, patched answer) so that the loss reads the logits at END."""
    out = []
    for pb in batches:
        sides = {}
        for side in ("base", "source"):
            p = getattr(pb, side)
            rows = [p.tokens[i][p.mask[i].bool()].tolist() for i in range(len(pb))]
            sides[side] = (right_padded(rows, pad), [len(r) - 1 for r in rows])
        (base, base_end), (source, source_end) = sides["base"], sides["source"]
        labels = torch.stack([torch.tensor(base_end), pb.label.cpu()], dim=1)
        out.append(
            {
                "input_ids": base,
                "source_input_ids": source,
                "labels": labels,
                "source_0->base.0.pos": [[e] for e in source_end],
                "source_0->base.1.pos": [[e] for e in base_end],
            }
        )
    return out


def end_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's logits at its base END position."""
    return logits[torch.arange(len(labels)), labels[:, 0]]


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(end_logits(logits, labels), labels[:, 1])


def metrics_fn(logits: list[torch.Tensor], labels: list[torch.Tensor]) -> dict:
    hits = end_logits(logits[0], labels[0]).argmax(-1) == labels[0][:, 1]
    return {"iia": hits.float().mean().item()}


def component(hf, layer: int) -> str:
    """The module path of the MLP output projection's input (mlp_post): Llama family, GPT-2."""
    if hasattr(hf, "model"):
        return f"model.layers[{layer}].mlp.down_proj.input"
    return f"transformer.h[{layer}].mlp.c_proj.input"


def train(cfg, hf, batches: list[dict], layer: int, d_mlp: int, epochs: int, lr: float):
    """pyvene's IntervenableModel, trained by its own `train_alignment`; (model, intervention)."""
    import pyvene as pv

    torch.manual_seed(cfg.seed)
    for p in hf.parameters():
        p.requires_grad_(False)
    iv = pv.LowRankRotatedSpaceIntervention(embed_dim=d_mlp, low_rank_dimension=1)
    rep = {
        "layer": layer,
        "component": component(hf, layer),
        "unit": "pos",
        "max_number_of_units": 1,
        "intervention": iv,
    }
    ivm = pv.IntervenableModel(pv.IntervenableConfig(representations=[rep]), hf)
    ivm.disable_model_gradients()
    ivm.train_alignment(batches, loss_fn, metrics_fn, None, lr=lr, epochs=epochs)
    return ivm, iv


def pyvene_vs_mlpim(model, ivm, iv, pb, layer: int) -> float:
    """Max |pyvene's patched END logits - mlpim's| on one batch, the trained basis at mlp_post."""
    (batch,) = pyvene_batches([pb], pad_id(model.tokenizer))
    locs = {"sources->base": ([batch["source_0->base.0.pos"]], [batch["source_0->base.1.pos"]])}
    base, source = {"input_ids": batch["input_ids"]}, [{"input_ids": batch["source_input_ids"]}]
    with torch.no_grad():
        _, out = ivm(base, source, locs)
        theirs = end_logits(out.logits, batch["labels"])
        (prep,) = prepare(model, [pb], "mlp_post", layer, "full")
        ours = patched_end_logits(model, prep, subspace(iv.rotate_layer.weight.detach()))
    return (theirs - ours).abs().max().item()


def main(argv: list[str]) -> None:
    args, overrides = parse_args(argv)
    if args.out.exists():
        sys.exit(f"pyvene_direction: {args.out} exists; give a new folder")
    cfg = compose(["experiment=ioi_mlp8_das", "device=cpu", *overrides])
    layer = int(cfg.site.layer)
    model = model_for(cfg)  # mlpim's bridge: the pairs, and the check of the patched logits
    vocab = task_vocabulary(cfg.dataset) if cfg.model.source == "tiny" else None
    hf, _ = load_hf(model_spec(cfg), vocab)
    pairs = {s: paper_pairs(model.tokenizer, cfg.dataset, s, cfg.seed) for s in ("train", "test")}
    batches = pyvene_batches(pairs["train"], pad_id(model.tokenizer))
    ivm, iv = train(cfg, hf, batches, layer, model.cfg.d_mlp, args.epochs, args.lr)
    gap = pyvene_vs_mlpim(model, ivm, iv, pairs["test"][0], layer)
    print(f"pyvene vs mlpim patched END logits at mlp_post L{layer}: max gap {gap:.2e}")
    args.out.mkdir(parents=True)
    ivm.save(str(args.out / "pyvene"))
    np.save(args.out / "direction.npy", iv.rotate_layer.weight.detach()[:, 0].numpy())
    print(f"saved {args.out / 'pyvene'} and {args.out / 'direction.npy'} (mlp_post L{layer})")


if __name__ == "__main__":
    main(sys.argv[1:])

"""A tiny, fast training task for the engine tests (and their subprocess / torchrun runs).

Regression of a fixed random linear map with a dropout MLP: it exercises shuffled seeded data,
per-sample random augmentation (noise drawn from the global RNG inside ``__getitem__``), RNG in
the forward pass (dropout), two streams and a validation metric, in milliseconds per step.

Run as a script: ``python tests/_engine_task.py RUN_DIR MAX_STEPS [--sleep S] [--ckpt-every N]
[--out FILE]`` trains (resuming when RUN_DIR has a checkpoint) and writes the final weights'
sha256 to FILE (rank-suffixed under torchrun).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from castseg.config import TrainConfig
from castseg.engine import BatchStream, Trainer, cleanup_distributed, init_distributed, unwrap_model

DIM = 8


class NoisyRegression(Dataset):
    """``n`` fixed inputs; ``__getitem__`` adds fresh noise from torch's global RNG (an "augmentation")."""

    def __init__(self, n: int = 24, seed: int = 0, noise: float = 0.05):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM, generator=g)
        w = torch.randn(DIM, 1, generator=torch.Generator().manual_seed(123))
        self.y = self.x @ w
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + self.noise * torch.randn(DIM), self.y[i]


def make_model(seed: int = 0, dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))


def loss_fn(model, batches, step, sleep: float = 0.0, crash_at: int | None = None):
    if sleep:
        time.sleep(sleep)
    if crash_at is not None and step == crash_at:
        os._exit(3)  # a hard crash: no cleanup, no exception handling
    x, y = batches["labeled"]
    xu, _ = batches["unlabeled"]
    # One forward over both streams, as the CAST objective does (what DDP needs).
    out = model(torch.cat([x, xu]))
    sup = nn.functional.mse_loss(out[: len(x)], y)
    reg = out[len(x):].pow(2).mean()
    return {"loss": sup + 0.01 * reg, "loss_sup": sup, "loss_reg": reg}


def make_eval(seed: int = 7):
    val = NoisyRegression(16, seed=seed, noise=0.0)

    def evaluate(model):
        with torch.no_grad():
            mse = nn.functional.mse_loss(model(val.x), val.y).item()
        return {"mse": mse, "neg_mse": -mse}

    return evaluate


def make_trainer(run_dir, max_steps: int = 30, sleep: float = 0.0, dist=None, crash_at: int | None = None,
                 dropout: float = 0.2, **cfg_kw) -> Trainer:
    cfg = TrainConfig(**{**dict(max_steps=max_steps, batch_size=4, lr=1e-2, warmup_steps=3, ckpt_every=5,
                                val_every=10, log_every=5, device="cpu", best_metric="mse", best_mode="min"),
                         **cfg_kw})
    loaders = {"labeled": BatchStream(NoisyRegression(24, seed=1), cfg.batch_size),
               "unlabeled": BatchStream(NoisyRegression(40, seed=2), cfg.batch_size)}
    return Trainer(make_model(dropout=dropout), lambda m, b, s: loss_fn(m, b, s, sleep, crash_at), loaders, cfg,
                   run_dir, evaluate_fn=make_eval(), name="toy", dist=dist)


def weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(unwrap_model(model).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    from castseg.console import install

    install()  # the trainer's messages on stderr, as the CLI shows them (the library alone has a NullHandler)

    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("max_steps", type=int)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--ckpt-every", type=int, default=5)
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--crash-at", type=int, help="exit abruptly when this step starts")
    ap.add_argument("--batch-size", type=int, default=4, help="per process")
    ap.add_argument("--no-dropout", action="store_true", help="no RNG in the forward: runs over the same global "
                                                               "batch match whatever the process count")
    ap.add_argument("--out", help="file for 'weights-sha256 final-val-mse' and the weights (json) "
                                  "(.rankN under torchrun)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    trainer = make_trainer(Path(a.run_dir), a.max_steps, a.sleep, dist=info, ckpt_every=a.ckpt_every,
                           accumulate=a.accumulate, crash_at=a.crash_at, batch_size=a.batch_size,
                           dropout=0.0 if a.no_dropout else 0.2)
    result = trainer.fit()
    if a.out:
        out = Path(a.out)
        if info.enabled:
            out = out.with_name(f"{out.name}.rank{info.rank}")
        weights = [v.flatten().tolist() for _, v in sorted(unwrap_model(trainer.model).state_dict().items())]
        out.write_text(f"{weights_hash(trainer.model)} {(result.get('val') or {}).get('mse')}\n"
                       + json.dumps(weights) + "\n")
    # as the CLI does: a rank tearing gloo down while rank 0 still writes aborts a finished run
    cleanup_distributed(synchronize=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())

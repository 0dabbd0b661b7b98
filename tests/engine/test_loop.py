"""castseg.engine.loop.Trainer in-process, on a two-layer regression model: the schedule the
optimizer actually sees, step and batch counts, the default parameter groups, validation
(when, on what, and that it leaves the trajectory alone), log rows, checkpoints, best model,
resume with accumulation, and the errors it raises. (test_engine.py covers kill/resume in a
subprocess, corrupt checkpoints, skip/restart of finished stages, accumulation vs big batch,
clipping and torchrun.)"""

from __future__ import annotations

import csv
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from castseg.config import TrainConfig
from castseg.engine import BatchStream, Trainer, find_checkpoint
from castseg.engine.checkpointing import load_model_weights, read_best
from castseg.engine.loop import describe_changes

DIM = 4


class Regression(Dataset):
    """``n`` fixed inputs and the targets of a fixed linear map; item i is ``(x_i, y_i)``."""

    def __init__(self, n: int = 16, seed: int = 0):
        self.x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
        self.y = self.x @ torch.arange(1.0, DIM + 1)[:, None]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Net(nn.Module):
    """``encoder`` (gets ``lr × backbone_lr_mult``) then ``head``; tanh keeps every gradient non-zero."""

    def __init__(self, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Linear(DIM, 8)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.encoder(x))))


def mse(model, batches, step):
    x, y = batches["labeled"]
    return {"loss": F.mse_loss(model(x), y)}


def make(run_dir, loss_fn=mse, evaluate_fn=None, model=None, streams=None, param_groups=None, **kw) -> Trainer:
    cfg = TrainConfig(**{"max_steps": 6, "batch_size": 4, "lr": 1e-2, "ckpt_every": 0, "log_every": 1,
                         "device": "cpu", "schedule": "constant", "seed": 0, **kw})
    streams = streams or {"labeled": BatchStream(Regression(), cfg.batch_size)}
    return Trainer(model or Net(), loss_fn, streams, cfg, run_dir, evaluate_fn=evaluate_fn,
                   param_groups=param_groups, name="loop")


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def log_rows(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def record_lrs(trainer: Trainer) -> list[dict[str, float]]:
    """The lr of every group as each optimizer step applies it."""
    seen: list[dict[str, float]] = []
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: seen.append({g["name"]: g["lr"] for g in opt.param_groups}))
    return seen


# --- schedule and step counts ------------------------------------------------------------------


def test_applied_lr_warms_up_then_decays_poly_once_per_optimizer_step(tmp_path):
    t = make(tmp_path, max_steps=10, lr=0.1, backbone_lr_mult=0.5, warmup_steps=4, schedule="poly", poly_power=0.9,
             accumulate=2)  # two micro-batches per step: the schedule must still advance once per step
    seen = record_lrs(t)
    t.fit()
    want = [0.1 * (1 - s / 10) ** 0.9 * min(1.0, (s + 1) / 4) for s in range(10)]
    assert want[0] == pytest.approx(0.025) and want[3] == pytest.approx(0.1 * 0.7 ** 0.9)  # by hand
    assert len(seen) == 10
    for name, mult in (("head", 1.0), ("head_no_decay", 1.0), ("encoder", 0.5), ("encoder_no_decay", 0.5)):
        assert [s[name] for s in seen] == pytest.approx([mult * w for w in want], rel=1e-9), name
    # log.csv's lr is the largest group's lr at the row's step
    assert [float(r["lr"]) for r in log_rows(tmp_path)] == pytest.approx(want, rel=1e-9)


def test_applied_lr_cosine_without_warmup(tmp_path):
    t = make(tmp_path, max_steps=4, lr=0.1, schedule="cosine")
    seen = record_lrs(t)
    t.fit()
    c = math.cos(math.pi / 4)
    assert [s["head"] for s in seen] == pytest.approx([0.1, 0.1 * (1 + c) / 2, 0.05, 0.1 * (1 - c) / 2], rel=1e-9)


def test_exactly_max_steps_optimizer_steps_each_drawing_accumulate_batches_per_stream(tmp_path):
    calls = []

    def loss_fn(model, batches, step):
        calls.append((step, batches["labeled"][0].shape[0], batches["unlabeled"][0].shape[0]))
        return mse(model, batches, step)

    streams = {"labeled": BatchStream(Regression(16), 4), "unlabeled": BatchStream(Regression(10, seed=1), 2)}
    t = make(tmp_path, loss_fn=loss_fn, streams=streams, max_steps=5, accumulate=3)
    steps = []
    t.optimizer.register_step_post_hook(lambda *_: steps.append(t.step))
    result = t.fit()
    assert steps == [0, 1, 2, 3, 4] and t.step == result["step"] == 5
    assert calls == [(s, 4, 2) for s in range(5) for _ in range(3)]  # 0-based step, three micro-batches each
    # 15 batches from each stream: 16 items / 4 = 4 per epoch, 10 / 2 = 5 per epoch
    assert t.streams["labeled"].state_dict() == {"epoch": 3, "consumed": 3}
    assert t.streams["unlabeled"].state_dict() == {"epoch": 2, "consumed": 5}
    assert len(log_rows(tmp_path)) == 5


# --- parameter groups --------------------------------------------------------------------------


def test_default_groups_scale_the_encoder_lr_and_decay_only_weight_matrices(tmp_path):
    lr, mult, wd = 0.1, 0.25, 0.5
    # A zero gradient leaves AdamW's weight decay as the only change: w ← w·(1 − lr·wd).
    zero = lambda m, b, s: {"loss": m(b["labeled"][0]).sum() * 0.0}  # noqa: E731
    t = make(tmp_path, loss_fn=zero, max_steps=1, lr=lr, backbone_lr_mult=mult, weight_decay=wd)
    before = weights(t.model)
    t.fit()
    after = weights(t.model)
    torch.testing.assert_close(after["encoder.weight"], before["encoder.weight"] * (1 - lr * mult * wd))
    torch.testing.assert_close(after["head.weight"], before["head.weight"] * (1 - lr * wd))
    assert torch.equal(after["encoder.bias"], before["encoder.bias"])  # biases: no decay
    assert torch.equal(after["head.bias"], before["head.bias"])


def test_first_adamw_step_moves_encoder_weights_by_backbone_lr_mult_times_less(tmp_path):
    # AdamW's first update is lr·g/(|g| + eps) ≈ ±lr for every parameter with a gradient.
    t = make(tmp_path, max_steps=1, lr=0.01, backbone_lr_mult=0.1, weight_decay=0.0, grad_clip=0.0)
    before = weights(t.model)
    t.fit()
    for name, want in (("encoder.weight", 1e-3), ("encoder.bias", 1e-3), ("head.weight", 1e-2), ("head.bias", 1e-2)):
        moved = (t.model.state_dict()[name] - before[name]).abs()
        torch.testing.assert_close(moved, torch.full_like(moved, want), rtol=1e-3, atol=0), name


def test_caller_param_groups_replace_the_default_split(tmp_path):
    model = Net()
    groups = [{"params": list(model.head.parameters()), "lr": 0.05}]
    t = make(tmp_path, model=model, param_groups=groups, max_steps=1, lr=1.0, weight_decay=0.0, grad_clip=0.0)
    before = weights(model)
    t.fit()
    assert_same_weights({k: v for k, v in weights(model).items() if k.startswith("encoder")},
                        {k: v for k, v in before.items() if k.startswith("encoder")})  # not optimized
    moved = (model.head.weight - before["head.weight"]).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 0.05), rtol=1e-3, atol=0)


# --- validation --------------------------------------------------------------------------------


def test_evaluate_fn_every_val_every_steps_and_once_at_the_end_on_the_unwrapped_eval_model(tmp_path):
    for max_steps, val_every, want_steps in ((7, 3, [3, 6, 7]), (6, 3, [3, 6]), (5, 0, [5])):
        seen, snapshots, modes = [], {}, []

        def evaluate(model):
            seen.append((t.step, model is t.model, model.training, torch.is_grad_enabled()))
            snapshots[t.step] = weights(model)
            return {"AP": t.step / 10, "note": "x"}

        def loss_fn(model, batches, step):
            modes.append(model.training)
            return mse(model, batches, step)

        run = tmp_path / f"{max_steps}_{val_every}"
        t = make(run, loss_fn=loss_fn, evaluate_fn=evaluate, max_steps=max_steps, val_every=val_every)
        result = t.fit()
        if (max_steps, val_every) == (7, 3):
            after_7_3 = snapshots
        assert seen == [(s, True, False, False) for s in want_steps]
        assert all(modes) and len(modes) == max_steps  # back in train mode after each validation
        last = want_steps[-1]
        assert result["val"] == {"step": last, "AP": last / 10, "note": "x"} == result["best_val"]
        lines = (run / "val_metrics.jsonl").read_text().splitlines()
        assert [int(ln.split('"step": ')[1].split(",")[0]) for ln in lines] == want_steps
    # the model validated at step 3 of the 7-step run is the model after 3 optimizer steps
    three = make(tmp_path / "three", max_steps=3)
    three.fit()
    assert_same_weights(after_7_3[3], weights(three.model))
    assert not torch.equal(after_7_3[6]["head.weight"], after_7_3[3]["head.weight"])


def test_validation_leaves_the_training_trajectory_unchanged(tmp_path):
    def greedy_eval(model):  # draws from every RNG the training uses
        torch.rand(100)
        random.random()
        np.random.rand(5)
        model.train()  # even a forward pass with dropout on
        model(torch.randn(3, DIM))
        return {"AP": 0.5}

    with_val = make(tmp_path / "val", model=Net(dropout=0.5), max_steps=6, val_every=2, evaluate_fn=greedy_eval)
    with_val.fit()
    plain = make(tmp_path / "plain", model=Net(dropout=0.5), max_steps=6)
    plain.fit()
    assert_same_weights(weights(with_val.model), weights(plain.model))

    def rng_eating_loss(model, batches, step):  # the same RNG draw, not undone: the trajectory changes
        if step == 2:
            torch.rand(100)
        return mse(model, batches, step)

    moved = make(tmp_path / "moved", loss_fn=rng_eating_loss, model=Net(dropout=0.5), max_steps=6)
    moved.fit()
    assert not torch.equal(moved.model.head.weight, plain.model.head.weight)


def test_best_model_is_kept_by_best_metric_and_mode(tmp_path):
    script = {2: 0.5, 4: 0.9, 6: 0.3}
    for mode, best_step in (("max", 4), ("min", 6)):
        snaps = {}

        def evaluate(model):
            snaps[t.step] = weights(model)
            return {"AP": script[t.step]}

        run = tmp_path / mode
        t = make(run, evaluate_fn=evaluate, max_steps=6, val_every=2, save_best=True, best_mode=mode)
        result = t.fit()
        assert result["best_val"] == {"step": best_step, "AP": script[best_step]}
        assert result["val"] == {"step": 6, "AP": 0.3}
        assert read_best(run / "checkpoints" / "best") == {"step": best_step, "metrics": {"AP": script[best_step]}}
        best = Net(seed=1)
        load_model_weights(run / "checkpoints" / "best", best)
        assert_same_weights(weights(best), snaps[best_step])
    no_best = tmp_path / "off"
    make(no_best, evaluate_fn=lambda m: {"AP": 1.0}, max_steps=2, val_every=1).fit()
    assert not (no_best / "checkpoints" / "best").exists()


# --- logs and result ---------------------------------------------------------------------------


def test_log_rows_average_terms_over_micro_batches_and_steps(tmp_path):
    losses: list[float] = []

    def loss_fn(model, batches, step):
        out = mse(model, batches, step)
        losses.append(float(out["loss"].detach()))
        micro = (len(losses) - 1) % 2
        return {**out, "step_term": float(step), "micro": micro, "flag": True,
                "map": torch.zeros(3, 3), "vec": torch.ones(2)}  # bools and non-scalars are not logged

    t = make(tmp_path, loss_fn=loss_fn, max_steps=8, log_every=3, accumulate=2, grad_clip=0.0)
    result = t.fit()
    rows = log_rows(tmp_path)
    assert list(rows[0]) == ["step", "lr", "loss", "micro", "step_term", "sec_per_step", "time"]  # no clip: no norm
    assert [int(r["step"]) for r in rows] == [3, 6, 8]  # every log_every steps and the last step
    per_step = [(losses[2 * s] + losses[2 * s + 1]) / 2 for s in range(8)]
    for r, window in zip(rows, ([0, 1, 2], [3, 4, 5], [6, 7])):
        assert float(r["loss"]) == pytest.approx(sum(per_step[s] for s in window) / len(window), rel=1e-6)
        assert float(r["step_term"]) == pytest.approx(sum(window) / len(window))
        assert float(r["micro"]) == pytest.approx(0.5)
        assert float(r["sec_per_step"]) > 0
    assert [float(r["time"]) for r in rows] == sorted(float(r["time"]) for r in rows)
    assert result["train"] == pytest.approx({"lr": 1e-2, "loss": float(rows[-1]["loss"]), "micro": 0.5,
                                             "step_term": 6.5}, rel=1e-6)
    assert set(result) == {"stage", "step", "train", "val", "best_val", "elapsed_s", "checkpoint"}
    assert result["stage"] == "loop" and result["val"] is None and result["best_val"] is None
    assert result["checkpoint"] == str(tmp_path / "checkpoints" / "last")
    assert result["elapsed_s"] == pytest.approx(float(rows[-1]["time"]), abs=2e-3)


def test_training_lowers_the_loss(tmp_path):
    t = make(tmp_path, max_steps=40, lr=0.05, log_every=10, backbone_lr_mult=1.0)
    t.fit()
    first, *_, last = [float(r["loss"]) for r in log_rows(tmp_path)]
    assert last < 0.5 * first


# --- checkpoints and resume --------------------------------------------------------------------


def test_checkpoints_every_ckpt_every_steps_then_a_complete_one(tmp_path):
    seen = []

    def loss_fn(model, batches, step):
        c = find_checkpoint(tmp_path / "checkpoints" / "last")
        seen.append(None if c is None else (c.step, c.complete))
        return mse(model, batches, step)

    t = make(tmp_path, loss_fn=loss_fn, max_steps=6, ckpt_every=2)
    result = t.fit()
    assert seen == [None, None, (2, False), (2, False), (4, False), (4, False)]
    final = find_checkpoint(tmp_path / "checkpoints" / "last")
    assert final.step == 6 and final.complete and final.state["result"] == result
    stored = Net(seed=1)
    load_model_weights(tmp_path / "checkpoints" / "last", stored)
    assert_same_weights(weights(stored), weights(t.model))


def test_resume_after_a_crash_with_accumulation_two_streams_and_warmup_is_bit_exact(tmp_path):
    kw = dict(max_steps=9, accumulate=2, warmup_steps=3, schedule="poly", ckpt_every=4, log_every=2, lr=0.05)

    def streams():
        return {"labeled": BatchStream(Regression(10), 4), "unlabeled": BatchStream(Regression(7, seed=2), 3)}

    def loss_fn(model, batches, step):
        out = mse(model, batches, step)
        return {**out, "loss": out["loss"] + 0.1 * model(batches["unlabeled"][0]).pow(2).mean()}

    ref = make(tmp_path / "ref", loss_fn=loss_fn, model=Net(dropout=0.3), streams=streams(), **kw)
    ref_result = ref.fit()

    def crashing(model, batches, step):
        if step == 6:
            raise RuntimeError("simulated crash")
        return loss_fn(model, batches, step)

    with pytest.raises(RuntimeError, match="simulated crash"):
        make(tmp_path / "run", loss_fn=crashing, model=Net(dropout=0.3), streams=streams(), **kw).fit()
    assert find_checkpoint(tmp_path / "run" / "checkpoints" / "last").step == 4
    calls = []
    resumed = make(tmp_path / "run", loss_fn=lambda m, b, s: calls.append(s) or loss_fn(m, b, s),
                   model=Net(dropout=0.3), streams=streams(), **kw)
    result = resumed.fit()
    assert sorted(set(calls)) == [4, 5, 6, 7, 8]
    assert_same_weights(weights(resumed.model), weights(ref.model))
    assert result["train"] == ref_result["train"]
    drop = ("sec_per_step", "time")
    assert [{k: v for k, v in r.items() if k not in drop} for r in log_rows(tmp_path / "run")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in log_rows(tmp_path / "ref")]


# --- inputs and errors -------------------------------------------------------------------------


def test_a_dataloader_becomes_a_seeded_stream(tmp_path):
    ds = Regression(12)
    seen: dict[str, list[torch.Tensor]] = {}

    def recorder(key):
        def loss_fn(model, batches, step):
            seen.setdefault(key, []).append(batches["labeled"][0])
            return mse(model, batches, step)
        return loss_fn

    make(tmp_path / "seq", loss_fn=recorder("seq"), max_steps=4,
         streams={"labeled": DataLoader(ds, batch_size=4, shuffle=False)}).fit()
    # sequential: the dataset in order, batch after batch, then from the start again
    for got, (a, b) in zip(seen["seq"], ((0, 4), (4, 8), (8, 12), (0, 4))):
        assert torch.equal(got, ds.x[a:b])
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        make(tmp_path / key, loss_fn=recorder(key), max_steps=3, seed=seed,
             streams={"labeled": DataLoader(ds, batch_size=4, shuffle=True)}).fit()
    assert all(torch.equal(x, y) for x, y in zip(seen["a"], seen["b"]))  # the run's seed fixes the order
    assert not all(torch.equal(x, y) for x, y in zip(seen["a"], seen["c"]))
    assert not all(torch.equal(x, y) for x, y in zip(seen["a"], seen["seq"][:3]))  # shuffled
    # every epoch is a permutation: 3 batches of 4 cover the 12 items once
    assert sorted(torch.cat(seen["a"])[:, 0].tolist()) == sorted(ds.x[:, 0].tolist())


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="at least one data stream"):
        Trainer(Net(), mse, {}, TrainConfig(device="cpu"), tmp_path)
    with pytest.raises(TypeError, match="stream 'labeled': expected a BatchStream or DataLoader, got list"):
        make(tmp_path, streams={"labeled": [1, 2]})
    t = make(tmp_path, loss_fn=lambda m, b, s: {"total": F.mse_loss(m(b["labeled"][0]), b["labeled"][1])})
    with pytest.raises(KeyError, match=r"loss_fn returned \['total'\]; it must include 'loss'"):
        t.fit()
    with pytest.raises(ValueError, match="resume must be True, False or 'auto', got 'yes'"):
        make(tmp_path / "r").fit(resume="yes")


def test_describe_changes_lists_changed_leaves_and_hides_hash_values():
    old = {"loss": {"temperature": 0.1, "weight": 1.0}, "labeled": "a" * 64, "gone": 3}
    new = {"loss": {"temperature": 0.2, "weight": 1.0}, "labeled": "b" * 64, "added": [1]}
    assert describe_changes(old, new) == ["added None -> [1]", "gone 3 -> None", "labeled changed",
                                          "loss.temperature 0.1 -> 0.2"]
    assert describe_changes(old, old) == []


def test_compile_trains_through_the_compiled_model_and_checkpoints_the_plain_one(tmp_path):
    """`train.compile: true`: steps run torch.compile's module (here its cheapest backend: the
    inductor needs a C compiler and minutes); the checkpoint keeps the plain module's names."""
    calls = []

    def loss(model, batches, step):
        calls.append(type(model).__name__)
        return mse(model, batches, step)

    cfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, ckpt_every=0, log_every=1, device="cpu", compile=True)
    import torch._dynamo

    torch._dynamo.reset()
    original = torch.compile
    try:
        torch.compile = lambda m, **kw: original(m, backend="eager")
        trainer = Trainer(Net(), loss, {"labeled": BatchStream(Regression(), 4)}, cfg, tmp_path)
        trainer.fit()
    finally:
        torch.compile = original
    assert calls == ["OptimizedModule"] * 3
    ckpt = find_checkpoint(tmp_path / "checkpoints" / "last")
    net = Net(seed=1)
    load_model_weights(ckpt.path, net)  # plain names: no "_orig_mod." prefix
    assert torch.equal(net.head.weight, trainer.model.head.weight)

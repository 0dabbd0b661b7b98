"""Training engine: kill/resume determinism, atomic checkpoints, skip when complete, schedules,
accumulation, clipping, logs, streams, and DDP under torchrun (CPU, gloo)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from castseg.config import TrainConfig
from castseg.engine import BatchStream, Trainer, TrainingDiverged, lr_factor
from castseg.engine.checkpointing import STATE_JSON, STATE_TENSORS, find_checkpoint

from _kill import sigkill_after_checkpoint
from castseg.console import progress_enabled
from castseg.errors import CastsegError

sys.path.insert(0, str(Path(__file__).parent))
import _engine_task as task  # noqa: E402

TASK = Path(__file__).parent / "_engine_task.py"
ENV = {**os.environ, "CASTSEG_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def csv_rows(run_dir: Path) -> list[list[str]]:
    lines = (run_dir / "log.csv").read_text().splitlines()
    return [ln.split(",")[:-2] for ln in lines]  # without the timing columns


def test_killed_run_resumes_to_identical_weights(tmp_path, capsys):
    a = task.make_trainer(tmp_path / "A", 30)
    result_a = a.fit()
    # B: same run in a subprocess, SIGKILLed once a checkpoint at step >= 10 exists.
    proc = subprocess.Popen([sys.executable, str(TASK), str(tmp_path / "B"), "30", "--sleep", "0.06"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "B" / "checkpoints" / "last" / STATE_JSON
    sigkill_after_checkpoint(proc, state, 10, timeout=60)
    ckpt = find_checkpoint(tmp_path / "B" / "checkpoints" / "last")
    assert ckpt is not None and not ckpt.complete and 10 <= ckpt.step < 30
    b = task.make_trainer(tmp_path / "B", 30)
    result_b = b.fit()
    assert f"resumed from step {ckpt.step}" in capsys.readouterr().err
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert result_b["val"] == result_a["val"] and result_b["best_val"] == result_a["best_val"]
    assert csv_rows(tmp_path / "B") == csv_rows(tmp_path / "A")  # rows past the checkpoint were dropped
    assert (tmp_path / "B" / "val_metrics.jsonl").read_text() == (tmp_path / "A" / "val_metrics.jsonl").read_text()


def test_half_written_or_corrupt_checkpoints_are_ignored(tmp_path):
    ref = task.make_trainer(tmp_path / "ref", 10)
    ref.fit()
    run = tmp_path / "run"
    with pytest.raises(ZeroDivisionError):
        _crashing(run, at=7).fit()
    ckpts = run / "checkpoints"
    assert find_checkpoint(ckpts / "last").step == 5
    # A kill mid-swap: "last" already renamed to "last.old", the new one still a temp dir.
    os.replace(ckpts / "last", ckpts / "last.old")
    (ckpts / ".tmp-last-killed").mkdir()
    (ckpts / ".tmp-last-killed" / "model.safetensors").write_bytes(b"half a file")
    # ... and a newer "last" whose tensors were truncated.
    shutil.copytree(ckpts / "last.old", ckpts / "last")
    state = json.loads((ckpts / "last" / STATE_JSON).read_text())
    state["step"] = 9
    (ckpts / "last" / STATE_JSON).write_text(json.dumps(state))
    data = (ckpts / "last" / STATE_TENSORS).read_bytes()
    (ckpts / "last" / STATE_TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="ignoring checkpoint .*sha256"):
        assert find_checkpoint(ckpts / "last").step == 5
    t = task.make_trainer(run, 10)
    with pytest.warns(UserWarning, match="ignoring checkpoint"):
        t.fit()
    for va, vb in zip(ref.model.state_dict().values(), t.model.state_dict().values()):
        assert torch.equal(va, vb)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last"]  # temp dir and old copy cleaned up


def _crashing(run_dir, at):
    t = task.make_trainer(run_dir, 10)
    inner = t.loss_fn

    def loss_fn(model, batches, step):
        if step == at:
            raise ZeroDivisionError("simulated crash")
        return inner(model, batches, step)

    t.loss_fn = loss_fn
    return t


def test_complete_stage_is_skipped_and_changed_settings_refused(tmp_path):
    t = task.make_trainer(tmp_path, 6, ckpt_every=0)
    result = t.fit()
    assert find_checkpoint(tmp_path / "checkpoints" / "last").complete
    calls = []
    again = task.make_trainer(tmp_path, 6, ckpt_every=0)
    inner = again.loss_fn
    again.loss_fn = lambda m, b, s: calls.append(s) or inner(m, b, s)
    assert again.fit() == result and calls == []
    for va, vb in zip(t.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(va, vb)  # the finished weights are loaded into the skipped trainer's model
    with pytest.raises(CastsegError, match="max_steps 6 -> 8"):
        task.make_trainer(tmp_path, 8).fit()
    # a moved run directory: the skipped stage hands on its checkpoint where it is now
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    shutil.copytree(tmp_path, moved)
    skipped = task.make_trainer(moved, 6, ckpt_every=0).fit()
    assert skipped["checkpoint"] == str(moved / "checkpoints" / "last") != result["checkpoint"]
    assert {k: v for k, v in skipped.items() if k != "checkpoint"} == \
        {k: v for k, v in result.items() if k != "checkpoint"}
    again.fit(resume=False)
    assert calls == list(range(6))


def _counted(trainer):
    calls: list[int] = []
    inner = trainer.loss_fn
    trainer.loss_fn = lambda m, b, s: calls.append(s) or inner(m, b, s)
    return trainer, calls


def test_resume_auto_sets_a_changed_stage_aside_and_starts_over(tmp_path, capsys):
    run = tmp_path / "stage"
    first = task.make_trainer(run, 6, ckpt_every=0).fit()
    capsys.readouterr()
    t, calls = _counted(task.make_trainer(run, 6, ckpt_every=0))
    assert t.fit(resume="auto") == first and calls == []
    assert "[toy] finished earlier with the same settings, reused (step 6" in capsys.readouterr().err
    # another budget: the earlier run is renamed, never deleted, and the stage trains from step 0
    t, calls = _counted(task.make_trainer(run, 8, ckpt_every=0))
    t.fit(resume="auto")
    err = capsys.readouterr().err
    assert f"[toy] settings changed since the earlier run (max_steps 6 -> 8), starting over (the earlier run is " \
           f"kept in {tmp_path / 'stage.stale-1'})" in err
    assert calls == list(range(8)) and find_checkpoint(run / "checkpoints" / "last").step == 8
    old = find_checkpoint(tmp_path / "stage.stale-1" / "checkpoints" / "last")
    assert old.step == 6 and old.complete and (tmp_path / "stage.stale-1" / "log.csv").is_file()
    # recorded inputs and the initial weights count as settings too; the next one goes to stale-2
    t, calls = _counted(task.make_trainer(run, 8, ckpt_every=0))
    t.inputs = {"labeled": "0" * 64, "loss": {"temperature": 0.2}}
    with torch.no_grad():
        next(t.model.parameters()).add_(1.0)
    changes = "(initial_weights changed, labeled changed, loss.temperature None -> 0.2)"
    with pytest.raises(CastsegError, match=re.escape(f"trained with other settings {changes}")):
        t.fit()
    t.fit(resume="auto")
    assert f"settings changed since the earlier run {changes}, starting over" in capsys.readouterr().err
    assert calls == list(range(8)) and (tmp_path / "stage.stale-2").is_dir()


def test_resume_auto_resumes_an_interrupted_stage_with_the_same_settings(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(ZeroDivisionError):
        _crashing(run, at=7).fit()
    t, calls = _counted(task.make_trainer(run, 10))
    t.fit(resume="auto")
    assert "[toy] interrupted earlier with the same settings, resumed from step 5" in capsys.readouterr().err
    assert calls == [5, 6, 7, 8, 9] and not list(tmp_path.glob("run.stale-*"))


def test_checkpoints_without_recorded_inputs_compare_the_train_config_only(tmp_path):
    run = tmp_path / "run"
    task.make_trainer(run, 4, ckpt_every=0).fit()
    state_json = run / "checkpoints" / "last" / STATE_JSON
    state = json.loads(state_json.read_text())
    assert set(state["inputs"]) == {"initial_weights"}
    del state["inputs"]  # as written before castseg recorded a stage's inputs
    state_json.write_text(json.dumps(state))
    t, calls = _counted(task.make_trainer(run, 4, ckpt_every=0))
    t.inputs = {"labeled": "1" * 64}
    t.fit()
    assert calls == []  # nothing to compare the inputs with: reused, as before
    with pytest.raises(CastsegError, match="max_steps 4 -> 5.*--restart-changed"):
        task.make_trainer(run, 5).fit()


def test_schedules_and_warmup():
    poly = TrainConfig(max_steps=100, schedule="poly", poly_power=0.9)
    assert lr_factor(0, poly) == 1.0 and lr_factor(50, poly) == pytest.approx(0.5 ** 0.9)
    cos = TrainConfig(max_steps=100, schedule="cosine")
    assert lr_factor(50, cos) == pytest.approx(0.5) and lr_factor(100, cos) == pytest.approx(0.0)
    warm = TrainConfig(max_steps=100, schedule="constant", warmup_steps=10)
    assert [lr_factor(s, warm) for s in (0, 4, 9, 10, 99)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    both = TrainConfig(max_steps=100, schedule="poly", warmup_steps=10, lr=1e-3, backbone_lr_mult=0.1)
    model = nn.ModuleDict({"encoder": nn.Linear(2, 2), "head": nn.Linear(2, 2)})
    from castseg.engine import build_optimizer, build_scheduler
    opt = build_optimizer(model, both)
    sched = build_scheduler(opt, both)
    seen = []
    for _ in range(20):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert seen[4]["head"] == pytest.approx(1e-3 * 0.5 * (1 - 4 / 100) ** 0.9)
    assert seen[15]["encoder"] == pytest.approx(1e-4 * (1 - 15 / 100) ** 0.9)
    assert seen[15]["encoder_no_decay"] == pytest.approx(seen[15]["encoder"])


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(task.DIM, 1)

    def forward(self, x):
        return self.lin(x)


def _linear_run(tmp_path, name, batch_size, accumulate, grad_clip=0.0):
    cfg = TrainConfig(max_steps=6, batch_size=batch_size, accumulate=accumulate, lr=0.05, grad_clip=grad_clip,
                      ckpt_every=0, log_every=1, device="cpu", schedule="constant")
    loaders = {"labeled": BatchStream(task.NoisyRegression(24, seed=1), batch_size)}

    def loss_fn(model, batches, step):
        x, y = batches["labeled"]
        return {"loss": nn.functional.mse_loss(model(x), y)}

    t = Trainer(Linear(), loss_fn, loaders, cfg, tmp_path / name)
    return t


def test_gradient_accumulation_matches_the_bigger_batch(tmp_path):
    big = _linear_run(tmp_path, "big", 4, 1)
    big.fit()
    acc = _linear_run(tmp_path, "acc", 2, 2)
    acc.fit()
    for va, vb in zip(big.model.state_dict().values(), acc.model.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6)
    one = _linear_run(tmp_path, "one", 2, 1)
    one.fit()
    assert not torch.allclose(one.model.lin.weight, big.model.lin.weight, atol=1e-4)


def test_gradient_clipping_is_applied_and_logged(tmp_path):
    t = _linear_run(tmp_path, "clip", 4, 1, grad_clip=0.01)
    norms = []
    t.optimizer.register_step_pre_hook(
        lambda opt, *_: norms.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for g in opt.param_groups
                                                   for p in g["params"] if p.grad is not None))))
    t.fit()
    assert len(norms) == 6 and max(norms) <= 0.01 * (1 + 1e-4)
    header, *rows = (tmp_path / "clip" / "log.csv").read_text().splitlines()
    col = header.split(",").index("grad_norm")
    assert all(float(r.split(",")[col]) > 0.01 for r in rows)  # the logged norm is before clipping


def test_logs_tensorboard_and_val_files(tmp_path, capsys):
    task.make_trainer(tmp_path, 20).fit()
    header, *rows = (tmp_path / "log.csv").read_text().splitlines()
    assert header.split(",") == ["step", "lr", "loss", "loss_reg", "loss_sup", "grad_norm", "sec_per_step", "time"]
    assert [int(r.split(",")[0]) for r in rows] == [5, 10, 15, 20]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    lines = [json.loads(ln) for ln in (tmp_path / "val_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20]
    summary = json.loads((tmp_path / "val_metrics.json").read_text())
    assert summary["last"]["step"] == 20 and summary["best"]["mse"] == min(r["mse"] for r in lines)
    err = capsys.readouterr().err
    assert "[toy] step 5/20 loss" in err and "eta" in err and "val @ step 10" in err


def test_progress_bar_only_on_a_terminal(monkeypatch):
    class Tty:
        def isatty(self):
            return True
    monkeypatch.delenv("CASTSEG_NO_PROGRESS")
    assert progress_enabled(Tty()) and not progress_enabled(sys.stderr if not sys.stderr.isatty() else object())
    monkeypatch.setenv("CASTSEG_NO_PROGRESS", "1")
    assert not progress_enabled(Tty())


def test_bf16_autocast_on_cpu_and_fp16_falls_back(tmp_path):
    start = {k: v.clone() for k, v in task.make_model().state_dict().items()}
    final, val, dtypes = {}, {}, {}
    for amp in ("none", "bf16"):
        t = task.make_trainer(tmp_path / amp, 3, amp=amp, ckpt_every=0)
        seen = dtypes[amp] = set()
        t.model[0].register_forward_hook(lambda m, i, o, seen=seen: seen.add((m.training, o.dtype)))
        val[amp] = t.fit()["val"]["mse"]
        final[amp] = t.model.state_dict()
    # bf16 autocasts the training forwards only (validation runs in fp32); the weights stay fp32
    assert dtypes == {"none": {(True, torch.float32), (False, torch.float32)},
                      "bf16": {(True, torch.bfloat16), (False, torch.float32)}}
    assert all(v.dtype == torch.float32 for v in final["bf16"].values())
    # the same trajectory up to bf16 rounding: close to fp32's, but not fp32's
    diff = max((final["bf16"][k] - v).abs().max().item() for k, v in final["none"].items())
    moved = max((final["none"][k] - v).abs().max().item() for k, v in start.items())
    assert 0 < diff < 0.05 * moved  # measured: 1.2e-4 vs 1.2e-2
    assert val["bf16"] != val["none"] and val["bf16"] == pytest.approx(val["none"], rel=1e-3)
    with pytest.warns(UserWarning, match="fp16 needs CUDA"):
        t = task.make_trainer(tmp_path / "fp16", 2, amp="fp16", ckpt_every=0)
    assert t.precision.scaler is None


def test_nan_loss_stops_without_touching_the_checkpoint(tmp_path):
    t = task.make_trainer(tmp_path, 10, val_every=0)
    inner = t.loss_fn
    t.loss_fn = lambda m, b, s: inner(m, b, s) if s < 7 else {"loss": m(b["labeled"][0]).sum() * float("nan")}
    with pytest.raises(TrainingDiverged, match="loss and grad_norm became nan at step 7"):
        t.fit()
    assert find_checkpoint(tmp_path / "checkpoints" / "last").step == 5


def test_streams_resume_position_and_seed_augmentations_per_sample():
    ds = task.NoisyRegression(10, seed=3)  # noise drawn inside __getitem__
    full = BatchStream(ds, 4).bind("s", seed=1)
    batches = [next(full) for _ in range(7)]  # crosses epoch boundaries (3 batches per epoch)
    assert full.state_dict() == {"epoch": 2, "consumed": 1}
    part = BatchStream(ds, 4).bind("s", seed=1)
    for _ in range(4):
        next(part)
    resumed = BatchStream(ds, 4, num_workers=1).bind("s", seed=1)  # workers: same augmentations
    resumed.load_state_dict(part.state_dict())
    for want in batches[4:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # A plain shuffled DataLoader becomes the same seeded stream.
    with pytest.warns(UserWarning, match="full batches"):  # 10 items, batches of 4
        converted = BatchStream.from_dataloader(DataLoader(ds, batch_size=4, shuffle=True)).bind("s", seed=1)
    assert all(torch.equal(next(converted)[0], want[0]) for want in batches[:3])
    # Fewer items than a batch: batches are still full.
    tiny = BatchStream(task.NoisyRegression(3), 4).bind("t", seed=0)
    assert next(tiny)[0].shape == (4, task.DIM)
    # The caller's RNG is not consumed by loading.
    torch.manual_seed(0)
    before = torch.get_rng_state()
    next(BatchStream(ds, 2).bind("u", seed=0))
    assert torch.equal(before, torch.get_rng_state())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ddp_matches_one_process_over_the_same_global_batch(tmp_path):
    """Plain DDP: 2 ranks × 2 samples end bit-identical to each other and equal to 1 process ×
    4 samples (the same global batches: the stream deals one seeded order round-robin)."""
    common = ["20", "--no-dropout", "--ckpt-every", "10"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), str(TASK), str(tmp_path / "two"), *common, "--batch-size", "2",
                          "--out", str(tmp_path / "two.txt")], env=ENV, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(TASK), str(tmp_path / "one"), *common, "--batch-size", "4",
                          "--out", str(tmp_path / "one.txt")], env=ENV, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = [(tmp_path / f"two.txt.rank{r}").read_text().splitlines() for r in (0, 1)]
    assert ranks[0] == ranks[1]  # hash, val mse and weights
    single = (tmp_path / "one.txt").read_text().splitlines()
    ddp, alone = (torch.tensor([v for t in json.loads(x[1]) for v in t]) for x in (ranks[0], single))
    assert len(ddp) == 161 and not torch.equal(ddp, make_model_start())
    assert torch.allclose(ddp, alone, atol=1e-4, rtol=0), (ddp - alone).abs().max()
    # Only rank 0 wrote: one checkpoint and one log.
    run = tmp_path / "two"
    assert find_checkpoint(run / "checkpoints" / "last").complete
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "log.csv", "tensorboard", "val_metrics.json",
                                                     "val_metrics.jsonl"]


def make_model_start() -> torch.Tensor:
    return torch.tensor([v for _, t in sorted(task.make_model(dropout=0.0).state_dict().items())
                         for v in t.flatten().tolist()])


def test_channels_last_trains_the_same_weights(tmp_path):
    from castseg.models import StudentConfig, build_student

    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def loss_fn(model, batches, step):
        out = model(batches["labeled"])
        return {"loss": out["pred_masks"].pow(2).mean() + out["pred_logits"].pow(2).mean()}

    torch.manual_seed(0)
    start = build_student(StudentConfig.from_preset("lite_student", pretrained=False, dec_layers=1,
                                                    num_queries=8)).state_dict()
    weights = []
    for cl in (False, True):
        torch.manual_seed(0)
        model = build_student(StudentConfig.from_preset("lite_student", pretrained=False, dec_layers=1,
                                                        num_queries=8))
        cfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-3, ckpt_every=0, log_every=1, device="cpu",
                          channels_last=cl, seed=0)
        stream = BatchStream(images, 4, collate_fn=torch.stack, shuffle=False)
        Trainer(model, loss_fn, {"labeled": stream}, cfg, tmp_path / str(cl)).fit()
        conv = model.encoder._conv_stem.weight  # [32,3,3,3]: the two layouts differ
        assert conv.is_contiguous(memory_format=torch.channels_last) == cl
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    moved = max((weights[1][k] - v).abs().max().item() for k, v in weights[0].items() if v.is_floating_point())
    assert moved < 1e-4
    trained = max((weights[0][k] - v).abs().max().item() for k, v in start.items() if v.is_floating_point())
    assert trained > 1e-3  # the comparison is between two runs that did move the weights

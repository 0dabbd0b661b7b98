"""The training loop every stage runs: :class:`Trainer`.

A stage supplies a model, a loss function and named data streams; the trainer owns the rest:
AdamW + schedule, mixed precision, gradient accumulation and clipping, DDP, periodic
validation, logs, and atomic resumable checkpoints. ``fit()`` is idempotent: it resumes an
interrupted stage from ``run_dir/checkpoints/last`` and returns the stored result of a finished
one without training again.

Determinism: with the same config a run killed and resumed ends with the same weights as an
uninterrupted one (on CPU bit-exactly; on GPU up to non-deterministic kernels) — the model,
optimizer, schedule, grad scaler, every rank's RNG states and the data streams' positions are
all checkpointed, and validation runs with the RNG state put back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from castseg.config import TrainConfig
from castseg.engine.checkpointing import (capture_rng, find_checkpoint, json_safe, load_model_weights,
                                          optimizer_from_tensors, preserved_rng, read_best, remove_partial,
                                          restore_rng, rng_from_bytes, rng_to_bytes, save_best,
                                          save_trainer_checkpoint, seed_everything, weights_sha256)
from castseg.engine.data import BatchStream, derive_seed, to_device
from castseg.engine.distributed import (DistInfo, all_reduce_mean, barrier, broadcast_json,
                                        gather_bytes, init_distributed, wrap_model)
from castseg.engine.logs import TrainLogger
from castseg.engine.optim import Precision, build_optimizer, build_scheduler
from castseg.errors import CastsegError
from castseg.stale import move_aside

log = logging.getLogger(__name__)
LossFn = Callable[[nn.Module, dict[str, Any], int], Mapping[str, Any]]
EvaluateFn = Callable[[nn.Module], Mapping[str, Any]]


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["loss.temperature 0.1 -> 0.2", "labeled changed", ...]`` for the leaves of two nested
    mappings that differ; a hash (64 hex digits) says only "changed": its value means nothing."""
    a, b = _flat(old), _flat(new)

    def is_hash(v: Any) -> bool:
        return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)

    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if va != vb:
            out.append(f"{k} changed" if is_hash(va) or is_hash(vb) else f"{k} {va!r} -> {vb!r}")
    return out


class TrainingDiverged(CastsegError):
    """The loss or the gradient became NaN/inf; the last checkpoint is left untouched."""


_DDP_ERRORS = ("marked as ready twice", "mark a variable ready only once",
               "finished reduction in the prior iteration")


@contextlib.contextmanager
def _explain_ddp_errors():
    """DDP's reducer errors name its internals; say which setting fixes them."""
    try:
        yield
    except RuntimeError as e:
        if any(m in str(e) for m in _DDP_ERRORS):
            raise CastsegError("DistributedDataParallel cannot follow this loss's forward passes: a loss_fn "
                               "must make one gradient-carrying forward per step (others under torch.no_grad), "
                               "and every parameter must get a gradient unless train.find_unused_parameters "
                               "is true "
                               f"(DDP said: {str(e).splitlines()[0][:200]})") from e
        raise


class Trainer:
    """Train ``model`` on ``loss_fn`` for ``cfg.max_steps`` optimizer steps.

    Args:
        model: any module; moved to the device. A :class:`~castseg.models.student.StudentModel`
            is checkpointed in castseg's checkpoint format (usable by ``castseg eval``).
        loss_fn: ``loss_fn(model, batches, step) -> {"loss": scalar tensor, <term>: scalar...}``.
            ``batches`` maps each stream name to its batch (tensors already on the device);
            ``model`` is the DDP-wrapped model when distributed (call it for forward passes);
            ``step`` is the 0-based optimizer step. Every scalar entry is logged (averaged over
            micro-batches and ranks; all ranks must return the same keys).
        loaders: stream name → :class:`BatchStream` or ``DataLoader`` (its dataset, batch size,
            collate and workers are kept; its sampler becomes the seeded resumable one). Each
            step draws ``accumulate`` batches from every stream; streams cycle forever.
        cfg: :class:`~castseg.config.TrainConfig`.
        run_dir: this stage's folder (logs, ``checkpoints/``, ``val_metrics.json``).
        evaluate_fn: ``evaluate_fn(model) -> {metric: number}`` run on rank 0 every
            ``val_every`` steps and at the end, in eval mode, without grad, on the unwrapped model.
        param_groups: optimizer groups (dicts with absolute ``lr``) to use instead of the
            default encoder/head split.
        name: stage name (logs, checkpoint metadata).
        class_names, run_config: stored in the model checkpoint json.
        inputs: JSON-able description of what else the stage learns from (data contents, loss
            settings, pseudo-labels' identity). Saved with every checkpoint together with the
            sha256 of the model as given to :meth:`fit` (the stage's starting point); resuming
            compares both, like the train config's :attr:`TrainConfig.TRAJECTORY` fields.
        dist: from :func:`~castseg.engine.distributed.init_distributed` (called here when None).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, loaders: Mapping[str, BatchStream | DataLoader],
                 cfg: TrainConfig, run_dir: str | Path, evaluate_fn: EvaluateFn | None = None,
                 param_groups: Iterable[Any] | None = None, name: str = "stage",
                 class_names: Sequence[str] | None = None, run_config: dict | None = None,
                 dist: DistInfo | None = None, inputs: Mapping[str, Any] | None = None):
        if not loaders:
            raise ValueError("Trainer needs at least one data stream")
        self.cfg, self.loss_fn, self.evaluate_fn, self.name = cfg, loss_fn, evaluate_fn, name
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.class_names, self.run_config = class_names, run_config
        self.inputs = dict(inputs or {})
        self._inputs: dict[str, Any] = {}  # self.inputs + the initial weights' hash, set by fit()
        self.dist = dist or init_distributed(cfg.device)
        self.device = self.dist.device
        self.model = model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)  # in place: the caller's model, as trained
        self.optimizer = build_optimizer(self.model, cfg, param_groups)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.precision = Precision(cfg.amp, self.device)
        self.train_model = wrap_model(self.model, self.dist, cfg.find_unused_parameters)
        self._ddp = self.train_model if isinstance(self.train_model, DDP) else None  # for no_sync
        if cfg.compile:  # the DDP wrapper compiled (DDPOptimizer splits graphs at bucket bounds)
            self.train_model = torch.compile(self.train_model)
        self.streams: dict[str, BatchStream] = {}
        for key, loader in loaders.items():
            if not isinstance(loader, (BatchStream, DataLoader)):
                raise TypeError(f"stream {key!r}: expected a BatchStream or DataLoader, got {type(loader).__name__}")
            stream = loader if isinstance(loader, BatchStream) else BatchStream.from_dataloader(loader)
            self.streams[key] = stream.bind(key, cfg.seed, self.dist.rank, self.dist.world_size)
        self.step = 0
        self.logger: TrainLogger | None = None

    @property
    def last_dir(self) -> Path:
        return self.ckpt_dir / "last"

    # --- the loop ----------------------------------------------------------------------------

    def fit(self, resume: bool | str = True) -> dict[str, Any]:
        """Train to ``max_steps`` (resuming when ``resume`` and a checkpoint exists) and return
        the result ``{"stage", "step", "train" (last logged terms), "val" (last validation),
        "best_val", "elapsed_s", "checkpoint"}``, the same on every rank.

        A fresh start seeds Python, NumPy and torch from ``(cfg.seed, rank)``; ``resume=False``
        deletes this stage's checkpoints first and retrains from the model as given. An earlier
        run with other settings (train config, ``inputs``, initial weights) is refused with
        ``resume=True``; ``resume="auto"`` moves its folder aside (``<run_dir>.stale-<n>``) and
        starts over. Each way, one line says what happened to the earlier run."""
        if resume not in (True, False, "auto"):
            raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
        cfg, info = self.cfg, self.dist
        self._inputs = json_safe({**self.inputs, "initial_weights": weights_sha256(self.model)})
        ckpt = self._earlier_run(resume)
        if ckpt is not None:
            if ckpt.complete:
                # The finished model, so a pipeline can go on to the next stage with it.
                load_model_weights(ckpt.path, self.model)
                self.step = ckpt.step
                if info.is_main:
                    log.info(f"[{self.name}] finished earlier with the same settings, reused (step {ckpt.step}, "
                             f"{ckpt.path})")
                # The checkpoint as it is now: the run directory may have moved since it finished.
                return {**(ckpt.state.get("result") or {}), "checkpoint": str(self.last_dir)}
            self._restore(ckpt)
        else:
            self.step = 0
            seed_everything(derive_seed(cfg.seed, "train", info.rank))
        self.logger = logger = TrainLogger(
            self.run_dir, self.name, cfg.max_steps, cfg.log_every, start_step=self.step, fresh=ckpt is None,
            enabled=info.is_main, elapsed=float(ckpt.state.get("elapsed", 0.0)) if ckpt else 0.0,
            best_metric=cfg.best_metric, best_mode=cfg.best_mode)
        try:
            if ckpt is not None and info.is_main:
                self._drop_stale_best()
                logger.message(f"[{self.name}] interrupted earlier with the same settings, resumed from step "
                               f"{self.step} ({ckpt.path})")
            validated_at = -1
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                terms, lr = self._train_step()
                self.step += 1
                logger.step(self.step, terms, lr, time.perf_counter() - t0)
                if self.step < cfg.max_steps:
                    if self.evaluate_fn is not None and cfg.val_every and self.step % cfg.val_every == 0:
                        self._validate()
                        validated_at = self.step
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                        self._save(complete=False)
            if self.evaluate_fn is not None and validated_at != self.step:
                self._validate()
            result = broadcast_json(self._result(), info)
            self._save(complete=True, result=result)
        finally:
            logger.close()
        return result

    def _train_step(self) -> tuple[dict[str, float], float]:
        """One optimizer step over ``accumulate`` micro-batches; returns (mean terms, lr used)."""
        cfg, model, opt, scaler = self.cfg, self.train_model, self.optimizer, self.precision.scaler
        model.train()
        opt.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.accumulate):
            batches = {k: to_device(next(s), self.device) for k, s in self.streams.items()}
            # Gradients are averaged across ranks once, on the last micro-batch.
            last = micro == cfg.accumulate - 1
            sync = self._ddp.no_sync() if self._ddp is not None and not last else contextlib.nullcontext()
            with sync, _explain_ddp_errors():
                with self.precision.autocast():
                    out = self.loss_fn(model, batches, self.step)
                if "loss" not in out:
                    raise KeyError(f"loss_fn returned {sorted(out)}; it must include 'loss'")
                loss = out["loss"] / cfg.accumulate
                (scaler.scale(loss) if scaler is not None else loss).backward()
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    v = v.detach().float().reshape(())
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    v = torch.tensor(float(v), device=self.device)
                else:
                    continue  # non-scalar outputs (monitors, maps) are the caller's business
                sums[k] = sums.get(k, 0.0) + v.to(self.device) / cfg.accumulate
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        keys = sorted(sums)
        values = torch.stack([sums[k] for k in keys]) if keys else torch.zeros(0, device=self.device)
        if cfg.grad_clip > 0:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            keys, values = keys + ["grad_norm"], torch.cat([values, norm.detach().float().reshape(1).to(values.device)])
        terms = dict(zip(keys, all_reduce_mean(values.tolist(), self.dist)))  # one device sync per step
        bad = [k for k in ("loss", "grad_norm") if k in terms and not math.isfinite(terms[k])]
        if bad and not (scaler is not None and bad == ["grad_norm"]):  # fp16: the scaler skips inf steps
            raise TrainingDiverged(f"{self.run_dir}: {' and '.join(bad)} became {terms[bad[0]]} at step "
                                   f"{self.step} of stage {self.name!r} (terms: {terms}); lower train.lr, raise "
                                   f"train.warmup_steps or use amp=none; training resumes from the last checkpoint")
        lr = max(g["lr"] for g in opt.param_groups)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        self.scheduler.step()
        return terms, lr

    # --- validation --------------------------------------------------------------------------

    def _validate(self) -> None:
        if self.dist.is_main:
            was_training = self.model.training
            self.model.eval()
            try:
                with preserved_rng(), torch.no_grad():
                    metrics = dict(self.evaluate_fn(self.model))  # type: ignore[misc]
            finally:
                self.model.train(was_training)
            assert self.logger is not None
            if self.logger.val(self.step, metrics) and self.cfg.save_best:
                save_best(self.ckpt_dir / "best", self.model, self.step, metrics, self.class_names, self.run_config)
        barrier(self.dist)

    def _drop_stale_best(self) -> None:
        best = read_best(self.ckpt_dir / "best")
        if best is not None and int(best.get("step", 0)) > self.step:
            # Saved after the checkpoint we resume from: that trajectory is being re-run.
            shutil.rmtree(self.ckpt_dir / "best", ignore_errors=True)

    # --- checkpoints -------------------------------------------------------------------------

    def _save(self, complete: bool, result: dict | None = None) -> None:
        info = self.dist
        # Every rank's RNG goes into the one checkpoint rank 0 writes.
        blobs = gather_bytes(rng_to_bytes(capture_rng()), info)
        if info.is_main:
            assert self.logger is not None
            state = {"stage": self.name, "step": self.step, "complete": complete, "result": result,
                     "train_config": self.cfg.to_dict(), "inputs": self._inputs, "world_size": info.world_size,
                     "scheduler": json_safe(self.scheduler.state_dict()),
                     "scaler": json_safe(self.precision.scaler.state_dict()) if self.precision.scaler else None,
                     "data": {k: s.state_dict() for k, s in self.streams.items()},
                     "elapsed": self.logger.elapsed}
            save_trainer_checkpoint(self.last_dir, self.model, self.optimizer, state,
                                    [rng_from_bytes(b) for b in blobs], self.class_names, self.run_config)
            self.logger.flush()
        barrier(info)

    def _earlier_run(self, resume: bool | str) -> Any:
        """The checkpoint to resume from or reuse, None to start fresh (see :meth:`fit`)."""
        info = self.dist
        if info.is_main:
            remove_partial(self.ckpt_dir)
            if not resume:  # start over: an old checkpoint must not be resumed if this run dies early
                for d in ("last", "last.old", "best", "best.old"):
                    shutil.rmtree(self.ckpt_dir / d, ignore_errors=True)
        barrier(info)
        ckpt = find_checkpoint(self.last_dir) if resume else None
        # Every rank must resume from the same step (multi-node: the run dir must be shared).
        main_step = broadcast_json(ckpt.step if ckpt else None, info)
        if main_step != (ckpt.step if ckpt else None):
            raise CastsegError(f"{self.last_dir}: rank {info.rank} sees checkpoint step "
                               f"{ckpt.step if ckpt else None}, rank 0 sees {main_step}; for resuming, every node "
                               f"needs the run directory on a shared filesystem")
        changes = self._changes(ckpt.state) if ckpt is not None else []
        if not changes:
            return ckpt
        if resume != "auto":
            raise CastsegError(f"{self.last_dir}: this checkpoint (step {ckpt.step}) was trained with other "
                               f"settings ({', '.join(changes)}); use a new run directory, start over with "
                               f"resume=False (--no-resume), or set the earlier run aside and start over with "
                               f"resume='auto' (--restart-changed)")
        if info.is_main:
            aside = move_aside(self.run_dir)
            log.info(f"[{self.name}] settings changed since the earlier run ({', '.join(changes)}), starting over "
                     f"(the earlier run is kept in {aside})")
        barrier(info)
        return None

    def _changes(self, state: dict[str, Any]) -> list[str]:
        """What differs between the run that wrote ``state`` and this one, as ``"key old -> new"``."""
        saved, now = state.get("train_config") or {}, self.cfg.to_dict()
        diff = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in TrainConfig.TRAJECTORY
                if k in saved and json_safe(saved[k]) != now[k]]
        if "inputs" in state:  # checkpoints from before inputs were recorded: train config only
            diff += describe_changes(state["inputs"], self._inputs)
        return diff

    def _restore(self, ckpt: Any) -> None:
        state, info = ckpt.state, self.dist
        load_model_weights(ckpt.path, self.model)
        tensors = ckpt.tensors()
        self.optimizer.load_state_dict(optimizer_from_tensors(state["optimizer"], tensors, self.optimizer))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        positions = state.get("data") or {}
        for k, s in self.streams.items():
            if k in positions:
                s.load_state_dict(positions[k])
            else:
                warnings.warn(f"{ckpt.path}: no position for stream {k!r}; it restarts from its beginning",
                              stacklevel=3)
        self.step = ckpt.step
        rng = ckpt.rng(info.rank, tensors)
        if state.get("world_size") != info.world_size or rng is None:
            warnings.warn(f"{ckpt.path}: saved with {state.get('world_size')} process(es), resuming with "
                          f"{info.world_size}: training continues, but not bit-identically", stacklevel=3)
            seed_everything(derive_seed(self.cfg.seed, "resume", self.step, info.rank))
        else:
            restore_rng(rng)

    def _result(self) -> dict[str, Any]:
        lg = self.logger
        assert lg is not None
        train = {k: v for k, v in lg.last_row.items() if k not in ("step", "sec_per_step", "time")}
        return json_safe({"stage": self.name, "step": self.step, "train": train, "val": lg.last_val(),
                          "best_val": lg.best(), "elapsed_s": round(lg.elapsed, 3), "checkpoint": str(self.last_dir)})

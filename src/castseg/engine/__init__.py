"""The training engine every stage runs on.

- :class:`Trainer` (:mod:`.loop`): ``Trainer(model, loss_fn, {"labeled": ..., "unlabeled": ...},
  TrainConfig, run_dir, evaluate_fn).fit(resume=True)``
- :class:`BatchStream` (:mod:`.data`): infinite, seeded, resumable, rank-sharded batches
- :mod:`.optim`: AdamW groups, poly/cosine + warm-up schedule, autocast / GradScaler
- :mod:`.checkpointing`: atomic, pickle-free resumable checkpoints
- :mod:`.distributed`: ``torchrun`` / DDP setup and collectives
- :mod:`.logs`: progress, ``log.csv``, TensorBoard, ``val_metrics.json``
"""

from castseg.engine.checkpointing import find_checkpoint, seed_everything
from castseg.engine.data import BatchStream, derive_seed, to_device
from castseg.engine.distributed import (DistInfo, cleanup_distributed, init_distributed, resolve_device, unwrap_model,
                                        wrap_model)
from castseg.engine.loop import Trainer, TrainingDiverged
from castseg.engine.optim import build_optimizer, build_scheduler, lr_factor

__all__ = ["BatchStream", "DistInfo", "Trainer", "TrainingDiverged", "build_optimizer", "build_scheduler",
           "cleanup_distributed", "derive_seed", "find_checkpoint", "init_distributed", "lr_factor",
           "resolve_device", "seed_everything", "to_device", "unwrap_model", "wrap_model"]

"""Generating the pseudo-label cache: chunked, resumable, sharded under torchrun
(see :mod:`castseg.pseudo_labels`)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from castseg import __version__
from castseg.atomic import atomic_open
from castseg.console import Progress
from castseg.data.coco_io import read_json, validate_coco, write_json
from castseg.data.dataset import UnlabeledImageDataset
from castseg.errors import CastsegError, InputError
from castseg.eval.results import instances_to_results
from castseg.models.inference import resize_masks
from castseg.pseudo_labels.cache import COMPANIONS, FORMAT, IDENTITY_KEYS, images_sha256, manifest_path, parts_dir
from castseg.stale import move_aside

logger = logging.getLogger(__name__)


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the engine's process group (joined here under torchrun, with
    the backend the engine picks: NCCL on GPUs, gloo on CPU)."""
    from castseg.engine.distributed import init_distributed

    info = init_distributed("auto")
    return info.rank, info.world_size


def _gather(obj: Any, world: int) -> list[Any]:
    """Every rank's JSON-able ``obj`` in rank order (fixed-size tensors on the wire; no pickle)."""
    if world == 1:
        return [obj]
    from castseg.engine.distributed import init_distributed, gather_bytes

    return [json.loads(b.decode()) for b in gather_bytes(json.dumps(obj).encode(), init_distributed("auto"))]


def _on_rank0(fn: Callable[[], Any], rank: int, world: int) -> Any:
    """``fn()`` on rank 0, its result shared with every rank (:func:`castseg.engine.distributed.on_main`)."""
    from castseg.engine.distributed import init_distributed, on_main

    return on_main(fn, init_distributed("auto")) if world > 1 else fn()


def _part(out: Path, k: int) -> Path:
    return parts_dir(out) / f"part-{k:06d}.json"


def cache_classes(source: Path, images_root: Any, teacher: Any, class_names: Sequence[str] | None
                  ) -> tuple[list[str], list[dict[str, Any]], list[int]]:
    """``(class names to predict, categories for the manifest, category id of each class)``.
    Categories are the images json's (so labels match the labeled split's), else 1..C."""
    cats: list[dict[str, Any]] = []
    if source.is_file():
        data = read_json(source)  # cheap next to the teacher; annotations are not validated
        data = {k: v for k, v in data.items() if k != "annotations"} if isinstance(data, dict) else data
        cats = [{"id": c["id"], "name": c["name"]} for c in
                validate_coco(data, source, images_root, require_annotations=False).categories]
    names = list(class_names or getattr(teacher, "class_names", None) or [c["name"] for c in cats])
    if not names:
        raise CastsegError(f"{source}: no class names (the teacher stores none and the images have no categories)")
    if not cats:
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    by_name = {c["name"]: c["id"] for c in cats}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InputError(source, f"has no category for the teacher's classes {missing}")
    return names, cats, [by_name[n] for n in names]


def _batches(load: Callable[[int], dict], idx: Sequence[int], batch_size: int, pool: ThreadPoolExecutor | None):
    """Loaded samples, ``batch_size`` at a time; with a pool the next batch decodes while the
    teacher runs on this one (only two batches are ever held, not the whole chunk)."""
    groups = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    if pool is None:
        yield from ([load(i) for i in g] for g in groups)
        return
    nxt = [pool.submit(load, i) for i in groups[0]] if groups else []
    for j in range(len(groups)):
        cur, nxt = nxt, [pool.submit(load, i) for i in groups[j + 1]] if j + 1 < len(groups) else []
        yield [f.result() for f in cur]


def _predict_chunk(teacher: Any, batches: Any, names: list[str], cat_of: np.ndarray, min_score: float,
                   max_size: int | None, bar: Any) -> list[dict[str, Any]]:
    """COCO result records of one chunk's images (masks at each image's original size)."""
    records: list[dict[str, Any]] = []
    for batch in batches:
        xs = []
        for sm in batch:
            x = sm["image"]
            if max_size and max(x.shape[-2:]) > max_size:
                r = max_size / max(x.shape[-2:])
                x = F.interpolate(x[None], size=(max(1, round(x.shape[-2] * r)), max(1, round(x.shape[-1] * r))),
                                  mode="bilinear", align_corners=False, antialias=True)[0]
            xs.append(x)
        # Only same-size images share a forward: padding them here would change the teacher's input.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(xs):
            groups.setdefault(tuple(x.shape[-2:]), []).append(i)
        outs: list[Any] = [None] * len(xs)
        for idx in groups.values():
            for i, r in zip(idx, teacher.predict(torch.stack([xs[i] for i in idx]), names)):
                outs[i] = r
        for sm, r in zip(batch, outs):
            h0, w0 = sm["orig_size"]
            keep = (r["scores"] >= min_score).cpu()
            masks, scores, labels = r["masks"].cpu()[keep], r["scores"].cpu()[keep], r["labels"].cpu()[keep]
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
                raise CastsegError(f"the teacher returned labels outside [0, {len(names)}) for {sm['file_name']}")
            masks = resize_masks(masks, (h0, w0))
            records += instances_to_results(sm["image_id"], masks, scores, cat_of[labels.numpy()])
        bar.update(len(batch))
    return records


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_manifest(source: Path, ds: UnlabeledImageDataset, info: dict[str, Any], names: list[str],
                 cats: list[dict[str, Any]], min_score: float, max_size: int | None, chunk_size: int | None
                 ) -> dict[str, Any]:
    """The manifest of a cache not yet written (``finished`` False, no instance count)."""
    return {"format": FORMAT, "format_version": 1, "castseg_version": __version__,
            "teacher_sha256": info["sha256"], "teacher": info, "class_names": names, "categories": cats,
            "min_score": float(min_score), "max_size": max_size,
            "chunk_size": None if chunk_size is None else int(chunk_size),
            "images": str(source), "images_sha256": images_sha256(source, ds), "num_images": len(ds),
            "num_instances": None, "finished": False, "created": now()}


def prepare_cache(out: Path, manifest: dict[str, Any], overwrite: bool, restart_changed: bool = False) -> str:
    """Rank 0: ``"done"`` (a finished identical cache), ``"run"`` (fresh or resumed pass). A cache
    made with other settings is refused, or with ``restart_changed`` moved aside (never deleted)."""
    mpath = manifest_path(out)
    old = read_json(mpath) if mpath.exists() and not overwrite else None
    changed = [k for k in IDENTITY_KEYS if old is not None and old.get(k) != manifest[k]]
    if changed and restart_changed:
        aside = move_aside(out, COMPANIONS)
        logger.info(f"[pseudo-labels {out.name}] made earlier with a different {', '.join(changed)}, starting over "
                    f"(the earlier cache is kept as {aside})")
        old = None
    elif changed:
        k = changed[0]
        raise InputError(mpath, f"this cache was made with a different {k} ({old.get(k)!r}, now "
                         f"{manifest[k]!r}); pass --overwrite to discard it or choose another --out")
    if old is not None:
        if old.get("finished") and out.is_file():
            logger.info(f"[pseudo-labels {out.name}] finished earlier with the same teacher and images, reused")
            return "done"
        manifest["created"] = old.get("created", manifest["created"])
    else:
        if out.exists() and not overwrite:
            raise InputError(out, "exists and has no pseudo-label manifest; pass --overwrite or choose another --out")
        shutil.rmtree(parts_dir(out), ignore_errors=True)
    parts_dir(out).mkdir(parents=True, exist_ok=True)
    write_json(manifest, mpath, indent=2)
    return "run"


def _merge(out: Path, chunk_ids: list[list[int]], manifest: dict[str, Any]) -> dict[str, Any]:
    """Stream the parts, in chunk order, into ``out`` (never the whole set in memory)."""
    n = 0
    with atomic_open(out, "w") as f:
        f.write("[")
        for k, ids in enumerate(chunk_ids):
            part_file = _part(out, k)
            part = read_json(part_file)
            if part.get("image_ids") != ids:
                raise InputError(part_file, f"does not hold the images of chunk {k}; rerun with --overwrite")
            for rec in part["results"]:
                f.write(("," if n else "") + json.dumps(rec))
                n += 1
        f.write("]")
    manifest.update(finished=True, num_instances=n, finished_at=now())
    write_json(manifest, manifest_path(out), indent=2)
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    return manifest


def generate_pseudo_labels(teacher: Any, images: str | Path, out: str | Path, *,
                           teacher_info: dict[str, Any] | None = None, images_root: str | Path | None = None,
                           class_names: Sequence[str] | None = None, batch_size: int = 1, min_score: float = 0.05,
                           chunk_size: int = 64, max_size: int | None = None, overwrite: bool = False,
                           progress: bool = True, num_workers: int = 0, restart_changed: bool = False
                           ) -> dict[str, Any]:
    """Pseudo-label ``images`` (COCO json or folder) with ``teacher`` (``predict(images [B,3,H,W]
    in [0,1], class_names)`` → B dicts ``masks`` bool [K,H,W], ``scores`` [K], ``labels`` [K])
    into ``out``; see the module docstring. ``teacher_info`` (from :func:`load_teacher`) is
    what identifies the teacher for resuming; ``max_size`` resizes inputs (masks come back at
    full size); ``num_workers`` threads decode images; ``restart_changed`` sets a cache made
    with other settings aside (``P.stale-<n>.json``) instead of refusing it. Returns the manifest."""
    if batch_size < 1 or chunk_size < 1:
        raise CastsegError("--batch-size and --chunk-size must be ≥ 1")
    source, out = Path(images), Path(out)
    ds = UnlabeledImageDataset(source, images_root, strong_view=False)
    names, cats, cat_ids = cache_classes(source, images_root, teacher, class_names)
    rank, world = dist_info()
    chunk_ids = [[it[0] for it in ds.items[s:s + chunk_size]] for s in range(0, len(ds), chunk_size)]
    info = teacher_info or {"sha256": None, "config": {"class": type(teacher).__name__}}
    manifest = new_manifest(source, ds, info, names, cats, min_score, max_size, chunk_size)
    if _on_rank0(lambda: prepare_cache(out, manifest, overwrite, restart_changed), rank, world) == "done":
        return read_json(manifest_path(out))

    mine = [k for k in range(len(chunk_ids)) if k % world == rank]
    todo = [k for k in mine if not _part(out, k).is_file()]
    bar = Progress(sum(len(chunk_ids[k]) for k in mine), f"pseudo-labels {out.name}",
                   initial=sum(len(chunk_ids[k]) for k in mine if k not in todo), enabled=progress and rank == 0)
    failure = None
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    cat_of = np.asarray(cat_ids, dtype=np.int64)

    def load(i: int) -> dict[str, Any]:
        sample = ds[i]
        sample.pop("image_strong", None)  # the dataset's identity "strong view" is a copy we don't need
        return sample

    try:
        for k in todo:
            idx = range(k * chunk_size, k * chunk_size + len(chunk_ids[k]))
            records = _predict_chunk(teacher, _batches(load, idx, batch_size, pool), names, cat_of, min_score,
                                     max_size, bar)
            write_json({"chunk": k, "image_ids": chunk_ids[k], "results": records}, _part(out, k))
            logger.debug(f"[pseudo-labels {out.name}] chunk {k}: {len(records)} instances -> {_part(out, k)}")
    except Exception as e:
        if world == 1:
            raise
        failure = e
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    errors = _gather(None if failure is None else f"rank {rank}: {failure}", world)
    if failure is not None:
        raise failure
    if any(errors):
        raise CastsegError("pseudo-labelling failed on " + "; ".join(e for e in errors if e))
    return _on_rank0(lambda: _merge(out, chunk_ids, manifest), rank, world)

"""Labeled / unlabeled / validation splits of a COCO instances file.

Reproducibility without an RNG library: an image's rank in a split stream is
``sha256("castseg-split", stream, seed, file_name)``. Sorting by that key is one seeded
permutation, and every split takes a *prefix* of it, so

- the same input + seed gives byte-identical outputs on any machine and numpy version;
- labeled sets for growing fractions are nested (5% ⊂ 10% ⊂ 30%), because the train pool and
  its order do not depend on the fraction;
- the validation set is drawn first from its own stream, so it is the same for every labeled
  fraction (5%/10%/30% runs are evaluated on one val set);
- ranks hang on file names, not ids, so re-converting a dataset (ids renumbered) keeps the split.

Output jsons keep the input's ``file_name`` values and carry a top-level ``"images_root"`` (the
original images folder, relative to the output folder) that :func:`castseg.data.coco_io.load_coco`
honours, so ``castseg eval --gt DIR/val.json`` and the datasets need no extra flag.
``unlabeled.json`` has no ``"annotations"`` key at all, so nothing can mistake it for a labeled
set whose images have zero instances (``load_coco`` without ``require_annotations=False`` fails).
When the source annotates the unlabeled images, their annotations are kept aside in
``unlabeled_gt.json`` (same images as ``unlabeled.json``): only for measuring how good the
pseudo-labels are (config ``data.unlabeled_gt``); no training stage reads it.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from castseg.data.coco_io import CocoData, images_root_entry, write_json
from castseg.errors import InputError

MANIFEST_FORMAT = "castseg-split/1"
OUTPUT_NAMES = ("labeled.json", "unlabeled.json", "unlabeled_gt.json", "val.json", "split.json")


@dataclass
class Split:
    """Image ids of each part, ascending; ``val`` is empty without a validation split."""

    labeled: list[int]
    unlabeled: list[int]
    val: list[int]


def rank_key(seed: int, stream: str, file_name: str) -> bytes:
    return hashlib.sha256(f"castseg-split\0{stream}\0{seed}\0{file_name}".encode("utf-8")).digest()


def seeded_order(images: list[dict[str, Any]], seed: int, stream: str) -> list[dict[str, Any]]:
    """``images`` in the seeded order of ``stream`` (ties, impossible in practice, by id)."""
    return sorted(images, key=lambda im: (rank_key(seed, stream, im["file_name"]), im["id"]))


def count_for(fraction: float, n: int) -> int:
    """Images a fraction of ``n`` takes: rounded half up, at least 1 when fraction > 0.
    Monotone in ``fraction``, which nesting relies on."""
    if fraction <= 0 or n == 0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def check_fraction(name: str, value: float, allow_zero: bool, allow_one: bool) -> None:
    lo, hi = ("[0" if allow_zero else "(0"), ("1]" if allow_one else "1)")
    ok = (value >= 0 if allow_zero else value > 0) and (value <= 1 if allow_one else value < 1)
    if not ok or math.isnan(value):
        raise InputError(name, f"must be in {lo}, {hi}, got {value}")


def make_split(coco: CocoData, seed: int = 0, labeled_fraction: float | None = None,
               val_fraction: float = 0.0, labeled_ids: list[int] | None = None) -> Split:
    """Split ``coco``'s images. Exactly one of ``labeled_fraction`` (of the images left after
    the val split) and ``labeled_ids`` (an explicit labeled set) is given. With ``labeled_ids``
    the val images are drawn from the images *not* in that list."""
    if (labeled_fraction is None) == (labeled_ids is None):
        raise ValueError("give exactly one of labeled_fraction and labeled_ids")
    if labeled_ids is not None and not labeled_ids:
        raise InputError("--labeled-ids", "the labeled list is empty")
    if labeled_fraction is not None:
        check_fraction("--labeled-fraction", labeled_fraction, allow_zero=False, allow_one=True)
    check_fraction("--val-fraction", val_fraction, allow_zero=True, allow_one=False)
    images = coco.images
    n = len(images)
    if n == 0:
        raise InputError(coco.path, "has no images to split")
    explicit = set(labeled_ids or [])
    n_val = count_for(val_fraction, n)
    candidates = [im for im in images if im["id"] not in explicit]
    if not explicit and n_val >= n:
        raise InputError("--val-fraction", f"{val_fraction} of {n} images leaves no image to train on")
    if n_val > len(candidates):
        raise InputError("--val-fraction", f"needs {n_val} val images but only {len(candidates)} "
                         "images are not in the labeled list")
    val = {im["id"] for im in seeded_order(candidates, seed, "val")[:n_val]}
    pool = [im for im in images if im["id"] not in val]
    if labeled_fraction is None:
        labeled = explicit
    else:
        labeled = {im["id"] for im in seeded_order(pool, seed, "labeled")[:count_for(labeled_fraction, len(pool))]}
    unlabeled = {im["id"] for im in pool} - labeled
    return Split(sorted(labeled), sorted(unlabeled), sorted(val))


def read_id_list(path: str | Path) -> list[str]:
    """Entries of a Guided-Distillation-style list (``perc_10.txt``): one per line; blank lines
    and ``#`` comments skipped; duplicates dropped, first occurrence kept."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(path, "labeled-ids file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read labeled-ids file ({e})") from None
    entries = [ln.strip() for ln in text.splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise InputError(path, "labeled-ids file lists no entries")
    return list(dict.fromkeys(entries))


def _parts(path: str) -> list[str]:
    return [p for p in str(path).replace("\\", "/").split("/") if p not in ("", ".")]


def _stem(name: str) -> str:
    return PurePosixPath(name).stem


def match_labeled_ids(coco: CocoData, entries: list[str], source: str | Path) -> list[int]:
    """Image ids named by ``entries``. An entry matches, in this order of preference: a
    ``file_name`` exactly or as the tail of a longer path; a file's base name; its stem; or a
    unique stem prefix followed by ``_``/``.`` (``aachen_000000_000019`` names
    ``aachen_000000_000019_leftImg8bit.png``). Unmatched or ambiguous entries → InputError."""
    by_name: dict[str, list[int]] = {}
    by_base: dict[str, list[int]] = {}
    by_stem: dict[str, list[int]] = {}
    for im in coco.images:
        name = "/".join(_parts(im["file_name"]))
        by_name.setdefault(name, []).append(im["id"])
        base = PurePosixPath(name).name
        by_base.setdefault(base, []).append(im["id"])
        by_stem.setdefault(_stem(base), []).append(im["id"])
    stems = sorted(by_stem)

    def lookup(entry: str) -> list[int]:
        parts = _parts(entry)
        if not parts:
            return []
        for k in range(len(parts)):  # longest path tail first: "a/b/c.png", "b/c.png", ...
            hit = by_name.get("/".join(parts[k:]))
            if hit:
                return hit
        base = parts[-1]
        for table, key in ((by_base, base), (by_stem, base), (by_stem, _stem(base))):
            if key in table:
                return table[key]
        key = _stem(base) if base not in by_stem else base
        hits: list[int] = []
        i = bisect.bisect_left(stems, key)
        while i < len(stems) and stems[i].startswith(key):
            if stems[i][len(key):len(key) + 1] in ("_", "."):
                hits.extend(by_stem[stems[i]])
            i += 1
        return hits

    ids: list[int] = []
    missing: list[str] = []
    ambiguous: list[str] = []
    for e in entries:
        hit = lookup(e)
        if not hit:
            missing.append(e)
        elif len(hit) > 1:
            ambiguous.append(e)
        else:
            ids.append(hit[0])
    if missing:
        raise InputError(source, f"{len(missing)} of {len(entries)} entries match no image in {coco.path} "
                         f"(first: {', '.join(repr(m) for m in missing[:5])})")
    if ambiguous:
        raise InputError(source, f"{len(ambiguous)} entries match several images in {coco.path}; "
                         f"give longer paths (first: {', '.join(repr(m) for m in ambiguous[:5])})")
    return sorted(set(ids))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rel(path: str | Path, out_dir: Path) -> str:
    return images_root_entry(path, out_dir)  # same relative-path rule as the images root


def coco_subset(coco: CocoData, ids: list[int], out_dir: str | Path, with_annotations: bool = True) -> dict[str, Any]:
    """The images ``ids`` of ``coco`` (in that order, with their annotations unless
    ``with_annotations`` is False) as a COCO dict to be written into ``out_dir`` (its
    ``images_root`` points back at ``coco``'s images from there)."""
    anns_by_image = coco.anns_by_image
    out: dict[str, Any] = dict(coco.extra)
    out["info"] = coco.info
    out["images_root"] = images_root_entry(coco.images_root, out_dir)
    out["images"] = [coco.image_by_id[i] for i in ids]
    if with_annotations:
        out["annotations"] = [a for i in ids for a in anns_by_image[i]]
    out["categories"] = coco.categories
    return out


def write_split(coco: CocoData, split: Split, out_dir: str | Path, seed: int,
                labeled_fraction: float | None, val_fraction: float,
                labeled_ids_file: str | Path | None = None) -> dict[str, Path]:
    """Write ``labeled.json``, ``unlabeled.json``, ``unlabeled_gt.json`` (only when the source has
    annotations on the unlabeled images), ``val.json`` (only with a val split) and the
    ``split.json`` manifest into ``out_dir``; returns the written paths by part name."""
    out_dir = Path(out_dir)
    src = coco.path.resolve()
    for name in OUTPUT_NAMES:
        if (out_dir / name).resolve() == src:
            raise InputError(out_dir / name, "the output would overwrite the input file; choose another --out-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    anns_by_image = coco.anns_by_image

    written: dict[str, Path] = {}
    parts = [("labeled", split.labeled, True), ("unlabeled", split.unlabeled, False)]
    if has_unlabeled_gt(coco, split):
        parts.append(("unlabeled_gt", split.unlabeled, True))
    if split.val:
        parts.append(("val", split.val, True))
    for name, ids, with_ann in parts:
        # Ids are ascending, so outputs do not depend on the input's image order.
        write_json(coco_subset(coco, ids, out_dir, with_ann), out_dir / f"{name}.json")
        written[name] = out_dir / f"{name}.json"

    n_ann = {name: sum(len(anns_by_image[i]) for i in ids) for name, ids, _ in parts}
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": _rel(src, out_dir),
        "source_sha256": sha256_file(src),
        "images_root": images_root_entry(coco.images_root, out_dir),
        "seed": seed,
        "labeled_fraction": labeled_fraction,
        "val_fraction": val_fraction,
        "labeled_ids_file": _rel(labeled_ids_file, out_dir) if labeled_ids_file else None,
        "labeled_ids_sha256": sha256_file(labeled_ids_file) if labeled_ids_file else None,
        "counts": {
            "images": len(coco.images),
            "labeled": len(split.labeled),
            "unlabeled": len(split.unlabeled),
            "val": len(split.val),
            "labeled_annotations": n_ann["labeled"],
            "unlabeled_annotations": n_ann.get("unlabeled_gt", 0),
            "val_annotations": n_ann.get("val", 0),
        },
        "files": {name: f"{name}.json" for name in written},
        "image_ids": {"labeled": split.labeled, "unlabeled": split.unlabeled, "val": split.val},
    }
    write_json(manifest, out_dir / "split.json", indent=1)
    written["manifest"] = out_dir / "split.json"
    return written


def has_unlabeled_gt(coco: CocoData, split: Split) -> bool:
    """Whether the source annotates any unlabeled image (an images-only source does not)."""
    return any(coco.anns_by_image[i] for i in split.unlabeled)


def stale_outputs(out_dir: str | Path, split: Split, coco: CocoData | None = None) -> list[Path]:
    """Files in ``out_dir`` from an earlier run that this split does not rewrite (``coco``, the
    split's source, tells whether ``unlabeled_gt.json`` was rewritten)."""
    val, gt = Path(out_dir) / "val.json", Path(out_dir) / "unlabeled_gt.json"
    stale = [val] if not split.val and val.exists() else []
    if coco is not None and not has_unlabeled_gt(coco, split) and gt.exists():
        stale.append(gt)
    return stale


__all__ = ["Split", "make_split", "match_labeled_ids", "read_id_list", "write_split", "count_for",
           "seeded_order", "stale_outputs", "sha256_file"]

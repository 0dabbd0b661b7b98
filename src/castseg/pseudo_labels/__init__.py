"""Pseudo-labels: run a frozen teacher over an unlabeled set once, cache it, threshold on read.

Cache written for ``out = P.json``:

- ``P.json``: a COCO results list (compressed-RLE ``segmentation``, ``bbox``, ``score``,
  ``category_id``), every instance scoring ≥ ``min_score`` (a low floor that only bounds the
  file size). ``castseg eval`` reads it like any predictions file.
- ``P.json.manifest.json``: what made it (teacher fingerprint + config, class names, categories,
  ``min_score``, images source + sha256, counts, castseg version) and ``finished``.
- ``P.json.parts/part-000012.json``: chunk 12's records while a pass runs, each written
  atomically, so a killed pass resumes at the first missing part; merged into ``P.json`` and
  deleted at the end.

The score threshold (METHOD.md: 0.3) is applied when READING (:func:`load_pseudo_labels`,
:class:`PseudoLabeledDataset`), so changing it never needs the teacher again. Mask binarisation
(0.5) is the teacher's and happens at generation: an RLE cannot hold soft masks.

Under ``torchrun`` (or any initialised ``torch.distributed`` group) rank r takes chunks
k ≡ r (mod world size) and writes their parts; rank 0 merges. Chunks never depend on the world
size, so a pass may resume with a different number of processes.

Predictions made elsewhere (another model's COCO results, or a COCO json's own annotations)
become the same cache with :func:`import_pseudo_labels` (``castseg pseudo-label --predictions``).
"""

from castseg.pseudo_labels.cache import (FORMAT, PseudoLabeledDataset, load_pseudo_labels, manifest_path, parts_dir,
                                         read_manifest)
from castseg.pseudo_labels.generate import dist_info, generate_pseudo_labels
from castseg.pseudo_labels.import_results import import_pseudo_labels
from castseg.models.loading import load_model as load_teacher  # the one loader, under its pseudo-labelling name

__all__ = ["FORMAT", "PseudoLabeledDataset", "dist_info", "generate_pseudo_labels", "import_pseudo_labels",
           "load_pseudo_labels",
           "load_teacher", "manifest_path", "parts_dir", "read_manifest"]

"""castseg.models.hub_cache: random models in huggingface_hub's cache layout, loaded by hub id."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from castseg.engine.checkpointing import weights_sha256
from castseg.models.hub_cache import (PAPER_HUB_MODELS, build_hub_model, detector_config, dinov2_config,
                                      hub_cache_root, repo_folder_name, repo_seed, segmenter_config,
                                      write_hub_cache)

MODELS = {"IDEA-Research/grounding-dino-base": "grounding_dino", "facebook/sam2.1-hiera-large": "sam2",
          "facebook/dinov2-small": "dinov2"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_home")
    return root, write_hub_cache(root, MODELS, class_words=["traffic light"])


def test_the_layout_is_huggingface_hubs(cache):
    root, snapshots = cache
    assert set(snapshots) == set(MODELS)
    for repo_id, snap in snapshots.items():
        repo = hub_cache_root(root) / repo_folder_name(repo_id)
        assert repo.name == "models--" + repo_id.replace("/", "--")
        commit = (repo / "refs" / "main").read_text()
        assert len(commit) == 40 and int(commit, 16) >= 0 and snap == repo / "snapshots" / commit
        names = {p.name for p in snap.iterdir()}
        assert {"config.json", "model.safetensors"} <= names
        for f in snap.iterdir():  # a relative link to its blob, named by the content's sha256
            assert f.is_symlink() and not os.path.isabs(os.readlink(f))
            blob = f.resolve()
            assert blob.parent == (repo / "blobs").resolve()
            assert blob.name == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert {"tokenizer_config.json"} <= {p.name for p in snapshots["IDEA-Research/grounding-dino-base"].iterdir()}
    # the same models again: the same snapshots, nothing else
    assert write_hub_cache(root, MODELS, class_words=["traffic light"]) == snapshots
    assert all(len(list(p.parent.iterdir())) == 1 for p in snapshots.values())


def test_hub_ids_load_offline_from_the_cache(cache):
    """The loaders users' code calls, by hub id (cache_dir given: huggingface_hub reads HF_HOME at
    import, so the env var route is what the subprocess tests in tests/rehearsal take)."""
    from huggingface_hub import hf_hub_download
    from transformers import AutoModel, AutoTokenizer, GroundingDinoForObjectDetection, Sam2Model

    root, snapshots = cache
    hub = str(hub_cache_root(root))
    for repo_id in MODELS:
        assert hf_hub_download(repo_id, "config.json", cache_dir=hub) == str(snapshots[repo_id] / "config.json")
    det = GroundingDinoForObjectDetection.from_pretrained("IDEA-Research/grounding-dino-base", cache_dir=hub)
    sam = Sam2Model.from_pretrained("facebook/sam2.1-hiera-large", cache_dir=hub)
    vit = AutoModel.from_pretrained("facebook/dinov2-small", cache_dir=hub)
    assert type(vit).__name__ == "Dinov2Model" and vit.config.num_hidden_layers == 12  # the small preset's 2/5/8/11
    for repo_id, model in (("IDEA-Research/grounding-dino-base", det), ("facebook/sam2.1-hiera-large", sam),
                           ("facebook/dinov2-small", vit)):
        torch.manual_seed(repo_seed(repo_id))
        assert weights_sha256(model) == weights_sha256(build_hub_model(MODELS[repo_id], "tiny", repo_id)), repo_id
    tok = AutoTokenizer.from_pretrained("IDEA-Research/grounding-dino-base", cache_dir=hub)
    ids = tok("traffic light . car .")["input_ids"]
    special = det.model.special_tokens.tolist()  # Grounding DINO's [CLS] [SEP] . ? ids
    assert ids[0] == tok.cls_token_id == special[0] and ids[-1] == tok.sep_token_id == special[1]
    assert tok.unk_token_id not in ids and ids.count(tok.convert_tokens_to_ids(".")) == 2 and "." != tok.unk_token
    assert tok.convert_tokens_to_ids(".") in special


def test_paper_size_configs_are_the_published_architectures():
    from transformers import Dinov2Config, GroundingDinoConfig, Sam2Config

    det = GroundingDinoConfig(**detector_config("paper"))
    assert det.backbone_config.embed_dim == 128 and det.backbone_config.depths == [2, 2, 18, 2]
    assert GroundingDinoConfig(**detector_config("paper", "IDEA-Research/grounding-dino-large")
                               ).backbone_config.embed_dim == 192
    sam = Sam2Config(**segmenter_config("paper"))
    assert sam.vision_config.backbone_config.embed_dim_per_stage == [144, 288, 576, 1152]
    d = dinov2_config("paper")
    vit = Dinov2Config(**{k: v for k, v in d.items() if k != "model_type"})
    assert (vit.hidden_size, vit.num_hidden_layers, vit.patch_size) == (384, 12, 14)
    assert set(PAPER_HUB_MODELS.values()) == {"grounding_dino", "sam2", "dinov2"}
    with pytest.raises(Exception, match="size"):
        detector_config("huge")

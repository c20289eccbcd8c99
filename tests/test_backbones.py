"""Backbones: offline loading of any open_clip model, token features, embedded pretraining."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hada.errors import HadaError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, size: int = 64, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


CAPTIONS = ["a red circle", "two small blue squares to the left of a large green striped triangle"]


# ------------------------------------------------------------------------------------ torch stack
def test_torch_stack_runs_one_tiny_forward_of_each_library():
    """Guards against a broken torch/torchvision pair: import and run torchvision, open_clip, torch_geometric."""
    import open_clip
    import torchvision
    from torch_geometric.nn import GATv2Conv

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]

    from hada.backbones import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit").eval()
    with torch.no_grad():
        emb = model.encode_image(torch.randn(1, 3, 64, 64))
    assert emb.shape == (1, 128) and torch.isfinite(emb).all()

    conv = GATv2Conv(8, 4, heads=2, edge_dim=1)
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 0]])
    out = conv(torch.randn(3, 8), edge_index, torch.ones(3, 1))
    assert out.shape == (3, 8)


# ------------------------------------------------------------------------------------ ViT-B-32 via a file
@pytest.fixture(scope="module")
def vitb32(tmp_path_factory):
    """ViT-B-32 with random weights saved to a file, then loaded back through the MODEL:/path spec."""
    import open_clip

    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    for p in reference.parameters():  # frozen like a backbone: nn.MultiheadAttention's fast path then applies
        p.requires_grad_(False)
    path = tmp_path_factory.mktemp("weights") / "vitb32.bin"
    torch.save(reference.state_dict(), path)
    from hada.backbones import load_backbone

    return load_backbone(f"ViT-B-32:{path}"), reference, path


def test_vitb32_from_local_file_gives_its_tokens_and_its_own_embeddings(vitb32):
    backbone, reference, path = vitb32
    ims = _images(2)
    tb = backbone.encode_image_tokens(ims)
    assert tb.tokens.shape == (2, 50, 768)  # CLS + 7x7 patches at 224 px
    assert tb.lengths.tolist() == [50, 50]
    x = torch.stack([backbone.preprocess(im) for im in ims])
    with torch.no_grad():
        want = reference.encode_image(x)
        # the CLS token, projected, is the model's embedding: tokens really are the last layer
        assert torch.allclose(tb.tokens[:, 0] @ reference.visual.proj, want, atol=1e-4)
    assert torch.equal(tb.embeds, want)

    ids = backbone.tokenize(CAPTIONS)
    raw = backbone.encode_text_raw(ids)
    assert raw.tokens.shape == (2, 77, 512)  # every context position of the text tower
    assert raw.pooled_index.tolist() == ids.argmax(-1).tolist()  # EOT, as open_clip pools
    with torch.no_grad():
        want_t = reference.encode_text(ids)
    assert torch.equal(raw.embeds, want_t)
    pooled = raw.tokens[torch.arange(2), raw.pooled_index]
    assert torch.allclose(pooled @ reference.text_projection, want_t, atol=1e-4)

    desc = backbone.describe()
    assert desc["model"] == "ViT-B-32" and desc["image_size"] == [224, 224]
    assert desc["weights_source"] == f"file:{path}" and len(desc["weights_sha256"]) == 64


def test_a_pretrained_tag_resolves_from_the_local_cache_only(vitb32, tmp_path, monkeypatch):
    """MODEL:TAG finds the weights in a huggingface-layout cache (HADA_OPENCLIP_CACHE); nothing is fetched."""
    from safetensors.torch import save_file

    from hada.backbones import load_backbone

    _, reference, _ = vitb32
    repo = tmp_path / "cache" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / "open_clip_model.safetensors"))
    monkeypatch.setenv("HADA_OPENCLIP_CACHE", str(tmp_path / "cache"))
    backbone = load_backbone("ViT-B-32:laion2b_s34b_b79k")
    assert backbone.resolved.kind == "tag" and backbone.resolved.weights.parent == snapshot
    ids = backbone.tokenize(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(backbone.encode_text_raw(ids).embeds, reference.encode_text(ids))


def test_text_tokens_are_reordered_pooled_first_then_valid_tokens(vitb32):
    backbone, _, _ = vitb32
    raw = backbone.encode_text_raw(CAPTIONS)
    tt = backbone.encode_text_tokens(CAPTIONS)
    ids = backbone.tokenize(CAPTIONS)
    n_valid = (ids != 0).sum(1)
    assert tt.lengths.tolist() == n_valid.tolist()
    assert tt.tokens.shape == (2, int(n_valid.max()), 512)  # padded to the batch's longest, not 77
    for b in range(2):
        eot = int(raw.pooled_index[b])
        n = int(tt.lengths[b])
        assert torch.equal(tt.tokens[b, 0], raw.tokens[b, eot])
        assert torch.equal(tt.tokens[b, 1:n], raw.tokens[b, :eot])  # SOT and words, in order
        assert not tt.tokens[b, n:].any()
    wide = backbone.encode_text_tokens(CAPTIONS, max_length=40)
    assert wide.tokens.shape[1] == 40 and torch.equal(wide.tokens[:, : tt.tokens.shape[1]], tt.tokens)


def test_text_token_order_handles_a_pooled_token_anywhere():
    from hada.backbones import text_token_order

    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    pooled = torch.tensor([2, 0])
    assert text_token_order(valid, pooled).tolist() == [[2, 0, 1, 3], [0, 1, 2, 3]]


def test_convolutional_tower_gives_a_pooled_token_then_the_spatial_map():
    from hada.backbones.backbone import wrap_model
    from hada.backbones.spec import ResolvedSpec, register_model_configs
    import open_clip

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-rn")
    bb = wrap_model(model, ResolvedSpec(spec="tiny-rn", kind="random", model_name="tiny-rn", weights=None))
    tb = bb.encode_image_tokens(_images(2))
    assert tb.tokens.shape == (2, 1 + 3 * 3, 384)  # 96 px / 32 = 3x3 map of width 12 * 32
    assert torch.allclose(tb.tokens[:, 0], tb.tokens[:, 1:].mean(1), atol=1e-5)
    x = torch.stack([bb.preprocess(im) for im in _images(2)])
    with torch.no_grad():
        assert torch.equal(tb.embeds, model.encode_image(x))


# ------------------------------------------------------------------------------------ errors
def test_missing_weights_are_one_clear_error(hada_data, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from hada.backbones import load_backbone

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr("pathlib.Path.home", lambda: tmp_path)  # no ~/.cache/clip either

    with pytest.raises(HadaError, match=r"tiny-vit.*open_clip_model\.safetensors is missing.*hada backbones pretrain"):
        load_backbone("tiny-vit")
    with pytest.raises(HadaError, match=r"not in the local cache.*nothing is downloaded"):
        load_backbone("ViT-B-32:laion2b_s34b_b79k")
    with pytest.raises(HadaError, match="does not exist"):
        load_backbone(f"ViT-B-32:{tmp_path}/nope.bin")
    with pytest.raises(HadaError, match="not an open_clip tag"):
        load_backbone("ViT-B-32:no_such_tag")
    with pytest.raises(HadaError, match="unknown open_clip model"):
        load_backbone("ViT-Q-99:openai")
    with pytest.raises(HadaError, match="config file|open_clip_config.json is missing"):
        load_backbone(f"local-dir:{tmp_path}")
    with pytest.raises(HadaError, match="unknown backbone"):
        load_backbone("tiny-nonexistent")


def test_cli_reports_a_missing_backbone_in_one_line(hada_data, tiny_synthetic, capsys):
    from hada.cli import main

    code = main(["backbones", "zeroshot", "--data-root", str(tiny_synthetic), "--backbones", "tiny-vit"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("hada: error: backbone 'tiny-vit' has no weights")


# ------------------------------------------------------------------------------------ embedded pretraining
def test_embedded_backbones_are_three_registered_open_clip_architectures():
    import open_clip
    from hada.backbones import EMBEDDED_BACKBONES, register_model_configs
    from hada.backbones.spec import load_recipes

    register_model_configs()
    assert len(EMBEDDED_BACKBONES) >= 3
    recipes = load_recipes()
    cfgs = [open_clip.get_model_config(recipes[n]["model"]) for n in EMBEDDED_BACKBONES]
    assert all(c is not None for c in cfgs)
    kinds = {(str(c["vision_cfg"]["layers"]), c["vision_cfg"]["image_size"], c["text_cfg"]["context_length"])
             for c in cfgs}
    assert len(kinds) == len(cfgs)  # all different towers / resolutions / text contexts
    assert any(isinstance(c["vision_cfg"]["layers"], list) for c in cfgs)  # a convolutional one
    assert any(recipes[n].get("grayscale") for n in EMBEDDED_BACKBONES)  # a colour-blind one


def test_tiny_pretraining_saves_skips_reloads_and_is_deterministic(hada_data, tiny_synthetic, capsys):
    from hada.backbones import load_backbone
    from hada.backbones.pretrain import pretrain
    from hada.backbones.spec import RECORD_FILE, WEIGHTS_FILE
    from hada.cli import main
    from hada.paths import backbones_dir

    name = "tiny-vit-gray"
    assert main(["backbones", "pretrain", "--backbones", name, "--data-root", str(tiny_synthetic), "--size", "tiny"]) == 0
    folder = backbones_dir() / name
    record = json.loads((folder / RECORD_FILE).read_text())
    assert record["steps"] == 3 and len(record["loss_curve"]) == 3 and record["train_seconds"] > 0
    assert record["pretrain_images"] == 40  # the pretrain split only
    first = (folder / WEIGHTS_FILE).read_bytes()
    assert not list(backbones_dir().glob(".*"))  # no temporary folders left

    log = []
    pretrain([name], tiny_synthetic, max_steps=3, batch_size=16, log=log.append)
    assert "skipped" in log[0]
    pretrain([name], tiny_synthetic, max_steps=3, batch_size=16, force=True, log=log.append)
    assert (folder / WEIGHTS_FILE).read_bytes() == first  # same seed, same bytes

    bb = load_backbone(name)
    assert bb.grayscale and bb.describe()["preprocess"]["grayscale"]
    same = load_backbone(f"local-dir:{folder}")  # the folder is a valid open_clip local-dir
    assert same.grayscale
    ims = _images(3)
    a, b = bb.encode_image_tokens(ims), same.encode_image_tokens(ims)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.embeds, b.embeds)
    # colour-blind: the grayscale copy of an image gives exactly the same features
    gray = ims[0].convert("L").convert("RGB")
    assert torch.equal(bb.encode_image_tokens([gray]).embeds, bb.encode_image_tokens([ims[0]]).embeds)

    assert main(["backbones", "list"]) == 0
    assert "pretrained" in capsys.readouterr().out


def test_random_weights_spec_is_seeded():
    from hada.backbones import load_backbone

    a, b = load_backbone("tiny-rn:random"), load_backbone("tiny-rn:random")
    ims = _images(1)
    assert torch.equal(a.encode_image_tokens(ims).embeds, b.encode_image_tokens(ims).embeds)
    assert a.describe()["weights_source"] == "random-init:seed0"


def test_pretraining_keeps_snapshots_that_resolve_as_weaker_backbones_and_change_nothing(hada_data, tiny_synthetic):
    from dataclasses import replace

    from hada.backbones import load_backbone
    from hada.backbones.pretrain import Recipe, pretrain, train_backbone
    from hada.backbones.spec import SNAPSHOT_DIR, WEIGHTS_FILE, resolve_spec
    from hada.data.datasets import load_dataset
    from hada.errors import HadaError
    from hada.paths import backbones_dir

    name = "tiny-rn"
    record = pretrain([name], tiny_synthetic, max_steps=6, batch_size=16, log=lambda m: None)[name]
    assert record["steps_per_epoch"] == 2 and record["snapshot_epochs"] == [1, 2]
    folder = backbones_dir() / name / SNAPSHOT_DIR
    weights = {e: (folder / f"epoch{e}" / WEIGHTS_FILE).read_bytes() for e in (1, 2)}
    assert len({*weights.values(), (backbones_dir() / name / WEIGHTS_FILE).read_bytes()}) == 3

    snapshot = resolve_spec(f"{name}@1")
    assert snapshot.spec == f"{name}@1" and snapshot.weights == folder / "epoch1" / WEIGHTS_FILE
    a, b = load_backbone(f"{name}@1"), load_backbone(name)
    ims = _images(2)
    assert not torch.equal(a.encode_image_tokens(ims).embeds, b.encode_image_tokens(ims).embeds)
    with pytest.raises(HadaError, match="no snapshot after epoch 7"):
        resolve_spec(f"{name}@7")

    # keeping snapshots does not touch the training: the same recipe without them ends in the same weights
    records = load_dataset("synthetic", tiny_synthetic).split("pretrain")
    recipe = Recipe.for_backbone(name, batch_size=16)
    with_snaps, _, rec = train_backbone(name, recipe, records, max_steps=6, progress=False)
    without, _, _ = train_backbone(name, replace(recipe, snapshots=[]), records, max_steps=6, progress=False)
    assert sorted(rec["snapshots"]) == [1, 2]
    for (key, x), y in zip(with_snaps.state_dict().items(), without.state_dict().values()):
        assert torch.equal(x, y), key


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn", "tiny-vit-gray"])
def test_pretraining_text_tower_cut_after_the_last_eot_equals_open_clips(name):
    """Pretraining runs the text tower only up to the batch's last end-of-text token (captions of a few tokens in
    a context of 24 to 64): its embeddings and every gradient equal open_clip's full-context encode_text."""
    import open_clip

    from hada.backbones.pretrain import encode_text_trimmed
    from hada.backbones.spec import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    text = open_clip.get_tokenizer(name)(["blue rhombus", "an illustration of a red star", "a graphic"])
    assert int(text.argmax(dim=-1).max()) + 1 < text.shape[1]  # the cut is real
    weights = torch.randn(3, model.text_projection.shape[-1])
    grads = []
    for encode in (model.encode_text, lambda t, normalize: encode_text_trimmed(model, t, normalize)):
        model.zero_grad(set_to_none=True)
        out = encode(text, normalize=True)
        (out * weights).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, full_grads), (cut, cut_grads) = grads
    torch.testing.assert_close(cut, full, atol=1e-6, rtol=0)
    assert set(cut_grads) == set(full_grads) and "positional_embedding" in cut_grads
    for n in full_grads:
        torch.testing.assert_close(cut_grads[n], full_grads[n], atol=1e-5, rtol=1e-4, msg=n)

"""Result rows, legends and tables name a backbone by its model, never by the weights file's path a real preset
gives it (``book/params/flickr30k.yaml``: ``ViT-B-16:/weights/vit_b_16_openai.bin``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hada.labels import backbone_labels
from hada.metrics import ROW_KINDS, row_label

PARAMS = Path(__file__).resolve().parents[1] / "book" / "params"


def _labels_of_every_row(specs: list[str]) -> list[str]:
    """Every row label the results build for ``specs``, as hada.experiments builds them."""
    labels = backbone_labels(specs)
    rows = [row_label("backbone", labels, k) for k in range(len(specs))]
    return rows + [row_label(kind, labels) for kind in ROW_KINDS if kind not in ("backbone", "variant")]


@pytest.mark.parametrize("preset", sorted(p.name for p in PARAMS.glob("*.yaml")))
def test_a_real_preset_s_rows_name_models_not_paths(preset):
    specs = yaml.safe_load((PARAMS / preset).read_text())["backbones"].split(",")
    assert any("/" in s for s in specs), f"{preset} gives no weights path: the test would prove nothing"
    labels = backbone_labels(specs)
    assert labels == [s.split(":", 1)[0] for s in specs]
    for label in _labels_of_every_row(specs):
        assert "/" not in label and "weights" not in label, label


def test_two_weights_files_of_one_model_are_told_apart_by_their_stems():
    specs = ["ViT-B-16:/weights/vit_b_16_openai.bin", "ViT-B-16:/other/place/vit_b_16_laion.safetensors",
             "convnext_base:/weights/convnext_base_laion.bin"]
    assert backbone_labels(specs) == ["ViT-B-16 (vit_b_16_openai)", "ViT-B-16 (vit_b_16_laion)", "convnext_base"]
    assert row_label("average", backbone_labels(specs)) == \
        "average(ViT-B-16 (vit_b_16_openai) + ViT-B-16 (vit_b_16_laion) + convnext_base)"
    for label in _labels_of_every_row(specs):
        assert "/" not in label, label


def test_labels_stay_distinct_when_even_the_stems_are_shared():
    specs = ["ViT-B-16:/a/model.bin", "ViT-B-16:/b/model.bin"]
    labels = backbone_labels(specs)
    assert len(set(labels)) == 2 and not any("/" in label for label in labels)


def test_names_without_paths_are_kept():
    assert backbone_labels(["tiny-vit", "tiny-vit@1", "tiny-rn"]) == ["tiny-vit", "tiny-vit@1", "tiny-rn"]
    assert backbone_labels(["ViT-B-16:openai", "ViT-B-16:laion2b_s34b_b88k"]) == \
        ["ViT-B-16 (openai)", "ViT-B-16 (laion2b_s34b_b88k)"]
    assert backbone_labels(["ViT-B-16:openai"])[0] == "ViT-B-16"
    assert backbone_labels(["local-dir:/models/my_clip/"])[0] == "my_clip"
    assert backbone_labels(["RN50:C:\\weights\\rn50.pt"])[0] == "RN50"


def test_every_run_s_results_name_models_not_paths(tmp_path):
    """The page "Every run's results" shows each run's CLIP_benchmark record, whose model names the specs."""
    import json

    from hada.book.results_all import GatheredResults, results_table
    from hada.evaluate import clip_benchmark_record

    specs = ["ViT-B-16:/weights/vit_b_16_openai.bin", "convnext_base:/weights/convnext_base_laion.bin"]
    run_dir = tmp_path / "hada-k2-0123456789ab"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"data": {"backbones": specs}}))
    metrics = {f"{way}_retrieval_recall@{k}": 50.0 for k in (1, 5, 10) for way in ("image", "text")}
    record = clip_benchmark_record(metrics, "flickr30k", f"hada({' + '.join(specs)})", str(run_dir))
    table = results_table(GatheredResults([(run_dir, record)], []))
    assert [row["name"] for row in table.rows] == ["hada(ViT-B-16 + convnext_base)"]

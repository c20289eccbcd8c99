"""hada.config: one composed configuration, recipes as data, config files and `hada train --print-config`."""

import json

import pytest

from hada.cli import main
from hada.config import (RECIPES, EdgeWeights, LossConfig, ModelConfig, TrainConfig, leaf_fields,
                         load_config_file, recipe)
from hada.errors import HadaError


def test_every_setting_is_defined_once():
    """Each leaf name belongs to one class: the CLI's flat option names and the file's short keys are unambiguous."""
    names = [path.rsplit(".", 1)[-1] for path, _ in leaf_fields()]
    assert len(names) == len(set(names))
    edge_fields = [path for path, _ in leaf_fields() if path.startswith("model.edges.")]
    assert [p.rsplit(".", 1)[-1] for p in edge_fields] == ["w_fc", "w_fcx", "w_cc", "w_ffx", "w_self", "self_loops",
                                                             "directed"]


def test_dict_round_trip_and_unknown_keys():
    config = recipe("miniature", gnn="gcn", **{"model.edges.w_fc": 1.0, "data.backbones": "a, b"})
    assert config.model.gnn == "gcn" and config.model.edges.w_fc == 1.0 and config.data.backbones == ["a", "b"]
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(HadaError, match="unknown ModelConfig settings: colour"):
        TrainConfig.from_dict({"model": {"colour": 1}})
    with pytest.raises(HadaError, match="unknown setting 'colour'"):
        config.override(colour=1)


def test_recipes_are_overrides_of_the_defaults():
    assert TrainConfig() == recipe("default")
    mini = recipe("miniature")
    assert (mini.model.width, mini.model.head_dim, mini.model.precision) == (128, 32, "auto")
    assert mini.loss == LossConfig() and mini.model.edges == EdgeWeights()
    assert ModelConfig().width == 512 and ModelConfig().head_dim is None  # the paper's shape by default
    assert set(RECIPES) >= {"default", "miniature"}
    with pytest.raises(HadaError, match="unknown recipe"):
        recipe("nope")


def test_validation_is_one_clear_error():
    with pytest.raises(HadaError, match="gnn must be one of"):
        ModelConfig(gnn="gin")
    with pytest.raises(HadaError, match="dense backend needs the published graph"):
        ModelConfig(backend="dense", edges=EdgeWeights(directed=False))
    with pytest.raises(HadaError, match="epochs must be >= 1"):
        recipe("miniature", epochs=0)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_sections_dotted_keys_and_recipe(tmp_path, suffix):
    values = {"recipe": "miniature", "model": {"layers": 2, "edges": {"w_cc": 1.5}}, "optim.lr": 3e-4, "itm": False}
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    assert load_config_file(path) == values


def test_print_config_resolves_recipe_file_and_options(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: miniature\nmodel:\n  layers: 2\noptim.lr: 0.0003\nitm: false\n")
    assert main(["train", "--config", str(path), "--print-config", "--lr", "0.001", "--backbones", "a,b"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["layers"] == 2 and printed["model"]["width"] == 128  # file over recipe
    assert printed["optim"]["lr"] == 0.001  # the command line over the file
    assert printed["loss"]["itm"] is False and printed["data"]["backbones"] == ["a", "b"]
    assert printed["model"]["precision"] in ("fp32", "bf16")  # resolved: the run's identity
    assert TrainConfig.from_dict(printed).resolved().identity() == TrainConfig.from_dict(printed).identity()


def test_bad_config_files_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert main(["train", "--config", str(bad), "--print-config"]) == 2
    assert "not valid yaml" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.json"), "--print-config"]) == 2
    typo = tmp_path / "typo.json"
    typo.write_text('{"model": {"widht": 3}}')
    assert main(["train", "--config", str(typo), "--print-config"]) == 2
    assert "unknown setting 'model.widht'" in capsys.readouterr().err
    for text, message in (('{"model": [1, 2]}', "ModelConfig needs a mapping of settings"),
                          ('{"data": 3}', "DataConfig needs a mapping of settings"),
                          ('{"model": {"width": "wide"}}', "ModelConfig.width must be int, got 'wide'"),
                          ('{"loss": {"itm": "yes"}}', "LossConfig.itm must be bool")):
        typo.write_text(text)
        assert main(["train", "--config", str(typo), "--print-config"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err

"""`dice <command> --help`: only the command's own keys, each with its composed default and a description."""
from __future__ import annotations

import dataclasses

import pytest

from dice_cli import config
from dice_cli.cli import SCHEMAS
from dice_cli.keyhelp import field_docs, key_rows

ANALYSIS = ["gt", "estimate", "detect", "value"]


@pytest.mark.parametrize("command", list(SCHEMAS))
def test_every_key_of_every_command_has_a_description(command):
    rows = key_rows(getattr(config, SCHEMAS[command]), None)
    assert rows and all(doc for _, _, doc in rows), [k for k, _, d in rows if not d]


@pytest.mark.parametrize("command", ANALYSIS)
def test_analysis_help_lists_its_own_keys_not_trains_groups(dice, command):
    code, out, err = dice(command, "--help")
    assert code == 0, err
    assert out.startswith(f"dice {command}: ") and "key=value" in out
    assert "Configuration groups" not in out and "group=choice" not in out
    for group in ("dataset", "model", "topology", "partition", "optim"):
        assert f"\n  {group} " not in out and f"{group}:" not in out
    schema = getattr(config, SCHEMAS[command])
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for f in dataclasses.fields(schema):
        assert f.name in lines, f.name
        assert len(lines[f.name].split(None, 2)) == 3, lines[f.name]        # key, default, description
    assert lines["run"].split()[1] == "outputs/latest"
    assert lines["overwrite"].split()[1] == "false"


def test_train_help_shows_groups_and_the_composed_defaults(dice):
    code, out, err = dice("train", "dataset=synthetic", "nodes=8", "--help")
    assert code == 0, err
    lines = {line.split()[0]: line.split(None, 2) for line in out.splitlines() if line.startswith("  ")}
    assert lines["dataset"][1] == "synthetic" and "cifar10" in lines["dataset"][2]
    assert lines["dataset.name"][1] == "synthetic"
    assert lines["nodes"][1:] == ["8", "number of nodes n"]
    assert lines["topology.p"][1] == "0.3" and "erdos_renyi" in lines["topology.p"][2]
    assert "defense.threshold" in lines and "record.every" in lines
    assert "Configuration groups" not in out                  # Hydra's own listing is replaced


def test_pipeline_help_has_train_and_stage_keys(dice):
    code, out, _ = dice("pipeline", "--help")
    keys = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert code == 0 and {"nodes", "influence.hops", "detect.window", "stages", "methods", "topology"} <= keys


def test_other_hydra_flags_still_work(dice):
    code, out, _ = dice("gt", "hops=3", "--cfg", "job")
    assert code == 0 and "hops: 3" in out and "Keys" not in out
    code, out, _ = dice("train", "--hydra-help")
    assert code == 0 and "Hydra" in out


def test_descriptions_come_from_the_schema_comments():
    docs = field_docs(config.DefenseConfig)
    assert docs["score"].startswith("dice, dice_select: update") and "docs/robustness.md" in docs["score"]
    assert "strongly connected" in field_docs(config.TopologyConfig)["allow_disconnected"]
    assert field_docs(config.GtConfig)["q"].startswith("node weights")     # inherited from SelectionConfig


def test_value_unknown_key_is_caught_before_hydra(dice):
    code, _, err = dice("value", "lsd=50")
    assert code == 2 and "unknown key `lsd`" in err and "`lds`" in err

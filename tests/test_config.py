"""The config grammar: groups, experiments, dotted overrides, seqlen, and every bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longctx.config import ConfigError, available, compose, config_root
from longctx.models import build_model

REPO = Path(__file__).resolve().parents[1]


def test_defaults_compose_to_the_tiny_cpu_run():
    cfg = compose([])
    assert (cfg.model.name, cfg.data.name, cfg.task.name, cfg.trainer.name) == (
        "gpt2-tiny", "shakespeare", "causal_lm", "default")
    assert cfg.model.n_layer == 4


def test_group_pick_dotted_override_and_yaml_typed_values():
    cfg = compose(["model=gpt2", "model.dropout=0.2", "trainer.max_steps=7", "task.betas=[0.8, 0.9]"])
    assert cfg.model.n_embd == 768 and cfg.model.dropout == 0.2
    assert cfg.trainer.max_steps == 7 and list(cfg.task.betas) == [0.8, 0.9]
    # An int where a float is expected is accepted and stored as a float.
    assert isinstance(compose(["task.lr=1"]).task.lr, float)


def test_seqlen_sets_data_window_and_model_positions():
    cfg = compose(["model=gpt2", "seqlen=4096"])
    assert cfg.data.seqlen == 4096 and cfg.model.max_positions == 4096
    short = compose(["model=gpt2", "seqlen=512"])
    assert short.data.seqlen == 512 and short.model.max_positions == 1024  # positions never shrink


def test_experiment_picks_groups_and_command_line_wins():
    names = available("experiment")
    assert names, "configs/experiment/ should hold presets"
    exp = names[0]
    cfg = compose([f"experiment={exp}", "trainer.max_steps=3"])
    assert cfg.experiment == exp and cfg.trainer.max_steps == 3


@pytest.mark.parametrize("name", available("experiment"))
def test_every_experiment_composes_and_builds_its_model_on_meta(name):
    cfg = compose([f"experiment={name}"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_every_experiment_opens_with_its_run_command():
    for path in (config_root() / "experiment").glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# python train.py experiment=" + path.stem), path


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["model=gpt3"], "unknown model 'gpt3'; choose from: gpt2"),
        (["data=shakespear"], "choose from: shakespeare"),
        (["experiment=nope"], "unknown experiment 'nope'"),
        (["model.n_layers=3"], "unknown key 'model.n_layers'; nearest valid keys: model.n_layer"),
        (["trainer.max_step=3"], "nearest valid keys: trainer.max_steps"),
        (["trainer.max_steps=abc"], "trainer.max_steps expects an integer, got 'abc'"),
        (["model.dropout=[1]"], "model.dropout expects a number"),
        (["trainer.progress_bar=maybe"], "trainer.progress_bar expects true or false"),
        (["data.seqlen=4096"], "data.seqlen=4096 exceeds model.max_positions=256"),
        (["seqlen=-3"], "seqlen expects a positive integer"),
        (["data.corpus_path=/no/such/texts"], "data.corpus_path: no such file or directory: /no/such/texts"),
        (["data=textfiles", "data.paths=[/no/a.txt]"], "data.paths: no such file or directory: /no/a.txt"),
        (["model.attn=fast"], "model.attn='fast' is not an attention implementation"),
        (["model=bert-tiny", "task=masked_lm", "model.norm_position=mid"], "model.norm_position='mid'"),
        (["trainer.precision=fp8"], "trainer.precision='fp8'"),
        (["model"], "expected KEY=VALUE, got 'model'"),
        (["model=bert-tiny"], "task=causal_lm trains model.arch gpt2; model=bert-tiny is arch bert"),
    ],
)
def test_bad_input_names_the_key_and_choices(argv, fragment):
    with pytest.raises(ConfigError) as err:
        compose(argv)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("argv", [["model=gpt3"], ["trainer.max_steps=x"], ["data.tokenizer_path=/missing"]])
def test_cli_bad_input_exits_2_with_one_line_and_no_traceback(argv, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing written for a rejected command


def test_eval_without_ckpt_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "eval.py")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: eval.py needs ckpt=PATH")

"""Compose run configs from configs/ and the command line, and validate them.

Grammar (``python train.py [experiment=NAME] [GROUP=NAME ...] [a.b=VALUE ...] [seqlen=N]``):

- ``GROUP=NAME`` picks ``configs/GROUP/NAME.yaml`` for GROUP in model, data, task, trainer;
- ``experiment=NAME`` loads ``configs/experiment/NAME.yaml``: its ``defaults`` pick groups (the
  command line still wins) and the rest of it overrides keys of the composed config;
- ``a.b=VALUE`` overrides one existing key; VALUE is parsed as YAML and must fit the key's type;
- ``seqlen=N`` sets the data window and the model's positions together.

Every mistake raises :class:`ConfigError` with a one-line message that names the key and the nearest
valid choices; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

GROUPS = ("model", "data", "task", "trainer")
# Approximate attentions, built by longctx.models.approx.
APPROX_ATTNS = ("linformer", "performer", "linear", "local", "reformer")
ATTN_IMPLS = ("auto", "flash", "reference", "standard", "sdpa", "blocksparse", *APPROX_ATTNS)
# Which model architectures each task trains (task.arch -> model.arch).
TASK_MODELS = {"causal_lm": ("gpt2",)}
TASK_MODELS["masked_lm"] = ("bert",)
TASK_MODELS["classify"] = ("bert",)
# The data a task reads when neither the command line nor the experiment picks one (the root default
# is LM data), and the data kinds it can read (task.arch -> data.kind), where they are fixed.
TASK_DEFAULT_DATA = {"masked_lm": "shakespeare_mlm"}
TASK_DATA_KINDS = {"masked_lm": ("mlm",)}
NORM_POSITIONS = ("post", "pre")  # model.norm_position of BERT (BertConfig.norm_position)
PRECISIONS = ("auto", "32", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true")
# Keys that take a number or one of these words.
NUMBER_OR_WORD = {"task.threshold": ("tune",)}


class ConfigError(ValueError):
    """A bad command line or config file; the message is one line meant for the user."""


def config_root() -> Path:
    """The configs/ folder: $LONGCTX_CONFIGS, else the repository's configs/ next to src/."""
    env = os.environ.get("LONGCTX_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


def _nearest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    shown = close or sorted(choices)[:8]
    return ", ".join(shown) + ("" if close or len(choices) <= 8 else ", ...")


def available(group: str) -> list[str]:
    """Names of the YAML files in configs/<group>/."""
    return sorted(p.stem for p in (config_root() / group).glob("*.yaml"))


def _load_yaml(path: Path) -> dict:
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _load_choice(group: str, name: str) -> dict:
    path = config_root() / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {group} '{name}'; choose from: {_nearest(name, available(group))}")
    return _load_yaml(path)


def parse_argv(argv: Sequence[str]) -> list[tuple[str, Any]]:
    """Split ``KEY=VALUE`` tokens; VALUE is parsed as YAML (``1e-3`` -> float, ``null`` -> None)."""
    pairs = []
    for token in argv:
        key, sep, raw = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected KEY=VALUE, got '{token}' (e.g. model=gpt2 trainer.max_steps=100)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value) if value.lower() not in ("nan", "inf", "-inf") else value
            except ValueError:
                pass
        pairs.append((key, value))
    return pairs


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        keys.append(path)
        if isinstance(v, DictConfig):
            keys.extend(_all_keys(v, path + "."))
    return keys


def _coerce(key: str, old: Any, new: Any) -> Any:
    """Check that an override fits the type of the value it replaces."""
    if key in NUMBER_OR_WORD:
        if new in NUMBER_OR_WORD[key] or isinstance(new, (int, float)) and not isinstance(new, bool):
            return new
        raise ConfigError(f"{key} expects a number or {' / '.join(NUMBER_OR_WORD[key])}, got '{new}'")
    if old is None or new is None:
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
        raise ConfigError(f"{key} expects true or false, got '{new}'")
    if isinstance(old, int):
        if isinstance(new, int) and not isinstance(new, bool):
            return new
        if isinstance(new, float) and new.is_integer():
            return int(new)
        raise ConfigError(f"{key} expects an integer, got '{new}'")
    if isinstance(old, float):
        if isinstance(new, (int, float)) and not isinstance(new, bool):
            return float(new)
        raise ConfigError(f"{key} expects a number, got '{new}'")
    if isinstance(old, str):
        if isinstance(new, (dict, list)):
            raise ConfigError(f"{key} expects a string, got '{new}'")
        return str(new)
    if isinstance(old, (list, ListConfig)):
        if isinstance(new, list):
            return new
        raise ConfigError(f"{key} expects a list like [1, 2], got '{new}'")
    if isinstance(old, DictConfig):
        raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.{next(iter(old), 'key')}=...")
    return new


def apply_overrides(cfg: DictConfig, overrides: Sequence[tuple[str, Any]]) -> None:
    """Set existing dotted keys in place, refusing unknown keys and values of the wrong type."""
    for key, value in overrides:
        sentinel = object()
        old = OmegaConf.select(cfg, key, default=sentinel)
        if old is sentinel:
            raise ConfigError(f"unknown key '{key}'; nearest valid keys: {_nearest(key, _all_keys(cfg))}")
        OmegaConf.update(cfg, key, _coerce(key, old, value), merge=False)


def compose(argv: Sequence[str]) -> DictConfig:
    """Build the run config from configs/defaults.yaml, an optional experiment and the command line."""
    pairs = parse_argv(argv)
    root = _load_yaml(config_root() / "defaults.yaml")
    picks: dict[str, str] = dict(root.pop("defaults", {}))
    cli_picks = {k: str(v) for k, v in pairs if k in GROUPS or k == "experiment"}
    overrides = [(k, v) for k, v in pairs if k not in cli_picks and k != "seqlen"]
    seqlens = [v for k, v in pairs if k == "seqlen"]

    experiment: dict = {}
    chosen = set(cli_picks)
    if "experiment" in cli_picks:
        experiment = _load_choice("experiment", cli_picks["experiment"])
        for group, name in (experiment.pop("defaults", None) or {}).items():
            if group not in GROUPS:
                raise ConfigError(f"experiment '{cli_picks['experiment']}': unknown group '{group}'")
            picks[group] = str(name)
            chosen.add(group)
        root["experiment"] = cli_picks["experiment"]
    picks.update({k: v for k, v in cli_picks.items() if k != "experiment"})
    if "data" not in chosen and picks["task"] in TASK_DEFAULT_DATA:
        picks["data"] = TASK_DEFAULT_DATA[picks["task"]]

    cfg = OmegaConf.create(root)
    for group in GROUPS:
        body = _load_choice(group, picks[group])
        body["name"] = picks[group]
        cfg[group] = body
    if experiment:
        cfg = OmegaConf.merge(cfg, experiment)
    apply_overrides(cfg, overrides)
    for value in seqlens:
        set_seqlen(cfg, value)
    if cfg.data.get("kind") == "mlm" and "model.vocab_size" not in dict(overrides):
        cfg.model.vocab_size = cfg.data.vocab_size  # the model embeds the data's own vocabulary
    validate(cfg)
    return cfg


def set_seqlen(cfg: DictConfig, value: Any) -> None:
    """The ``seqlen=N`` shorthand: the data window and the model's learned positions."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"seqlen expects a positive integer, got '{value}'")
    cfg.data.seqlen = value
    if "max_positions" in cfg.model:
        cfg.model.max_positions = max(value, cfg.model.max_positions)


def validate(cfg: DictConfig) -> None:
    """Cross-key checks that a type check alone cannot make."""
    seqlen, positions = cfg.data.get("seqlen"), cfg.model.get("max_positions")
    if seqlen is not None and positions is not None and seqlen > positions:
        raise ConfigError(
            f"data.seqlen={seqlen} exceeds model.max_positions={positions} of model={cfg.model.name}; "
            f"use seqlen={seqlen} to set both"
        )
    if seqlen is not None and seqlen < 1:
        raise ConfigError(f"data.seqlen must be positive, got {seqlen}")
    if cfg.data.get("kind") == "mlm" and cfg.model.get("vocab_size") != cfg.data.get("vocab_size"):
        raise ConfigError(f"model.vocab_size={cfg.model.get('vocab_size')} must equal data.vocab_size="
                          f"{cfg.data.get('vocab_size')} (the WordPiece vocabulary); "
                          "set data.vocab_size only")
    task_arch, model_arch = cfg.task.get("arch"), cfg.model.get("arch")
    kinds = TASK_DATA_KINDS.get(task_arch)
    if kinds and cfg.data.get("kind") not in kinds:
        raise ConfigError(f"task={cfg.task.name} reads data of kind {', '.join(kinds)}; data={cfg.data.name} "
                          f"is kind {cfg.data.get('kind')} (e.g. data={TASK_DEFAULT_DATA[task_arch]})")
    if task_arch in TASK_MODELS and model_arch not in TASK_MODELS[task_arch]:
        raise ConfigError(f"task={cfg.task.name} trains model.arch {', '.join(TASK_MODELS[task_arch])}; "
                          f"model={cfg.model.name} is arch {model_arch} (no task for it yet)")
    norm = cfg.model.get("norm_position")
    if norm is not None and norm not in NORM_POSITIONS:
        raise ConfigError(f"model.norm_position='{norm}'; choose from: {', '.join(NORM_POSITIONS)}")
    attn = cfg.model.get("attn")
    if attn is not None and attn not in ATTN_IMPLS:
        raise ConfigError(f"model.attn='{attn}' is not an attention implementation; choose from: "
                          f"{', '.join(ATTN_IMPLS)}")
    if attn in APPROX_ATTNS:
        from longctx.models.approx import approx_settings

        approx = cfg.model.get("approx")
        try:
            approx_settings(attn, OmegaConf.to_container(approx) if approx is not None else None,
                            causal=cfg.model.get("arch") == "gpt2", max_len=positions)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    threshold = cfg.task.get("threshold")
    if threshold is not None and threshold != "tune" and not (
            isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 < threshold < 1):
        raise ConfigError(f"task.threshold={threshold} must be 'tune' or a number in (0, 1)")
    precision = str(cfg.trainer.get("precision", "auto"))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision='{precision}'; choose from: {', '.join(PRECISIONS)}")
    _validate_scale(cfg)
    for key in ("corpus_path", "tokenizer_path", "paths"):
        value = cfg.data.get(key)
        paths = value.values() if isinstance(value, DictConfig) else value
        paths = [paths] if isinstance(paths, str) else paths or []
        for path in paths:
            for item in [path] if isinstance(path, str) else path:
                if not Path(str(item)).exists():
                    raise ConfigError(f"data.{key}: no such file or directory: {item}")


def _validate_scale(cfg: DictConfig) -> None:
    """The multi-device options of the trainer section (longctx.distributed) that cannot combine."""
    t = cfg.trainer
    batch = t.get("global_batch_size")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"trainer.global_batch_size expects a positive number of sequences or null, "
                          f"got '{batch}'")
    if batch is not None and t.get("accumulate_grad_batches", 1) != 1:
        raise ConfigError(f"set trainer.global_batch_size ({batch}) or trainer.accumulate_grad_batches "
                          f"({t.accumulate_grad_batches}), not both: the global batch sets the accumulation")
    if t.get("strategy") == "fsdp" and str(t.get("precision")) in ("16-mixed", "64-true"):
        raise ConfigError(f"trainer.precision={t.precision} does not run with trainer.strategy=fsdp; "
                          "choose from: auto, bf16-mixed, bf16-true, 32-true")
    if t.get("compile") and t.get("strategy") == "fsdp":
        raise ConfigError("trainer.compile=true with trainer.strategy=fsdp is not supported; "
                          "use strategy ddp or auto to compile")
    if t.get("activation_checkpointing") and cfg.model.get("arch") != "gpt2":
        raise ConfigError(f"trainer.activation_checkpointing=true supports model.arch gpt2; "
                          f"model={cfg.model.name} is arch {cfg.model.get('arch')}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)

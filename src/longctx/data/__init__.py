"""Data modules and the registry that maps ``data.kind`` to them."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf


def _lm(section: dict[str, Any], seed: int) -> L.LightningDataModule:
    from longctx.data.lm import LMDataModule

    accepted = set(inspect.signature(LMDataModule).parameters)
    return LMDataModule(seed=seed, **{k: v for k, v in section.items() if k in accepted})


def _classify(section: dict[str, Any], seed: int) -> L.LightningDataModule:
    from longctx.data.classify import ClassifyDataModule

    accepted = set(inspect.signature(ClassifyDataModule).parameters)
    return ClassifyDataModule(seed=seed, **{k: v for k, v in section.items() if k in accepted})


def _mlm(section: dict[str, Any], seed: int) -> L.LightningDataModule:
    from longctx.data.mlm import MLMDataModule

    accepted = set(inspect.signature(MLMDataModule).parameters)
    return MLMDataModule(seed=seed, **{k: v for k, v in section.items() if k in accepted})


def _longdoc(section: dict[str, Any], seed: int) -> L.LightningDataModule:
    from longctx.data.longdoc import build_longdoc

    return build_longdoc(section, seed)


def _lra_files(module: str, name: str) -> Callable[[dict[str, Any], int], L.LightningDataModule]:
    """Builder of an LRA task's data module, ``longctx.data.lra.<module>.<name>`` (loaded from published
    files, or generated: ListOps, Pathfinder)."""

    def build(section: dict[str, Any], seed: int) -> L.LightningDataModule:
        cls = getattr(importlib.import_module(f"longctx.data.lra.{module}"), name)
        accepted = set(inspect.signature(cls).parameters)
        return cls(seed=seed, **{k: v for k, v in section.items() if k in accepted})

    return build


DATA: dict[str, Callable[[dict[str, Any], int], L.LightningDataModule]] = {
    "lm": _lm,
    "mlm": _mlm,
    "classify": _classify,
    "longdoc": _longdoc,
    "lra_text": _lra_files("text", "TextDataModule"),
    "lra_retrieval": _lra_files("retrieval", "RetrievalDataModule"),
    "lra_image": _lra_files("image", "ImageDataModule"),
    "lra_listops": _lra_files("listops", "ListOpsDataModule"),
    "lra_pathfinder": _lra_files("pathfinder", "PathfinderDataModule"),
}


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The LightningDataModule of a run config's ``data`` section (seeded by the run's ``seed``)."""
    section = OmegaConf.to_container(cfg.data, resolve=True)
    kind = section.pop("kind")
    if kind not in DATA:
        raise ValueError(f"data.kind='{kind}' is unknown; choose from: {', '.join(DATA)}")
    return DATA[kind](section, cfg.seed)

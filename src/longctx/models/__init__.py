"""Models and the registry that maps a config's ``arch`` to the code that builds it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from longctx.models.bert import Bert, BertConfig
from longctx.models.gpt2 import GPT2, GPT2Config


def _build_gpt2(cfg: Mapping[str, Any]) -> nn.Module:
    fields = {f.name for f in dataclasses.fields(GPT2Config)}
    return GPT2(GPT2Config(**{k: v for k, v in cfg.items() if k in fields}))


def _build_bert(cfg: Mapping[str, Any]) -> nn.Module:
    fields = {f.name for f in dataclasses.fields(BertConfig)}
    return Bert(BertConfig(**{k: v for k, v in cfg.items() if k in fields}))


MODELS: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {"gpt2": _build_gpt2, "bert": _build_bert}


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the model named by ``cfg['arch']`` from a model config section."""
    arch = cfg["arch"]
    if arch not in MODELS:
        raise ValueError(f"model.arch='{arch}' is unknown; choose from: {', '.join(MODELS)}")
    return MODELS[arch](cfg)

"""Start a run from another run's weights: ``task.init_from`` (a checkpoint) and, for images seen as
pixel sequences, ``task.position_grid_upscale`` (the Path-X / Path-256 recipe of the FlashAttention
paper: train on Path-64, duplicate the position embeddings gridwise, fine-tune on 128 or 256).

Only the weights move; the optimiser, schedule and step start afresh. Every parameter of the new
task must come from the checkpoint with its shape (after the upscaling), so a changed model or a
missing head is an error rather than a silently half-initialised model.

``task.init_from`` may also be a Hugging Face BERT / RoBERTa directory (``config.json`` beside the
weights): its encoder weights, the position table repeated up to ``model.max_positions`` (as
Longformer extended RoBERTa's), initialise the task's encoder (same sizes required); the task's
head keeps its initialisation.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from longctx.models.hf import bert_from_hf

POSITION_KEYS = ("encoder.wpe.weight",)  # learned position tables in a task's state dict


def upscale_position_grid(table: Tensor, factor: int) -> Tensor:
    """A position table of a row-major side x side grid (side^2, d) -> (side^2 factor^2, d) for the
    grid of side x factor: the new position (r, c) takes the row of old position (r // factor,
    c // factor), i.e. every old position is repeated over a factor x factor block."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"task.position_grid_upscale must be a positive integer, got {factor!r}")
    n, d = table.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"a position grid needs a square number of positions, got {n}")
    grid = table.reshape(side, side, d)
    return grid.repeat_interleave(factor, dim=0).repeat_interleave(factor, dim=1).reshape(-1, d)


def _encoder_from_hf(task: nn.Module, path: Path) -> None:
    """Copy the encoder of a Hugging Face BERT/RoBERTa directory into ``task.encoder`` (a Bert).

    RoBERTa counts positions over real tokens only; on the right-padded batches of longctx's data
    modules that equals BERT's numbering, so the task's encoder keeps its own setting."""
    encoder = getattr(task, "encoder", None)
    if encoder is None or not hasattr(encoder.config, "type_vocab_size"):
        raise ValueError(f"task.init_from={path} is a Hugging Face directory; only a BERT encoder takes one")
    ours = encoder.config
    loaded = bert_from_hf(path, max_positions=ours.max_positions, position_mode="repeat")
    fields = ("vocab_size", "n_layer", "n_head", "n_embd", "intermediate_size", "type_vocab_size",
              "norm_position")  # HF BERT/RoBERTa are post-LN: their weights do not fit a pre-LN encoder
    for field in fields:
        theirs = getattr(loaded.config, field)
        if theirs != getattr(ours, field):
            raise ValueError(f"task.init_from={path} has {field}={theirs} but model.{field}="
                             f"{getattr(ours, field)}; pick the matching model config")
    encoder.load_state_dict(loaded.state_dict())


def warm_start(task: nn.Module, ckpt: str | Path, position_grid_upscale: int = 1) -> None:
    """Load ``task``'s parameters from a longctx checkpoint's state dict, the learned position
    tables upscaled gridwise by ``position_grid_upscale`` (1: as they are), or its encoder from a
    Hugging Face directory."""
    path = Path(ckpt)
    if path.is_dir() and (path / "config.json").is_file():
        _encoder_from_hf(task, path)
        return
    if not path.is_file():
        raise ValueError(f"task.init_from: no such checkpoint file: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for key in POSITION_KEYS:
        if key in state and position_grid_upscale != 1:
            state[key] = upscale_position_grid(state[key], position_grid_upscale)
    own = task.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ValueError(f"task.init_from={path} has no {shown} (a head built at setup: set task.num_labels)")
    for key, value in own.items():
        if state[key].shape != value.shape:
            raise ValueError(f"task.init_from={path}: {key} has shape {tuple(state[key].shape)}, the model "
                             f"{tuple(value.shape)} (position_grid_upscale={position_grid_upscale})")
    task.load_state_dict({k: state[k] for k in own})

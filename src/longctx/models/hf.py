"""Weights in and out of Hugging Face transformers checkpoints (local directories, or hub names).

Import reads ``config.json`` and the weights (``*.safetensors`` or ``pytorch_model*.bin``) of a
directory written by ``save_pretrained`` (a name that is not a local directory is fetched from the
hub by huggingface_hub, or read from its cache): GPT2LMHeadModel / GPT2Model into ``GPT2``, and
BertModel / BertForMaskedLM / BertForSequenceClassification and their RoBERTa counterparts into
``Bert``; a sequence classifier's last layer loads into a ``ClassificationHead``
(:func:`classification_head_from_hf`). Export writes a directory that transformers loads as
GPT2LMHeadModel or Bert/RobertaForMaskedLM. Import needs only ``safetensors``; export needs
transformers (the ``hf`` extra) for its config classes.

Position tables can be made longer than the checkpoint's: ``"repeat"`` copies the learned table
over and over (Longformer's choice for long documents), ``"interpolate"`` resamples it linearly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from longctx.models.bert import Bert, BertConfig
from longctx.models.gpt2 import GPT2, GPT2Config
from longctx.models.heads import ClassificationHead

POSITION_MODES = ("repeat", "interpolate")


def extend_positions(weight: Tensor, n: int, mode: str = "repeat") -> Tensor:
    """A position table (L, E) -> (n, E), n >= L.

    repeat: row j is weight[j % L]. interpolate: row j is the linear interpolation of the table at
    the fractional position j * (L - 1) / (n - 1), so the first and last rows are kept.
    """
    if mode not in POSITION_MODES:
        raise ValueError(f"position mode must be one of {list(POSITION_MODES)}, got {mode!r}")
    length = weight.shape[0]
    if n < length:
        raise ValueError(f"cannot extend {length} positions to fewer ({n})")
    if n == length:
        return weight.clone()
    if mode == "repeat":
        return weight[torch.arange(n, device=weight.device) % length].clone()
    resampled = F.interpolate(weight.T[None].double(), size=n, mode="linear", align_corners=True)
    return resampled[0].T.to(weight.dtype).contiguous()


def _hub_snapshot(name: str) -> Path:
    """The local snapshot of hub model ``name`` (config.json and its weights, safetensors when the
    repository has them, else the .bin files), downloaded by huggingface_hub or read from its cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise FileNotFoundError(f"{name} is not a local directory, and loading hub names needs "
                                "huggingface_hub (pip install -e '.[hf]')") from err
    try:
        for weights in (["*.safetensors", "*.safetensors.index.json"], ["pytorch_model*.bin*"]):
            path = Path(snapshot_download(repo_id=name, allow_patterns=["config.json", *weights]))
            if any(path.glob(weights[0])):
                return path
    except Exception as err:  # offline, unknown repo, bad id: one message naming the input
        reason = (str(err).splitlines() or [""])[0]
        raise FileNotFoundError(f"{name} is not a local directory and the hub could not provide it: "
                                f"{type(err).__name__}: {reason}") from err
    return path  # no weights: load_hf_dir says so


def load_hf_dir(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(config.json as a dict, the state dict) of a save_pretrained directory (possibly sharded),
    or of a hub model name (e.g. "google-bert/bert-base-uncased") when no such directory exists."""
    path = Path(path) if Path(path).is_dir() else _hub_snapshot(str(path))
    config = json.loads((path / "config.json").read_text())
    state: dict[str, Tensor] = {}
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        from safetensors.torch import load_file

        for shard in shards:
            state.update(load_file(shard))
    else:
        shards = sorted(path.glob("pytorch_model*.bin"))
        if not shards:
            raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
        for shard in shards:
            state.update(torch.load(shard, map_location="cpu", weights_only=True))
    return config, state


def _strip_prefix(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """Keys without the first matching model prefix ('transformer.', 'bert.', ...); old TF-era
    LayerNorm names gamma/beta become weight/bias."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = value
    return out


def _positions(table: Tensor, max_positions: int | None, mode: str) -> Tensor:
    return table if max_positions is None else extend_positions(table, max_positions, mode)


# longctx GPT2 block names -> transformers' (Conv1D weights are stored (in, out), transposed).
_GPT2_LAYER = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
               "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


def gpt2_from_hf(path: str | Path, *, max_positions: int | None = None, position_mode: str = "repeat",
                 attn: str = "auto") -> GPT2:
    """A GPT2 with the weights of a GPT2LMHeadModel / GPT2Model directory.

    Conv1D weights are (in, out), so they are transposed into nn.Linear's (out, in); the token
    embedding is zero-padded to GPT2Config.padded_vocab_size rows (never predicted).
    """
    hf, sd = load_hf_dir(path)
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]) or hf.get("activation_function") != "gelu_new":
        raise ValueError("longctx GPT2 needs n_inner = 4 * n_embd and activation_function='gelu_new'")
    sd = _strip_prefix(sd, ("transformer.",))
    wpe = _positions(sd["wpe.weight"], max_positions, position_mode)
    config = GPT2Config(vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                        n_embd=hf["n_embd"], max_positions=wpe.shape[0], dropout=0.0, bias=True, attn=attn)
    model = GPT2(config)
    wte = torch.zeros(config.padded_vocab_size, config.n_embd, dtype=sd["wte.weight"].dtype)
    wte[: config.vocab_size] = sd["wte.weight"]
    new = {"wte.weight": wte, "wpe.weight": wpe,
           "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"]}
    for i in range(config.n_layer):
        for ours, theirs in _GPT2_LAYER.items():
            weight = sd[f"h.{i}.{theirs}.weight"]
            new[f"blocks.{i}.{ours}.weight"] = weight if ours.startswith("ln") else weight.T.contiguous()
            new[f"blocks.{i}.{ours}.bias"] = sd[f"h.{i}.{theirs}.bias"]
    model.load_state_dict(new)
    return model


def gpt2_to_hf(model: GPT2, path: str | Path) -> None:
    """Write ``model`` as a GPT2LMHeadModel directory (config.json + model.safetensors)."""
    import transformers
    from safetensors.torch import save_file

    c = model.config
    if not c.bias:
        raise ValueError("transformers' GPT-2 has biases; cannot export a bias=False model")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": sd["wte.weight"][: c.vocab_size],
           "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["ln_f.weight"], "transformer.ln_f.bias": sd["ln_f.bias"]}
    for i in range(c.n_layer):
        for ours, theirs in _GPT2_LAYER.items():
            weight = sd[f"blocks.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = weight if ours.startswith("ln") else weight.T
            out[f"transformer.h.{i}.{theirs}.bias"] = sd[f"blocks.{i}.{ours}.bias"]
    out["lm_head.weight"] = out["transformer.wte.weight"]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in out.items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_positions, n_embd=c.n_embd,
                            n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                            tie_word_embeddings=True).save_pretrained(path)


# BERT and RoBERTa share their layer names; only the prefixes and the MLM head's names differ.
_BERT_LAYER = {"attn.qkv": None, "attn.proj": "attention.output.dense", "ln_1": "attention.output.LayerNorm",
               "fc": "intermediate.dense", "proj": "output.dense", "ln_2": "output.LayerNorm"}
_BERT_TOP = {"wte": "embeddings.word_embeddings", "wpe": "embeddings.position_embeddings",
             "wtt": "embeddings.token_type_embeddings", "ln_emb": "embeddings.LayerNorm",
             "pooler": "pooler.dense"}
_MLM_HEAD = {
    "bert": {"mlm_dense": "cls.predictions.transform.dense", "mlm_ln": "cls.predictions.transform.LayerNorm",
             "mlm_bias": "cls.predictions.bias"},
    "roberta": {"mlm_dense": "lm_head.dense", "mlm_ln": "lm_head.layer_norm", "mlm_bias": "lm_head.bias"},
}


def bert_from_hf(path: str | Path, *, max_positions: int | None = None, position_mode: str = "repeat",
                 attn: str = "auto") -> Bert:
    """A Bert with the weights of a BERT or RoBERTa directory (base model, MLM or classifier).

    The separate query/key/value projections are concatenated into SelfAttention's fused qkv.
    RoBERTa numbers positions from padding_idx + 1 and counts only real tokens, so its table's
    first padding_idx + 1 rows (never used by real tokens) are dropped and the model gets
    ``positions_skip_padding=True``: left- and right-padded batches match transformers given an
    attention_mask that is 0 exactly at the pad tokens. RobertaForSequenceClassification's
    ``classifier.dense`` (tanh on the first token) is the same function as BERT's pooler and
    loads into ``pooler``. Heads absent from the checkpoint (pooler in *ForMaskedLM, MLM head in
    BertModel) keep their initialisation. The model is post-LayerNorm (``norm_position="post"``),
    as BERT and RoBERTa are.
    """
    hf, sd = load_hf_dir(path)
    kind = hf.get("model_type", "bert")
    if kind not in _MLM_HEAD:
        raise ValueError(f"model_type must be 'bert' or 'roberta', got {kind!r}")
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("longctx Bert needs hidden_act='gelu' and absolute position embeddings")
    sd = _strip_prefix(sd, (f"{kind}.",))
    wpe = sd["embeddings.position_embeddings.weight"]
    if kind == "roberta":
        wpe = wpe[hf["pad_token_id"] + 1:]
    wpe = _positions(wpe, max_positions, position_mode)
    config = BertConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                        n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                        intermediate_size=hf["intermediate_size"], max_positions=wpe.shape[0],
                        type_vocab_size=hf["type_vocab_size"], dropout=0.0,
                        layer_norm_eps=hf["layer_norm_eps"], attn=attn,
                        positions_skip_padding=kind == "roberta")
    model = Bert(config)
    new: dict[str, Tensor] = {"wpe.weight": wpe}
    if kind == "roberta" and "classifier.dense.weight" in sd:
        new.update({f"pooler.{p}": sd[f"classifier.dense.{p}"] for p in ("weight", "bias")})
    for ours, theirs in _BERT_TOP.items():
        for p in ("weight", "bias"):
            if f"{theirs}.{p}" in sd and ours != "wpe":
                new[f"{ours}.{p}"] = sd[f"{theirs}.{p}"]
    for ours, theirs in _MLM_HEAD[kind].items():
        if ours == "mlm_bias":
            if theirs in sd:
                new["mlm_bias"] = sd[theirs]
            continue
        for p in ("weight", "bias"):
            if f"{theirs}.{p}" in sd:
                new[f"{ours}.{p}"] = sd[f"{theirs}.{p}"]
    for i in range(config.n_layer):
        layer = f"encoder.layer.{i}"
        for p in ("weight", "bias"):
            new[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(
                [sd[f"{layer}.attention.self.{n}.{p}"] for n in ("query", "key", "value")])
            for ours, theirs in _BERT_LAYER.items():
                if theirs is not None:
                    new[f"blocks.{i}.{ours}.{p}"] = sd[f"{layer}.{theirs}.{p}"]
    missing, unexpected = model.load_state_dict(new, strict=False)
    allowed = {"pooler.weight", "pooler.bias", "mlm_dense.weight", "mlm_dense.bias", "mlm_ln.weight",
               "mlm_ln.bias", "mlm_bias"}
    if set(missing) - allowed or unexpected:
        raise ValueError(f"checkpoint does not match Bert: missing {missing}, unexpected {unexpected}")
    return model


# The last layer of each sequence classifier, as (weight, bias) names in the checkpoint.
_CLASSIFIER = {"bert": "classifier", "roberta": "classifier.out_proj"}


def classification_head_from_hf(path: str | Path, *, pooling: str = "cls",
                                dropout: float | None = None) -> ClassificationHead:
    """The ClassificationHead of a Bert/RobertaForSequenceClassification directory.

    With ``pooling="cls"`` and the encoder's pooled vector (``Bert.pool``, which
    :func:`bert_from_hf` loads from the same directory), ``head(hidden, mask, bert.pool(hidden))``
    equals transformers' logits in eval mode. num_labels is the checkpoint's; multi_label follows
    its ``problem_type``. ``dropout`` defaults to the checkpoint's classifier_dropout, else
    hidden_dropout_prob (RoBERTa's head also drops out before its dense layer; this head does not).
    """
    hf, sd = load_hf_dir(path)
    kind = hf.get("model_type", "bert")
    if kind not in _CLASSIFIER:
        raise ValueError(f"model_type must be 'bert' or 'roberta', got {kind!r}")
    name = _CLASSIFIER[kind]
    if f"{name}.weight" not in sd:
        raise ValueError(f"{path} holds no sequence classifier ({name}.weight); save a "
                         f"{'Bert' if kind == 'bert' else 'Roberta'}ForSequenceClassification")
    weight = sd[f"{name}.weight"]
    if dropout is None:
        dropout = hf.get("classifier_dropout")
        dropout = hf.get("hidden_dropout_prob", 0.1) if dropout is None else dropout
    head = ClassificationHead(weight.shape[1], weight.shape[0], pooling, dropout,
                              multi_label=hf.get("problem_type") == "multi_label_classification")
    head.classifier.load_state_dict({"weight": weight, "bias": sd[f"{name}.bias"]})
    return head


def bert_to_hf(model: Bert, path: str | Path, *, model_type: str = "bert", pad_token_id: int = 1) -> None:
    """Write ``model`` as a BertForMaskedLM (or, with model_type="roberta", RobertaForMaskedLM)
    directory, pooler included (BertModel / RobertaModel load it).

    For RoBERTa the position table gets pad_token_id + 1 leading zero rows, the offset that
    ``bert_from_hf`` drops, so export then import round-trips exactly. RoBERTa counts positions
    over real tokens only, so model_type="roberta" needs ``positions_skip_padding=True`` and
    "bert" needs False; a mismatch would change left-padded outputs and is refused, as is a
    pre-LayerNorm model (``norm_position="pre"``), which HF's post-LN layers cannot express.
    """
    import transformers
    from safetensors.torch import save_file

    if model_type not in _MLM_HEAD:
        raise ValueError(f"model_type must be 'bert' or 'roberta', got {model_type!r}")
    c = model.config
    if c.norm_position != "post":
        raise ValueError(f"Hugging Face BERT/RoBERTa are post-LayerNorm; a model with "
                         f"norm_position={c.norm_position!r} cannot be exported (allowed: 'post')")
    if c.positions_skip_padding != (model_type == "roberta"):
        raise ValueError(f"model_type={model_type!r} numbers positions "
                         f"{'over real tokens only' if model_type == 'roberta' else 'by index in the row'}"
                         f" but the model has positions_skip_padding={c.positions_skip_padding}")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    offset = pad_token_id + 1 if model_type == "roberta" else 0
    sd["wpe.weight"] = torch.cat([sd["wpe.weight"].new_zeros(offset, c.n_embd), sd["wpe.weight"]])
    out: dict[str, Tensor] = {}
    for ours, theirs in _BERT_TOP.items():
        for p in ("weight", "bias"):
            if f"{ours}.{p}" in sd:
                out[f"{model_type}.{theirs}.{p}"] = sd[f"{ours}.{p}"]
    for ours, theirs in _MLM_HEAD[model_type].items():
        if ours == "mlm_bias":
            out[theirs] = sd["mlm_bias"]
            decoder = theirs.rsplit(".", 1)[0] + ".decoder"  # cls.predictions.decoder, lm_head.decoder
        else:
            for p in ("weight", "bias"):
                out[f"{theirs}.{p}"] = sd[f"{ours}.{p}"]
    out[f"{decoder}.weight"] = sd["wte.weight"]
    out[f"{decoder}.bias"] = sd["mlm_bias"]
    for i in range(c.n_layer):
        layer = f"{model_type}.encoder.layer.{i}"
        for p in ("weight", "bias"):
            for n, part in zip(("query", "key", "value"), sd[f"blocks.{i}.attn.qkv.{p}"].chunk(3)):
                out[f"{layer}.attention.self.{n}.{p}"] = part
            for ours, theirs in _BERT_LAYER.items():
                if theirs is not None:
                    out[f"{layer}.{theirs}.{p}"] = sd[f"blocks.{i}.{ours}.{p}"]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in out.items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    config_class = transformers.RobertaConfig if model_type == "roberta" else transformers.BertConfig
    extra = {"pad_token_id": pad_token_id} if model_type == "roberta" else {}
    config_class(vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                 num_attention_heads=c.n_head, intermediate_size=c.intermediate_size,
                 max_position_embeddings=c.max_positions + offset, type_vocab_size=c.type_vocab_size,
                 layer_norm_eps=c.layer_norm_eps, hidden_act="gelu", tie_word_embeddings=True,
                 **extra).save_pretrained(path)

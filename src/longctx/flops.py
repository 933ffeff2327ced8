"""Model FLOPs of a training step and the GPU peaks that turn them into MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = the FLOPs the model needs per second at the
measured tokens/s, divided by the hardware's dense bf16 peak. "Needs" counts the matmuls of the
forward (2 FLOPs per multiply-add) and twice that for the backward, so it does not credit
recomputation (activation checkpointing, FlashAttention's backward) or the masked half of causal
attention: every implementation of the same model at the same tokens/s gets the same MFU.

Per token and layer the forward runs the QKV, output, and two MLP projections (2 * (3d² + d² +
2 * d * ffn) FLOPs, 24d² for GPT-2's ffn = 4d) and attention's two S x d products against the
sequence (QK^T and PV: 4 * S * d, half of it when causal); the LM head adds 2 * d * vocab.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched in order
# against torch.cuda.get_device_name(); the first substring that occurs wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM (name "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named like torch.cuda.get_device_name(), None if unknown
    (then pass trainer.peak_tflops to get an MFU)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def training_flops_per_token(n_layer: int, n_embd: int, seqlen: int, *, ffn: int | None = None,
                             head_vocab: int = 0, causal: bool = True) -> float:
    """Forward + backward model FLOPs per token of a transformer (see the module docstring).

    ffn: the MLP's hidden width (default 4 * n_embd); head_vocab: rows of the output projection
    applied to every token (0 for none); causal: count half of attention's score and value products.
    """
    ffn = 4 * n_embd if ffn is None else ffn
    dense = 2 * (4 * n_embd * n_embd + 2 * n_embd * ffn)
    attention = 4 * seqlen * n_embd * (0.5 if causal else 1.0)
    forward = n_layer * (dense + attention) + 2 * n_embd * head_vocab
    return 3.0 * forward


def model_flops_per_token(module: nn.Module, seqlen: int) -> float | None:
    """Training FLOPs per token at ``seqlen`` of the longctx model in ``module`` (a task or the
    model): GPT-2 with its tied LM head over the padded vocabulary it multiplies by; BERT's encoder
    (its MLM head runs on the masked tokens only and is left out). None for other models."""
    from longctx.models.bert import Bert
    from longctx.models.gpt2 import GPT2

    model = next((m for m in module.modules() if isinstance(m, (GPT2, Bert))), None)
    if model is None:
        return None
    cfg: Any = model.config
    if isinstance(model, GPT2):
        return training_flops_per_token(cfg.n_layer, cfg.n_embd, seqlen, head_vocab=cfg.padded_vocab_size)
    return training_flops_per_token(cfg.n_layer, cfg.n_embd, seqlen, ffn=cfg.intermediate_size, causal=False)

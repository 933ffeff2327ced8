"""Model FLOPs (longctx.flops) against torch's own FLOP counter, the peak table, and the Throughput
callback's rates through a real Lightning fit on CPU."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from longctx.callbacks import Throughput
from longctx.flops import model_flops_per_token, peak_tflops, training_flops_per_token
from longctx.models.bert import Bert, BertConfig
from longctx.models.gpt2 import GPT2, GPT2Config


def _counted(model: torch.nn.Module, run) -> tuple[float, float]:
    """(all matmul FLOPs, FLOPs of the batched matmuls = attention's QK^T and PV) of one forward +
    backward, as torch's FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        run().backward()
    by_op = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in by_op.items() if "bmm" in str(op))
    return float(counter.get_total_flops()), float(attention)


def test_gpt2_flops_match_torch_flop_counter() -> None:
    """Standard attention computes the full S x S products, so the counter sees the non-causal
    count; the causal count is the same with half of attention's products."""
    cfg = GPT2Config(vocab_size=1000, n_layer=2, n_head=4, n_embd=64, max_positions=128, attn="standard")
    model = GPT2(cfg)
    batch, seqlen = 2, 128
    x = torch.randint(0, cfg.vocab_size, (batch, seqlen))
    total, attention = _counted(model, lambda: model.loss(x, x))
    tokens = batch * seqlen
    assert attention > 0
    full = training_flops_per_token(cfg.n_layer, cfg.n_embd, seqlen, head_vocab=cfg.padded_vocab_size,
                                    causal=False)
    assert full * tokens == pytest.approx(total, rel=0.01)
    assert model_flops_per_token(model, seqlen) * tokens == pytest.approx(total - attention / 2, rel=0.01)


def test_bert_encoder_flops_match_torch_flop_counter() -> None:
    cfg = BertConfig(vocab_size=500, n_layer=2, n_head=2, n_embd=32, intermediate_size=80, max_positions=64,
                     attn="standard", dropout=0.0)
    model = Bert(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 64))
    total, _ = _counted(model, lambda: model(x).float().sum())  # the encoder's hidden states
    assert model_flops_per_token(model, 64) * x.numel() == pytest.approx(total, rel=0.01)


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None),
])
def test_peak_lookup_by_device_name(name: str, peak: float | None) -> None:
    assert peak_tflops(name) == peak


class _TinyLM(L.LightningModule):
    """A tiny GPT-2 that validates slowly: validation time must not count against throughput."""

    def __init__(self) -> None:
        super().__init__()
        self.model = GPT2(GPT2Config(vocab_size=256, n_layer=1, n_head=2, n_embd=32, max_positions=32))
        self.batch_times: list[float] = []

    def training_step(self, batch, batch_idx):
        return self.model.loss(*batch)

    def validation_step(self, batch, batch_idx):
        time.sleep(0.3)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _BatchClock(L.Callback):
    """Independent clock: the wall time of each training batch, start to end."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        module.batch_times.append(time.perf_counter() - self._t)


class _Logged(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        if "train/tokens_per_s" in metrics and trainer.global_step % 4 == 0:
            self.rows.append({k: float(v) for k, v in metrics.items()})


def test_throughput_logs_rates_without_validation_time(tmp_path) -> None:
    torch.manual_seed(0)
    data = torch.randint(0, 256, (64, 33))
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=4)
    module, logged = _TinyLM(), _Logged()
    trainer = L.Trainer(accelerator="cpu", max_steps=12, log_every_n_steps=4, val_check_interval=2,
                        limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[Throughput(peak_tflops=0.5), _BatchClock(), logged])
    trainer.fit(module, loader, loader)
    row = logged.rows[-1]
    # Tokens of the last window (4 steps of 4 x 32) over its batches' own wall time: validation slept
    # 0.6 s in that window, which would cut the rate several-fold if it were counted.
    expected = 4 * 4 * 32 / sum(module.batch_times[-4:])
    assert row["train/tokens_per_s"] == pytest.approx(expected, rel=0.5)
    flops = model_flops_per_token(module.model, 32)
    assert row["train/tflops_per_device"] == pytest.approx(row["train/tokens_per_s"] * flops / 1e12, rel=1e-4)
    assert row["train/mfu"] == pytest.approx(row["train/tflops_per_device"] / 0.5, rel=1e-4)


def test_metrics_log_drops_a_line_cut_off_by_a_kill(tmp_path) -> None:
    """A run killed mid-write leaves an unterminated line; the resumed run's MetricsLog removes it
    before appending, so every line of metrics.jsonl parses."""
    import json
    from types import SimpleNamespace

    from longctx.callbacks import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "train/loss": 2.5}\n{"step": 20, "trai')
    log = MetricsLog(path)
    log.setup(SimpleNamespace(global_rank=0), None, "fit")
    metrics = {"train/loss": torch.tensor(2.0)}
    trainer = SimpleNamespace(global_rank=0, global_step=20, callback_metrics=metrics)
    log._write(trainer, "train/")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 10, "train/loss": 2.5}, {"step": 20, "train/loss": 2.0}]
    log.setup(SimpleNamespace(global_rank=0), None, "fit")  # a complete file is left as it is
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows

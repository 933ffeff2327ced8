"""Fixtures of the GPU kernel tests (test_flash_gpu, test_flash_bwd_gpu, test_blocksparse_gpu)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=["default", "stage1"])
def kernel_path(request, monkeypatch):
    """On Hopper, head dims 64 / 128 without dropout run the wgmma kernels (kernels/*_sm90.cuh) by
    default; "stage1" reruns those cases on the mma.sync kernels (LONGCTX_SM90=0, read by the binding
    at every call) so that both paths stay tested there. GPU test modules use it for every test."""
    if request.param == "stage1":
        callspec = getattr(request.node, "callspec", None)
        head_dim = callspec.params.get("head_dim", 64) if callspec else 64
        if torch.cuda.get_device_capability() != (9, 0) or head_dim not in (64, 128):
            pytest.skip("the same kernel as the default path here")
        if "dropout" in request.node.name:
            pytest.skip("dropout always runs the stage-1 kernels")
        monkeypatch.setenv("LONGCTX_SM90", "0")
    return request.param

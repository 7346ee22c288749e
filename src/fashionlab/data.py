"""Verified Fashion-MNIST (and any IDX-format dataset): sources, checksums, parsing, cache, splits.

Every file is checked against the SHA-256 of its decompressed bytes before use, so the
official `.gz` files and Debian's recompressed copies both verify, and a decompressed
cache can be trusted without the original archive.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_bytes
from .errors import UserError

SPLITS = ("train", "test")
KINDS = ("images", "labels")
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # ubyte, 3 dims / 1 dim


class DataError(UserError):
    """A dataset file is missing, corrupt or inconsistent; the message names the file."""


@dataclass(frozen=True)
class IdxFile:
    name: str  # decompressed file name, e.g. "train-images-idx3-ubyte"
    sha256: str | None  # of the decompressed bytes; None for a custom dataset
    gz_md5: str | None = None  # of the official .gz (download check only)


@dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to find, fetch and verify one IDX dataset: data, not code."""

    name: str
    class_names: tuple[str, ...]
    files: dict[tuple[str, str], IdxFile]  # (split, kind) -> file
    url: str | None = None  # base address of the .gz files
    system_dirs: tuple[str, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)  # expected images per split

    def file(self, split: str, kind: str) -> IdxFile:
        return self.files[(split, kind)]

    @property
    def sha256_known(self) -> bool:
        return all(f.sha256 for f in self.files.values())


FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    class_names=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    files={
        ("train", "images"): IdxFile(
            "train-images-idx3-ubyte",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        ),
        ("train", "labels"): IdxFile(
            "train-labels-idx1-ubyte",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "25c81989df183df01b3e8a0aad5dffbe",
        ),
        ("test", "images"): IdxFile(
            "t10k-images-idx3-ubyte",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "bef4ecab320f06d8554ea6380940ec79",
        ),
        ("test", "labels"): IdxFile(
            "t10k-labels-idx1-ubyte",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            "bb300cfdad3c16e7a12a480ee83cd310",
        ),
    },
    url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    counts={"train": 60000, "test": 10000},
)

DATASETS: dict[str, DatasetSpec] = {FASHION_MNIST.name: FASHION_MNIST}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}") from None


def custom_spec(class_names: list[str] | tuple[str, ...], like: DatasetSpec = FASHION_MNIST) -> DatasetSpec:
    """A dataset in the same four-file IDX layout but with no reference checksums."""
    if len(class_names) < 2:
        raise DataError(f"--class-names needs at least 2 names, got {list(class_names)!r}")
    files = {key: IdxFile(f.name, None) for key, f in like.files.items()}
    return DatasetSpec(name="custom", class_names=tuple(class_names), files=files)


def spec_for(dataset: str = "fashion-mnist", class_names: list[str] | tuple[str, ...] | None = None) -> DatasetSpec:
    """The spec a run or command means: a custom IDX dataset when it names its classes, else a known one."""
    return custom_spec(class_names) if class_names else get_spec(dataset)


# --------------------------------------------------------------------------- settings

def offline_from_env() -> bool:
    return os.environ.get("FASHIONLAB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def cache_dir(spec: DatasetSpec) -> Path:
    root = os.environ.get("FASHIONLAB_CACHE")
    if root:
        return Path(root) / spec.name
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "fashionlab" / spec.name


def download_url(spec: DatasetSpec) -> str | None:
    return os.environ.get("FASHIONLAB_DATA_URL") or spec.url


# --------------------------------------------------------------------------- parsing

def parse_idx(raw: bytes | bytearray, kind: str, path: str) -> np.ndarray:
    """Parse an IDX buffer of unsigned bytes: images -> (N, H, W) uint8, labels -> (N,) uint8."""
    if len(raw) < 8:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header (at least 8 expected)")
    magic = int.from_bytes(raw[:4], "big")
    expected = IDX_MAGIC[kind]
    if magic != expected:
        raise DataError(
            f"{path}: wrong IDX magic number 0x{magic:08x}; expected 0x{expected:08x} for an IDX {kind} file"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims)) if dims else 0
    if len(raw) != header + size:
        raise DataError(
            f"{path}: IDX header says shape {tuple(dims)} ({header + size} bytes) but the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX (the inverse of parse_idx)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx_folder(folder: str | os.PathLike, ds: "Dataset", spec: DatasetSpec = FASHION_MNIST,
                     gz: bool = False) -> Path:
    """Write a dataset as the four IDX files of spec's layout (e.g. to use a subset with --data-dir)."""
    folder = Path(folder)
    arrays = {("train", "images"): ds.train_images, ("train", "labels"): ds.train_labels,
              ("test", "images"): ds.test_images, ("test", "labels"): ds.test_labels}
    for key, f in spec.files.items():
        raw = idx_bytes(arrays[key])
        write_bytes(folder / (f.name + (".gz" if gz else "")), gzip.compress(raw, mtime=0) if gz else raw)
    return folder


def gunzip(body: bytes, name: str) -> bytes:
    """Decompress one gzip member, telling a truncated file from a corrupt one."""
    try:
        # zlib with wbits=31 decodes gzip and is faster than gzip.decompress.
        d = zlib.decompressobj(31)
        out = d.decompress(body)
    except zlib.error as e:
        raise DataError(f"{name}: not a valid gzip file ({e}); delete it and fetch it again") from None
    if not d.eof:
        raise DataError(f"{name}: truncated gzip file (the compressed stream ends early); delete it and fetch it again")
    return out


def read_maybe_gz(path: Path) -> bytearray:
    """The file's decompressed bytes, in a writable buffer (arrays made from it are writable too)."""
    buf = bytearray(path.stat().st_size)
    with open(path, "rb") as fh:
        fh.readinto(buf)
    return bytearray(gunzip(bytes(buf), str(path))) if path.suffix == ".gz" else buf


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(data: bytes | bytearray, f: IdxFile, path: Path) -> None:
    if f.sha256 is None:
        return
    actual = sha256(data)
    if actual != f.sha256:
        raise DataError(
            f"{path}: checksum mismatch: SHA-256 of the decompressed bytes is {actual}, expected {f.sha256}. "
            "The file is corrupt or not the file it claims to be; delete it and fetch it again."
        )


# --------------------------------------------------------------------------- sources

@dataclass
class Dataset:
    train_images: np.ndarray  # (60000, 28, 28) uint8
    train_labels: np.ndarray  # (60000,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    source: str  # folder or address the data came from
    verification: str  # what was checked
    name: str = "fashion-mnist"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _locate(folder: Path, f: IdxFile) -> Path | None:
    """A dataset file in a folder, decompressed or gzipped (decompressed preferred: faster)."""
    for candidate in (folder / f.name, folder / (f.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _complete(folder: Path, spec: DatasetSpec) -> dict[tuple[str, str], Path] | None:
    found = {key: _locate(folder, f) for key, f in spec.files.items()}
    return found if all(found.values()) else None  # type: ignore[return-value]


def candidate_dirs(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """The places looked in, in order, each with the reason it is on the list."""
    places: list[tuple[str, Path]] = []
    if data_dir is not None:
        places.append(("--data-dir", Path(data_dir)))
    env = os.environ.get("FASHIONLAB_DATA")
    if env:
        places.append(("$FASHIONLAB_DATA", Path(env)))
    places.append(("user cache", cache_dir(spec)))
    places.extend(("system package", Path(d)) for d in spec.system_dirs)
    return places


def _fetch(url: str, timeout: float = 60.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (address is configuration)
            expected_len = resp.headers.get("Content-Length")
            body = resp.read()
    except http.client.IncompleteRead as e:
        raise DataError(f"download of {url} was cut short: {len(e.partial)} bytes received, "
                        f"{e.expected} more expected") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DataError(f"download of {url} failed: {e}") from None
    if expected_len is not None and len(body) != int(expected_len):
        raise DataError(f"download of {url} was cut short: {len(body)} of {expected_len} bytes")
    return body


def download(spec: DatasetSpec, dest: Path, base_url: str | None = None, progress=None) -> None:
    """Fetch the four .gz files into dest, checking md5 of the archive and SHA-256 of its contents.

    Each file is written to a temporary name and renamed only once verified, so an interrupted
    or corrupt download never leaves a file that a later load could pick up.
    """
    base = base_url or download_url(spec)
    if not base:
        raise DataError(f"dataset {spec.name!r} has no download address")
    for f in spec.files.values():
        target = dest / (f.name + ".gz")
        if target.exists() or (dest / f.name).exists():
            continue
        url = base.rstrip("/") + "/" + f.name + ".gz"
        if progress:
            progress(f"downloading {url}")
        body = _fetch(url)
        if f.gz_md5 is not None:
            md5 = hashlib.md5(body).hexdigest()  # noqa: S324 (the published checksum is md5)
            if md5 != f.gz_md5:
                raise DataError(f"{url}: md5 of the download is {md5}, expected {f.gz_md5}; nothing was written")
        raw = gunzip(body, url)
        verify(raw, f, Path(url))
        write_bytes(target, body)


def _load_folder(folder: Path, spec: DatasetSpec, paths: dict[tuple[str, str], Path], cache: Path | None):
    arrays: dict[tuple[str, str], np.ndarray] = {}
    for key, path in paths.items():
        f = spec.files[key]
        raw = read_maybe_gz(path)
        verify(raw, f, path)
        arrays[key] = parse_idx(raw, key[1], str(path))
        # Keep a decompressed, verified copy so the next load skips gzip (warm load).
        if cache is not None and path.suffix == ".gz" and f.sha256 is not None:
            try:
                write_bytes(cache / f.name, raw)
            except OSError:
                pass  # a read-only cache only costs speed
    for split in SPLITS:
        images, labels = arrays[(split, "images")], arrays[(split, "labels")]
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{paths[(split, 'images')]} has {images.shape[0]} images but "
                f"{paths[(split, 'labels')]} has {labels.shape[0]} labels; they must match"
            )
        if labels.size and int(labels.max()) >= len(spec.class_names):
            raise DataError(
                f"{paths[(split, 'labels')]}: label {int(labels.max())} is out of range for "
                f"{len(spec.class_names)} class names"
            )
    return arrays


def load(
    spec: DatasetSpec | str = FASHION_MNIST,
    data_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress=None,
) -> Dataset:
    """Find, verify and parse the dataset, downloading it into the user cache if allowed."""
    if isinstance(spec, str):
        spec = get_spec(spec)
    offline = offline_from_env() if offline is None else offline
    cache = cache_dir(spec)
    looked: list[str] = []
    for reason, folder in candidate_dirs(spec, data_dir):
        paths = _complete(folder, spec)
        if paths is None:
            if reason == "--data-dir":
                missing = [f.name for f in spec.files.values() if _locate(folder, f) is None]
                raise DataError(f"--data-dir {folder}: missing {', '.join(missing)} (or their .gz)")
            looked.append(f"{folder} ({reason})")
            continue
        arrays = _load_folder(folder, spec, paths, cache if spec.sha256_known else None)
        return _dataset(spec, arrays, str(folder))
    if offline or download_url(spec) is None:
        raise DataError(
            f"{spec.name}: no data found and downloading is "
            f"{'switched off (offline)' if offline else 'not possible (no address)'}. Looked in:\n  "
            + "\n  ".join(looked)
            + "\nGet it either way:\n"
            "  - without a network: apt-get install dataset-fashion-mnist (Debian/Ubuntu), or pass --data-dir DIR\n"
            "  - with a network: run without --offline (and FASHIONLAB_OFFLINE unset) to download and verify it"
        )
    download(spec, cache, progress=progress)
    paths = _complete(cache, spec)
    assert paths is not None
    arrays = _load_folder(cache, spec, paths, cache)
    return _dataset(spec, arrays, download_url(spec) or str(cache))


def _dataset(spec: DatasetSpec, arrays, source: str) -> Dataset:
    return Dataset(
        train_images=arrays[("train", "images")],
        train_labels=arrays[("train", "labels")].astype(np.int64),
        test_images=arrays[("test", "images")],
        test_labels=arrays[("test", "labels")].astype(np.int64),
        class_names=list(spec.class_names),
        source=source,
        verification="sha256 of decompressed bytes" if spec.sha256_known else "IDX structure only (custom dataset: no reference checksums)",
        name=spec.name,
    )


def clear_cache(spec: DatasetSpec = FASHION_MNIST) -> None:
    shutil.rmtree(cache_dir(spec), ignore_errors=True)


# --------------------------------------------------------------------------- splits

def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split keeping each class's share: returns sorted (train_idx, val_idx)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return np.arange(len(labels)), np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        val.append(idx[: int(round(val_fraction * len(idx)))])
    val_idx = np.sort(np.concatenate(val))
    mask = np.ones(len(labels), dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Seeded subset of n indices with class shares as in labels (largest-remainder rounding)."""
    if not 0 < n <= len(labels):
        raise ValueError(f"subset size must be between 1 and {len(labels)}, got {n}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take))[: n - take.sum()]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    chosen = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        chosen.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(chosen))

"""Verified Fashion-MNIST (and any IDX-format dataset): sources, checksums, parsing, cache, splits.

Every file is checked against the SHA-256 of its decompressed bytes before use, so the
official `.gz` files and Debian's recompressed copies both verify, and a decompressed
cache can be trusted without the original archive.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import math
import os
import shutil
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .atomic import OutputError, atomic_write, write_bytes
from .errors import ArgumentError, UserError

SPLITS = ("train", "test")
KINDS = ("images", "labels")
IDX_UBYTE = 0x08  # the one IDX data type these datasets use: unsigned bytes
IDX_NDIM = {"images": 3, "labels": 1}  # (count, rows, columns) / (count,)
IDX_MAGIC = {kind: IDX_UBYTE << 8 | ndim for kind, ndim in IDX_NDIM.items()}  # 0x803 / 0x801
IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32",
             0x0E: "float64"}
IMAGE_SHAPE = (28, 28)  # every model, the service and the export take 28x28 images
# Limits on what a file may declare, checked before anything is allocated or decompressed:
# 2 GiB is 2.7 million 28x28 images (45 times Fashion-MNIST's training set).
MAX_IDX_BYTES = 2**31
MAX_DEFLATE_RATIO = 1032  # deflate cannot expand more than this: a .gz of N bytes holds at most ~1032 N
DOWNLOAD_DEADLINE_S = 900.0  # the whole download, all four files (about 35 KB/s for Fashion-MNIST)
READ_TIMEOUT_S = 60.0  # one read that gets no data at all
CHUNK = 1 << 20  # bytes read (or decompressed) at a time


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

    def shape(self, split: str, kind: str) -> tuple[int, ...] | None:
        """The shape the table gives a file; None where the file's own header decides (no counts)."""
        n = self.counts.get(split)
        if n is None:
            return None
        return (n, *IMAGE_SHAPE) if kind == "images" else (n,)

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

def _header_length(kind: str) -> int:
    return 4 + 4 * IDX_NDIM[kind]  # magic number, then one 4-byte size per dimension


def _idx_size(kind: str, dims: tuple[int, ...]) -> int:
    """Bytes of an IDX file of unsigned bytes with this shape (Python ints: no overflow at 2^32)."""
    return _header_length(kind) + math.prod(dims)


def _magic_problem(head: bytes | bytearray, kind: str) -> str | None:
    """What is wrong with an IDX magic number (zero, zero, data type, dimensions) for `kind`, if anything."""
    if head[0] or head[1]:
        return "not an IDX file: its first two bytes must be zero"
    if head[2] != IDX_UBYTE:
        name = IDX_TYPES.get(head[2], "unknown")
        return f"data type code 0x{head[2]:02x} ({name}) is not supported, only 0x{IDX_UBYTE:02x} (unsigned byte)"
    if head[3] != IDX_NDIM[kind]:
        parts = "count, rows, columns" if kind == "images" else "count"
        return f"{head[3]} dimensions; an IDX {kind} file has {IDX_NDIM[kind]} ({parts})"
    return None


def _declared(head: bytes | bytearray, kind: str, name: str,
              expected: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], int]:
    """Check an IDX header (the file's first _header_length(kind) bytes, fewer if the file is
    shorter) and return the (shape, file size) it declares.

    Everything is checked from the header alone, before any allocation: the magic number, a
    count of at least one, 28x28 images, the shape the dataset's table gives (`expected`) and
    a total under MAX_IDX_BYTES.
    """
    head_len = _header_length(kind)
    too_short = DataError(f"{name}: {len(head)} bytes is too short for an IDX header ({head_len} bytes for {kind})")
    if len(head) < 4:
        raise too_short
    problem = _magic_problem(head, kind)
    if problem:
        magic = int.from_bytes(head[:4], "big")
        raise DataError(f"{name}: wrong IDX magic number 0x{magic:08x}; expected 0x{IDX_MAGIC[kind]:08x} "
                        f"for an IDX {kind} file ({problem})")
    if len(head) < head_len:
        raise too_short
    dims = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(IDX_NDIM[kind]))
    if dims[0] == 0:
        raise DataError(f"{name}: IDX header says 0 {kind}; expected at least 1")
    if kind == "images" and dims[1:] != IMAGE_SHAPE:
        raise DataError(f"{name}: IDX header says images of {dims[1]}x{dims[2]} pixels; "
                        f"expected {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}")
    if expected is not None and dims != expected:
        raise DataError(f"{name}: IDX header says shape {dims}; expected {expected}")
    size = _idx_size(kind, dims)
    if size > MAX_IDX_BYTES:
        raise DataError(f"{name}: IDX header says shape {dims} ({size} bytes), more than the "
                        f"{MAX_IDX_BYTES} bytes a dataset file may have")
    return dims, size


def parse_idx(raw: bytes | bytearray | np.ndarray, kind: str, path: str) -> np.ndarray:
    """Parse an IDX buffer of unsigned bytes: images -> (N, 28, 28) uint8, labels -> (N,) uint8
    (writable when raw is)."""
    head_len = _header_length(kind)
    dims, size = _declared(bytes(raw[:head_len]), kind, path)
    if len(raw) != size:
        raise DataError(f"{path}: IDX header says shape {dims} ({size} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=head_len).reshape(dims)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX (the inverse of parse_idx)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
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


class _Gunzip:
    """One gzip member read as a stream, never decompressing more than the caller asks for (so a
    gzip bomb costs what the caller expected, not what the bomb holds)."""

    def __init__(self, fh: BinaryIO, name: str):
        self.fh, self.name = fh, name
        # zlib with wbits=31 decodes gzip (and checks its CRC and length) faster than the gzip module.
        self.d = zlib.decompressobj(31)
        self.pending = b""  # compressed bytes read but not yet decompressed

    def readinto(self, view: memoryview) -> int:
        """Fill the start of view (never empty: zlib reads max_length 0 as no limit); 0 only at the end."""
        while not self.d.eof:
            if not self.pending:
                self.pending = self.fh.read(CHUNK)
                if not self.pending:
                    raise DataError(f"{self.name}: truncated gzip file (the compressed stream ends early); "
                                    "delete it and fetch it again")
            try:  # at most CHUNK at a time: a bomb's 1 MiB of input could otherwise become gigabytes at once
                out = self.d.decompress(self.pending, min(len(view), CHUNK))
            except zlib.error as e:
                raise DataError(f"{self.name}: not a valid gzip file ({e}); delete it and fetch it again") from None
            self.pending = self.d.unconsumed_tail
            if out:
                view[: len(out)] = out
                return len(out)
        if self.d.unused_data or self.fh.read(1):
            raise DataError(f"{self.name}: unexpected bytes after the end of the gzip stream "
                            "(garbage or a second gzip member); delete it and fetch it again")
        return 0


def _fill(stream, view: memoryview) -> int:
    """Read into view until it is full or the stream ends; the number of bytes read."""
    filled = 0
    while filled < len(view):
        n = stream.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def read_idx(path: Path, kind: str, expected: tuple[int, ...] | None = None, *,
             name: str | None = None, gz: bool | None = None) -> np.ndarray:
    """An IDX file's decompressed bytes (a .gz is decompressed), as a writable 1-D uint8 array.

    The header is read first and checked (see _declared); `expected` is the shape the dataset's
    table gives, or None for a custom dataset, whose header decides. Only then is one buffer of
    the declared size allocated and filled, and the file must end exactly there: at most one byte
    past the declared size is ever decompressed. `name` (default: the path) is what errors name.
    """
    name = name or str(path)
    gz = path.suffix == ".gz" if gz is None else gz
    head_len = _header_length(kind)
    with open(path, "rb") as fh:
        stored = os.fstat(fh.fileno()).st_size
        stream = _Gunzip(fh, name) if gz else fh
        head = bytearray(head_len)
        del head[_fill(stream, memoryview(head)):]  # a file shorter than a header: _declared says so
        dims, size = _declared(head, kind, name, expected)
        if not gz and stored != size:
            raise DataError(f"{name}: IDX header says shape {dims} ({size} bytes) but the file has {stored} bytes")
        if gz and size > stored * MAX_DEFLATE_RATIO:
            raise DataError(f"{name}: IDX header says shape {dims} ({size} bytes), more than a {stored}-byte "
                            f".gz can hold (at most {stored * MAX_DEFLATE_RATIO}); the file is corrupt")
        # np.empty, unlike bytearray, does not write the whole buffer: memory is only taken as the
        # file fills it, so a .gz whose header overstates its contents costs what it holds.
        buf = np.empty(size, dtype=np.uint8)
        view = memoryview(buf)
        view[:head_len] = head
        got = head_len + _fill(stream, view[head_len:])
        if got < size:
            raise DataError(f"{name}: IDX header says shape {dims} ({size} bytes) but the file "
                            f"{'decompresses to' if gz else 'has'} only {got} bytes")
        if _fill(stream, memoryview(bytearray(1))):
            raise DataError(f"{name}: IDX header says shape {dims} ({size} bytes) but the file "
                            f"{'decompresses to' if gz else 'has'} more than that; delete it and fetch it again")
    return buf


def sha256(data: bytes | bytearray | np.ndarray) -> str:
    return hashlib.sha256(data).hexdigest()


def train_sha256(ds: "Dataset") -> str:
    """The training images and labels named by their content (any IDX dataset, with or without reference
    checksums): what says that a list of training-image indices, an audit's, belongs to this data."""
    digest = hashlib.sha256(np.ascontiguousarray(ds.train_images, dtype=np.uint8))
    digest.update(np.ascontiguousarray(ds.train_labels, dtype=np.int64))
    return digest.hexdigest()


def verify(data: bytes | bytearray | np.ndarray, f: IdxFile, name: str | os.PathLike) -> None:
    if f.sha256 is None:
        return
    actual = sha256(data)
    if actual != f.sha256:
        raise DataError(
            f"{name}: checksum mismatch: SHA-256 of the decompressed bytes is {actual}, expected {f.sha256}. "
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


def _archive_cap(size: int) -> int:
    """The most a .gz of `size` decompressed bytes can reasonably be: deflate's stored blocks add
    5 bytes per 64 KiB, so a tenth more plus room for the gzip header is generous."""
    return size + size // 10 + 65536


def _fetch(url: str, out: BinaryIO, cap: int, deadline: float) -> str:
    """Stream url into out: at most `cap` bytes, finished before the time.monotonic() `deadline`.
    Returns the md5 of what was received.

    The deadline is checked after every read and bounds each read's timeout too, so a server
    that sends a byte now and then cannot stretch the download: it fails at the deadline, or
    at most one read timeout (READ_TIMEOUT_S) after it if the server stalls just before it.
    """
    md5 = hashlib.md5()  # noqa: S324 (the published checksum is md5)
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=_time_left(url, deadline, received)) as resp:  # noqa: S310
            declared = getattr(resp, "length", None)  # Content-Length; None when absent (or file://)
            if declared is not None and declared > cap:
                raise DataError(f"download of {url}: the server declares {declared} bytes, more than the "
                                f"{cap} bytes this file can be; nothing was written")
            # read1: whatever one read brings, so the deadline is checked between reads
            while chunk := resp.read1(CHUNK):
                received += len(chunk)
                if received > cap:
                    raise DataError(f"download of {url}: more than the {cap} bytes this file can be; "
                                    "nothing was written")
                md5.update(chunk)
                out.write(chunk)
                _time_left(url, deadline, received)
    except http.client.IncompleteRead as e:
        raise DataError(f"download of {url} was cut short: {received + len(e.partial)} bytes received, "
                        f"{e.expected} more expected") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            raise  # writing the file failed, not the network: atomic_write names the file
        if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):  # urlopen wraps it
            _time_left(url, deadline, received)  # a read cut short by the deadline says so
            raise DataError(f"download of {url} stalled: no data for {READ_TIMEOUT_S:g} s "
                            f"({received} bytes received)") from None
        raise DataError(f"download of {url} failed: {e}") from None
    if declared is not None and received != declared:
        raise DataError(f"download of {url} was cut short: {received} of {declared} bytes")
    return md5.hexdigest()


def _time_left(url: str, deadline: float, received: int) -> float:
    """The timeout for the next read: READ_TIMEOUT_S, or less near the deadline; an error past it."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DataError(f"download of {url} did not finish within {DOWNLOAD_DEADLINE_S:g} s "
                        f"({received} bytes received); nothing was written")
    return min(READ_TIMEOUT_S, left)


def download(spec: DatasetSpec, dest: Path, base_url: str | None = None, progress=None) -> None:
    """Fetch the four .gz files into dest, checking md5 of the archive and SHA-256 of its contents.

    Each file streams to a temporary file in dest (never whole into memory), capped at the size
    it can be, all four within DOWNLOAD_DEADLINE_S; it is renamed only once verified, so an
    interrupted, oversized or corrupt download never leaves a file that a later load could pick up.
    """
    base = base_url or download_url(spec)
    if not base:
        raise DataError(f"dataset {spec.name!r} has no download address")
    deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
    try:
        _download_files(spec, dest, base, deadline, progress)
    except OutputError as e:
        raise e.with_note(_download_kept(spec, dest, e)) from None


def _download_kept(spec: DatasetSpec, dest: Path, e: OutputError) -> str:
    """What a download stopped by a write error leaves: never half a file, the files already verified."""
    kept = [p.name for f in spec.files.values() for p in (dest / (f.name + ".gz"), dest / f.name) if p.is_file()]
    until = "once there is space" if e.disk_full else "once the folder can be written"
    if not kept:
        return f"nothing was kept; the next load downloads it {until}"
    return f"the verified files {', '.join(kept)} are kept; the next load downloads the rest {until}"


def _download_files(spec: DatasetSpec, dest: Path, base: str, deadline: float, progress) -> None:
    for (split, kind), f in spec.files.items():
        target = dest / (f.name + ".gz")
        if target.exists() or (dest / f.name).exists():
            continue
        url = base.rstrip("/") + "/" + f.name + ".gz"
        if progress:
            progress(f"downloading {url}")
        shape = spec.shape(split, kind)
        cap = _archive_cap(_idx_size(kind, shape) if shape else MAX_IDX_BYTES)
        with atomic_write(target) as tmp:
            with open(tmp, "wb") as out:
                md5 = _fetch(url, out, cap, deadline)
            if f.gz_md5 is not None and md5 != f.gz_md5:
                raise DataError(f"{url}: md5 of the download is {md5}, expected {f.gz_md5}; nothing was written")
            verify(read_idx(tmp, kind, shape, name=url, gz=True), f, url)


def _load_folder(folder: Path, spec: DatasetSpec, paths: dict[tuple[str, str], Path], cache: Path | None):
    arrays: dict[tuple[str, str], np.ndarray] = {}
    for key, path in paths.items():
        f = spec.files[key]
        raw = read_idx(path, key[1], spec.shape(*key))
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
        raise ArgumentError(f"validation fraction must be in [0, 1), got {val_fraction}")
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
        raise ArgumentError(f"subset size must be between 1 and {len(labels)}, got {n}")
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

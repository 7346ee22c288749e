"""Optuna RDB storage (SQLite or PostgreSQL) and the study: opening, the schema lock, enqueueing the design.

Sharing the design without duplicates. Optuna's GridSampler repeats points when several workers
ask at once, so grid and random designs are enqueued instead: the process that creates the study
enqueues every key once, and workers claim WAITING trials with the storage's atomic
WAITING -> RUNNING update (on SQLite every transaction is made IMMEDIATE so that update really is
atomic). TPE asks the sampler for new points and enqueues each new point's other seeds.
"""

from __future__ import annotations

import contextlib
import errno
import time
import warnings
from pathlib import Path
from typing import Any

from .design import design_points, make_sampler, trial_attrs, trial_key
from .spec import Spec, SpecError


def open_storage(url: str, heartbeat_interval: int = 10, grace_period: int = 30, max_retry: int = 2):
    """Optuna RDB storage with heartbeats and retry of stale trials; SQLite transactions serialised."""
    import optuna
    quiet_optuna()
    url = _with_installed_driver(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 120}
    # Optuna 5 renamed the retry callback and its argument; older releases have the first names.
    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    retry = {"heartbeat_stale_trial_callback": retry_cls(max_retry=max_retry)} if retry_cls else \
        {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=max_retry)}
    # RDBStorage fills the URL in as a str.format template: braces in a path or password are kept
    # as they are by doubling them.
    template = url.replace("{", "{{").replace("}", "}}")
    with _sqlite_schema_lock(url):
        storage = optuna.storages.RDBStorage(template, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                             grace_period=grace_period, **retry)
    if url.startswith("sqlite"):
        _serialise_sqlite(storage.engine)
    return storage


_FULL = ("database or disk is full", "no space left on device", "could not extend file", "disk quota exceeded")


@contextlib.contextmanager
def full_disk_is_one_line(url: str):
    """A storage that cannot grow (SQLite's file or PostgreSQL's disk is full) reaches the user as one
    line naming the storage, not as the database driver's traceback; everything finished is kept."""
    from ..atomic import OutputError
    try:
        yield
    except Exception as e:
        if isinstance(e, OutputError) or not _disk_full(e):  # an OutputError already names its file
            raise
        from ..tracking import redact
        raise OutputError(f"cannot write the sweep's storage {url_path(url) or redact(url)}: the disk is full; the "
                          f"trainings finished so far are kept in their run folders and the storage: run the same "
                          f"command again once there is space", errno.ENOSPC) from None


def _disk_full(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 20:  # the driver's error sits a few causes down
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(m in str(e).lower() for m in _FULL):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of a SQLite file. The path is percent-encoded: SQLAlchemy decodes it, and a
    raw '?' or '#' would otherwise start a query or fragment (a folder named 'a?b' would put the
    database in 'a')."""
    from urllib.parse import quote
    return "sqlite:///" + quote(str(path.resolve()), safe="/")


def url_path(url: str) -> str:
    """The file of a sqlite:/// URL, decoded; '' for other URLs and in-memory SQLite."""
    from urllib.parse import unquote
    return unquote(url.split(":///", 1)[1].split("?", 1)[0]) if url.startswith("sqlite:///") else ""


@contextlib.contextmanager
def _sqlite_schema_lock(url: str):
    # RDBStorage creates its tables on first open, outside any transaction: two processes opening a
    # new SQLite file at once both try CREATE TABLE and one fails ("table ... already exists"). An
    # exclusive lock on a file beside the database makes the openings take turns. PostgreSQL and
    # in-memory SQLite need none.
    path = url_path(url)
    if not path:
        yield
        return
    import fcntl
    with open(f"{path}.open-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed, whatever happens inside
        yield


def _with_installed_driver(url: str) -> str:
    """postgresql://... with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg 3, the
    sweep extra installs psycopg2-binary; an explicit postgresql+driver:// is left alone."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _serialise_sqlite(engine) -> None:
    # pysqlite starts transactions lazily, so two processes can both read a trial as WAITING and
    # both claim it. BEGIN IMMEDIATE takes the write lock up front (the SQLAlchemy-documented
    # recipe); the busy timeout makes the others wait rather than fail.
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed must not be reused


def quiet_optuna() -> None:
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*Heartbeat of storage.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


def open_study(spec: Spec, storage, wait_s: float = 60.0):
    """Create the study and enqueue its design once, or join the existing one and check it is the same design."""
    import optuna
    design = spec.design()
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, direction=spec.direction,
                                    sampler=make_sampler(spec), load_if_exists=False)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec))
        created = False
    if created:
        study.set_user_attr("design", design)
        _enqueue_missing(spec, study)
        study.set_user_attr("enqueued", spec.total_trials)
        return study
    deadline = time.monotonic() + wait_s
    while True:  # the creator sets `design`, enqueues, then sets `enqueued`
        attrs = study.user_attrs
        if "design" in attrs and attrs["design"] != design:
            changed = sorted(k for k in set(design) | set(attrs["design"]) if design.get(k) != attrs["design"].get(k))
            raise SpecError(f"{spec.path}: the study {spec.name!r} in this storage was created from a different "
                            f"design (differs in: {', '.join(changed)}); give the experiment a new name or use "
                            f"another storage")
        if "enqueued" in attrs or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if "enqueued" not in study.user_attrs:
        # The creator died before finishing; queue what is missing (any overlap is pruned as duplicate).
        if "design" not in study.user_attrs:
            study.set_user_attr("design", design)
        _enqueue_missing(spec, study)
        study.set_user_attr("enqueued", spec.total_trials)
    return study


def _enqueue_missing(spec: Spec, study) -> None:
    existing = {t.user_attrs.get("key") for t in study.get_trials(deepcopy=False)}
    points = design_points(spec)
    for seed in spec.seeds:  # seed-major: every point gets its first seed before any gets a second
        for point in points:
            key = trial_key(point, seed)
            if key not in existing:
                study.enqueue_trial(point, user_attrs=trial_attrs(point, seed))

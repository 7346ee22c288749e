"""Dynamic batching: the images of concurrent requests gathered into one forward pass.

Requests hand a Batcher their images from the event loop (`await batcher.submit(images)`) and wait
without holding a thread; a pass takes what is queued, up to `max_batch` images, runs the model once
on all of it, cuts every output back into each request's rows and wakes each request's event loop
once per pass. Passes run on one of two places:

- an inference thread of the Batcher's own (the default), beside the event loop: the loop reads and
  answers requests while a pass runs. Best when the worker has a core for each.
- the event loop itself (`on_loop=True`; the Batcher then serves that one loop), in a turn of its
  own once the requests that arrived in the same turn have queued their images and the answers of
  the previous pass have been written: no hand-over between threads and no contention for the GIL,
  while the loop waits for the pass. Best when a worker has one core (as many workers as cores;
  service.passes_on chooses, docs/deploy.md "Workers" measures).

- Waiting: a pass starts when `max_batch` images are queued, or when the oldest queued request
  has waited `max_wait` seconds, whichever is first. While a pass runs, new requests queue and
  form the next pass, so under load passes fill up on their own; `max_wait` only matters when the
  model is idle and a request arrives alone.
- Sizes: a request holding more than `max_batch` images is cut across several passes (the last
  of its rows may share a pass with other requests); its answer is sent when its last rows are done.
- Order: requests are served first come, first served; each gets its own rows, in its own order.
- Outputs: the model function takes one (N, 28, 28) uint8 array and returns an array or a tuple
  of arrays whose first axis is the image axis; each request gets the same structure for its rows.
- Failure: when the model raises, every request in that pass gets the exception.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

Outputs = Any  # an array, or a tuple of arrays, row-aligned with the images


class BatchObserver(Protocol):
    """What a Batcher reports (the service's metrics)."""

    def queued(self, images: int) -> None: ...  # images now waiting for the model

    def ran(self, images: int, seconds: float) -> None: ...  # one forward pass


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no new work."""


@dataclass(eq=False)
class _Request:
    images: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float
    taken: int = 0  # rows handed to passes so far
    done: int = 0  # rows whose outputs are back
    pieces: list = field(default_factory=list)  # each pass's outputs for this request, in row order
    failed: bool = False


class Batcher:
    """`fn` run over the gathered images of concurrent requests, on an inference thread or on the
    event loop (`on_loop`)."""

    def __init__(self, fn: Callable[[np.ndarray], Outputs], max_batch: int, max_wait: float,
                 observer: BatchObserver | None = None, name: str = "fashionlab-inference", on_loop: bool = False):
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait >= 0; got {max_batch}, {max_wait}")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait
        self.observer, self.name, self.on_loop = observer, name, on_loop
        self._queue: collections.deque[_Request] = collections.deque()
        self._waiting_images = 0  # rows queued and not yet taken by a pass
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._next_on_loop: asyncio.Handle | None = None  # the pass scheduled on the event loop (on_loop)
        self._next_waits = False  # whether that pass waits out max_wait (a timer) or runs in two turns
        self._closing = False

    # ----------------------------------------------------------------------- the event loop's side

    async def submit(self, images: np.ndarray, urgent: bool = False) -> Outputs:
        """The model's outputs for `images` ((N, 28, 28) uint8), computed in a shared pass. `urgent`
        work (the health check's few images) goes to the front of the queue."""
        loop = asyncio.get_running_loop()
        request = _Request(images, loop.create_future(), loop, time.monotonic())
        with self._cond:
            if self._closing:
                raise BatcherClosed("the server is shutting down")
            if urgent:
                self._queue.appendleft(request)
            else:
                self._queue.append(request)
            self._waiting_images += len(images)
            waiting = self._waiting_images
            if self.on_loop:
                self._schedule_on(loop)
            else:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                    self._thread.start()
                self._cond.notify()  # the inference thread may be waiting for work
        if self.observer:
            self.observer.queued(waiting)
        return await request.future

    def close(self, timeout: float | None = None) -> None:
        """Takes no new work, finishes what is queued, then stops the inference thread. With passes on
        the event loop, waits until that loop has run the queued passes (called on the loop itself, it
        returns at once: they run after it)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
            if self.on_loop and _running_loop() is None:
                self._cond.wait_for(lambda: self._next_on_loop is None, timeout)
        if thread is not None:
            thread.join(timeout)

    # ----------------------------------------------------------------------- passes on the event loop

    def _schedule_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """The next pass, two turns of the event loop after this one (so that the other requests that
        arrived in this turn join it, and the answers written in the next go out first), or after
        max_wait when the model is idle and the pass not full. Called with the lock held."""
        full = self._waiting_images >= self.max_batch
        if self._next_on_loop is not None:
            if not (full and self._next_waits):
                return
            self._next_on_loop.cancel()  # full before its wait is over: no reason to wait
        # Whether the pass waits is noted, not read from the handle's type: uvloop's timer handles are
        # not asyncio.TimerHandle instances.
        self._next_waits = self.max_wait > 0 and not full
        if self._next_waits:
            self._next_on_loop = loop.call_at(self._queue[0].arrived - time.monotonic() + loop.time() +
                                              self.max_wait, self._pass_on_loop, loop)
        else:
            self._next_on_loop = _after_this_turn_and_the_next(loop, self._pass_on_loop, loop)

    def _pass_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._cond:
            self._drop_cancelled()
            taken = self._take()
        self._run(taken)
        with self._cond:
            self._next_on_loop = None
            self._drop_cancelled()
            if self._queue:
                # what queued during this one (health checks, a request cut across passes)
                self._next_on_loop = _after_this_turn_and_the_next(loop, self._pass_on_loop, loop)
                self._next_waits = False
            self._cond.notify_all()

    # ----------------------------------------------------------------------- the inference thread

    def _serve(self) -> None:
        while True:
            taken = self._next_pass()
            if taken is None:
                return
            self._run(taken)

    def _next_pass(self) -> list[tuple[_Request, int, int]] | None:
        """(request, first row, end row) slices for the next pass, oldest first; None once closed and
        drained. Waits for work, then for more work until the pass is full or the oldest has waited
        max_wait."""
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._queue:
                    break
                if self._closing:
                    return None
                self._cond.wait()
            if self.max_wait > 0:
                deadline = self._queue[0].arrived + self.max_wait
                while self._waiting_images < self.max_batch and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self._drop_cancelled()
            return self._take()

    def _take(self) -> list[tuple[_Request, int, int]]:
        """Up to max_batch queued rows, oldest first, as (request, first row, end row). Called with the
        lock held."""
        taken, room = [], self.max_batch
        while self._queue and room:
            request = self._queue[0]
            start = request.taken
            stop = min(len(request.images), start + room)
            taken.append((request, start, stop))
            request.taken, room = stop, room - (stop - start)
            if stop == len(request.images):
                self._queue.popleft()
        self._waiting_images -= self.max_batch - room
        if self.observer:
            self.observer.queued(self._waiting_images)
        return taken

    def _drop_cancelled(self) -> None:
        """Requests whose client went away (their future cancelled) before any of their rows ran."""
        kept = [r for r in self._queue if not (r.future.cancelled() and r.taken == 0)]
        if len(kept) != len(self._queue):
            self._waiting_images = sum(len(r.images) - r.taken for r in kept)
            self._queue = collections.deque(kept)

    def _run(self, taken: list[tuple[_Request, int, int]]) -> None:
        if not taken:
            return
        batch = taken[0][0].images[taken[0][1]:taken[0][2]] if len(taken) == 1 else \
            np.concatenate([r.images[start:stop] for r, start, stop in taken])
        started = time.perf_counter()
        try:
            outputs = self.fn(batch)
        except BaseException as e:  # every request of the pass learns why
            error: BaseException | None = e
        else:
            error = None
        if self.observer:
            self.observer.ran(len(batch), time.perf_counter() - started)
        finished: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any, BaseException | None]]] = {}
        offset = 0
        for request, start, stop in taken:
            n = stop - start
            if error is None:
                request.pieces.append(_rows(outputs, offset, offset + n))
            offset += n
            request.done += n
            if request.failed:
                continue
            if error is not None:
                request.failed = True
                finished.setdefault(request.loop, []).append((request, None, error))
            elif request.done == len(request.images):
                finished.setdefault(request.loop, []).append((request, _joined(request.pieces), None))
        here = _running_loop()
        for loop, results in finished.items():  # one wake-up per event loop per pass
            if loop is here:  # the pass ran on this loop (on_loop): no wake-up needed
                _deliver(results)
                continue
            try:
                loop.call_soon_threadsafe(_deliver, results)
            except RuntimeError:  # that loop has closed: nobody is waiting for these answers
                pass


def _after_this_turn_and_the_next(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any
                                  ) -> asyncio.Handle:
    """callback(*args), two turns of the event loop on. A pass on the loop runs there: the requests woken
    by the previous pass write their answers in the next turn, and the writes go out at the end of that
    turn (server.CoalescedWrites); a pass in that same turn would hold the answers back for its whole
    length, and the clients' next requests with them. Returns the first turn's handle."""
    return loop.call_soon(loop.call_soon, callback, *args)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # an inference thread
        return None


def _deliver(results: list[tuple[_Request, Any, BaseException | None]]) -> None:
    for request, outputs, error in results:
        if request.future.done():  # cancelled: the client went away
            continue
        if error is None:
            request.future.set_result(outputs)
        else:
            request.future.set_exception(error)


def _rows(outputs: Outputs, start: int, stop: int) -> Outputs:
    if isinstance(outputs, tuple):
        return tuple(o[start:stop] for o in outputs)
    return outputs[start:stop]


def _joined(pieces: list[Outputs]) -> Outputs:
    if len(pieces) == 1:
        return pieces[0]
    if isinstance(pieces[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*pieces))
    return np.concatenate(pieces)


# --------------------------------------------------------------------------- identical answers in any company

# Images per pass for a model whose answers depend on the pass's size in more ways than one image against
# several. Small, because a lone request pays for the whole pass.
FIXED_PASS = 8


def _padded(batch: np.ndarray, size: int) -> np.ndarray:
    """batch followed by blank images up to `size` rows."""
    pad = size - len(batch)
    return np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)]) if pad > 0 else batch


def in_fixed_passes(fn: Callable[[np.ndarray], Outputs], size: int) -> Callable[[np.ndarray], Outputs]:
    """fn run only on passes of exactly `size` images: the batch is cut into passes of `size`, the last
    padded with blank images, and the padding's rows dropped from the outputs."""
    def run(batch: np.ndarray) -> Outputs:
        n = len(batch)
        padded = _padded(batch, -(-max(n, 1) // size) * size)
        return _rows(_joined([fn(padded[i: i + size]) for i in range(0, len(padded), size)]), 0, n)
    return run


def in_passes_of_at_least(fn: Callable[[np.ndarray], Outputs], size: int) -> Callable[[np.ndarray], Outputs]:
    """fn run only on passes of `size` images or more: a smaller batch is padded with blank images up to
    `size`, and the padding's rows dropped from the outputs."""
    def run(batch: np.ndarray) -> Outputs:
        return fn(batch) if len(batch) >= size else _rows(fn(_padded(batch, size)), 0, len(batch))
    return run


def same_rows(fn: Callable[[np.ndarray], Outputs], probes: np.ndarray, sizes: list[int], seed: int = 0) -> bool:
    """True when every probe image gets bit-identical outputs from fn alone and in passes of each of
    `sizes` images, at the start, middle and end of the pass, among seeded random images."""
    rng = np.random.default_rng(seed)
    alone = [fn(p[None]) for p in probes]
    for size in sizes:
        batch = rng.integers(0, 256, (size, *probes.shape[1:]), dtype=np.uint8)
        places = sorted({0, size // 3, 2 * size // 3, size - 1})[: len(probes)]
        for k, place in enumerate(places):
            batch[place] = probes[k]
        outputs = fn(batch)
        if not all(_equal(_rows(outputs, place, place + 1), alone[k]) for k, place in enumerate(places)):
            return False
    return True


def identical_passes(fn: Callable[[np.ndarray], Outputs], probes: np.ndarray, max_batch: int
                     ) -> tuple[Callable[[np.ndarray], Outputs], str]:
    """fn, or fn in padded passes, such that every image's outputs are bit-identical whatever other images
    share its pass (checked here on `probes`), with a line saying which, the cheapest first:

    - passes of any size, where the backend's kernels allow (ONNX Runtime's CPU kernels do: each image's
      arithmetic is the same in any batch);
    - passes of at least 2 images: PyTorch's CPU convolutions and matrix products take other code for
      one image than for several (and the same for any number from 2), so only a lone image is padded;
    - passes of exactly FIXED_PASS images (the last padded);
    - one image per pass.
    """
    sizes = sorted({s for s in (2, 3, 5, 8, 13, 32, max_batch) if s <= max_batch})
    if same_rows(fn, probes, sizes):
        return fn, f"passes of 1 to {max_batch} images give identical answers (checked at start-up)"
    if max_batch >= 2 and same_rows(in_passes_of_at_least(fn, 2), probes, sizes):
        return in_passes_of_at_least(fn, 2), (
            "this backend answers one image alone differently: a lone image is padded to a pass of 2, and passes "
            f"of 2 to {max_batch} images give identical answers (checked at start-up)")
    size = min(FIXED_PASS, max_batch)
    fixed = in_fixed_passes(fn, size)
    if size > 1 and same_rows(fixed, probes, sizes):
        return fixed, (f"this backend's answers depend on the pass size: every pass holds exactly {size} images "
                       "(the last padded), which gives identical answers (checked at start-up)")
    return in_fixed_passes(fn, 1), ("this backend's answers depend on the other images in a pass: one image per "
                                    "pass (requests are still gathered, the model is not)")


def _equal(a: Outputs, b: Outputs) -> bool:
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return all(x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind in "fc")
               for x, y in pairs)

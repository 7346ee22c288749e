"""Dynamic batching (serve/batching.py), in-process: concurrent requests share forward passes, each gets
its own rows back in order, answers are bit-identical whatever shares a pass (the real model, PyTorch
and ONNX Runtime), and the serve flags are range-checked. Real server processes: test_serve_process.py.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import numpy as np
import pytest
import uvloop

from fashionlab import cli
from fashionlab.serve import ModelService, Settings
from fashionlab.serve.batching import (Batcher, BatcherClosed, identical_passes, in_fixed_passes, in_passes_of_at_least,
                                       same_rows)
from serve_support import real_dataset, trained_run


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def row_sums(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A model stand-in whose outputs name their image: (sum of its pixels, its first pixel)."""
    return batch.reshape(len(batch), -1).sum(1), batch[:, 0, 0].copy()


class Recording:
    """fn wrapped to record the size of every pass (and to take `seconds` per pass)."""

    def __init__(self, fn=row_sums, seconds: float = 0.0):
        self.fn, self.seconds, self.sizes = fn, seconds, []
        self.running = threading.Event()  # set once the first pass has begun

    def __call__(self, batch):
        self.sizes.append(len(batch))
        self.running.set()
        if self.seconds:
            time.sleep(self.seconds)
        return self.fn(batch)


async def submit_all(batcher: Batcher, requests: list[np.ndarray]) -> list:
    return await asyncio.gather(*(batcher.submit(r) for r in requests))


async def first_pass_running(batcher: Batcher, fn: Recording) -> asyncio.Future:
    """Submits one image and returns once its pass is running (what is submitted next queues behind it)."""
    busy = asyncio.ensure_future(batcher.submit(images(1)))
    await asyncio.to_thread(fn.running.wait, 30)
    return busy


# --------------------------------------------------------------------------- the Batcher

# Where passes run: an inference thread, or the event loop that submits (one worker per core).
PLACES = pytest.mark.parametrize("on_loop", [False, True], ids=["thread", "loop"])
# The event loops a server runs on: asyncio's own, and uvloop (the serve extra's, uvicorn's choice when
# installed), whose handles are not asyncio's classes.
EVENT_LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


@PLACES
def test_every_request_gets_its_own_rows_in_order_from_shared_passes(on_loop):
    fn = Recording(seconds=0.01)
    batcher = Batcher(fn, max_batch=16, max_wait=0.0, on_loop=on_loop)
    rng = np.random.default_rng(1)
    requests = [images(int(rng.integers(1, 40)), seed=i) for i in range(30)]  # some larger than a pass
    answers = asyncio.run(submit_all(batcher, requests))
    for request, (sums, firsts) in zip(requests, answers):
        expected = row_sums(request)
        np.testing.assert_array_equal(sums, expected[0])
        np.testing.assert_array_equal(firsts, expected[1])
    assert max(fn.sizes) <= 16 and sum(fn.sizes) == sum(map(len, requests))
    # the requests queued behind the first pass filled the next ones: as few passes as their images allow
    assert len(fn.sizes) <= 1 + -(-(sum(map(len, requests)) - fn.sizes[0]) // 16), fn.sizes
    batcher.close()


@PLACES
def test_a_request_larger_than_the_pass_is_cut_and_answered_whole(on_loop):
    fn = Recording(fn=lambda b: b.reshape(len(b), -1)[:, 0].astype(np.int64))  # a single array, not a tuple
    batcher = Batcher(fn, max_batch=8, max_wait=0.0, on_loop=on_loop)
    big = images(29)
    answer = asyncio.run(batcher.submit(big))
    np.testing.assert_array_equal(answer, big.reshape(29, -1)[:, 0])
    assert fn.sizes == [8, 8, 8, 5]
    batcher.close()


@EVENT_LOOPS
@PLACES
def test_requests_arriving_at_an_idle_model_wait_up_to_max_wait_for_company(on_loop, run):
    async def two_apart(batcher):
        first = asyncio.ensure_future(batcher.submit(images(1)))
        await asyncio.sleep(0.02)
        return await asyncio.gather(first, batcher.submit(images(1, seed=1)))

    async def alone(batcher) -> float:
        start = time.monotonic()
        await batcher.submit(images(1))
        return time.monotonic() - start

    waiting = Recording()
    run(two_apart(Batcher(waiting, max_batch=8, max_wait=0.5, on_loop=on_loop)))
    assert waiting.sizes == [2]  # the first waited for the second
    assert run(alone(Batcher(Recording(), 8, max_wait=0.3, on_loop=on_loop))) >= 0.29  # no company came
    assert run(alone(Batcher(Recording(), 8, max_wait=0.0, on_loop=on_loop))) < 0.2  # never waits


@EVENT_LOOPS
@PLACES
def test_a_full_pass_does_not_wait(on_loop, run):
    fn = Recording()
    batcher = Batcher(fn, max_batch=4, max_wait=30.0, on_loop=on_loop)
    start = time.monotonic()
    run(submit_all(batcher, [images(2), images(2, seed=1)]))
    assert fn.sizes == [4] and time.monotonic() - start < 10


@PLACES
def test_an_exception_reaches_every_request_of_its_pass_and_the_next_pass_works(on_loop):
    calls = []

    def flaky(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("the model broke")
        return row_sums(batch)

    fn = Recording(fn=flaky, seconds=0.05)  # the others queue behind the first pass and share the next one
    batcher = Batcher(fn, max_batch=64, max_wait=0.0, on_loop=on_loop)

    async def scenario():
        first = await first_pass_running(batcher, fn)
        queued = await asyncio.gather(*(batcher.submit(images(1, seed=i)) for i in range(5)), return_exceptions=True)
        return await first, queued, await batcher.submit(images(3))

    first, queued, after = asyncio.run(scenario())
    assert len(first[0]) == 1
    assert all(isinstance(e, RuntimeError) and "broke" in str(e) for e in queued), queued
    assert len(after[0]) == 3 and calls == [1, 5, 3]


@PLACES
def test_a_cancelled_request_is_dropped_and_the_others_are_answered(on_loop):
    fn = Recording(seconds=0.05)
    batcher = Batcher(fn, max_batch=64, max_wait=0.0, on_loop=on_loop)

    async def scenario():
        busy = await first_pass_running(batcher, fn)
        gone = asyncio.ensure_future(batcher.submit(images(7)))
        kept = asyncio.ensure_future(batcher.submit(images(2)))
        await asyncio.sleep(0)
        gone.cancel()
        return await busy, await kept

    busy, kept = asyncio.run(scenario())
    assert len(kept[0]) == 2 and fn.sizes == [1, 2]  # the cancelled request's 7 images never ran


def test_urgent_work_joins_the_next_pass_first():
    fn = Recording(seconds=0.05)
    batcher = Batcher(fn, max_batch=4, max_wait=0.0)

    async def scenario():
        busy = await first_pass_running(batcher, fn)
        queued = [asyncio.ensure_future(batcher.submit(images(4, seed=i))) for i in range(3)]
        await asyncio.sleep(0)
        urgent = asyncio.ensure_future(batcher.submit(np.full((4, 28, 28), 7, np.uint8), urgent=True))
        await asyncio.gather(busy, urgent, *queued)

    seen = []
    fn.fn = lambda b: (seen.append(int(b[0, 0, 0])), row_sums(b))[1]
    asyncio.run(scenario())
    assert seen[1] == 7  # right after the pass that was running


def test_on_the_event_loop_the_requests_of_one_turn_share_a_pass_and_no_thread_starts():
    """With passes on the loop, a pass runs in the turn after the requests that arrived together queued
    their images: those share it (urgent work first), what queues during a pass forms the next one, and
    answers need no thread or wake-up."""
    seen = []
    fn = Recording(fn=lambda b: (seen.append(b[:, 0, 0].tolist()), row_sums(b))[1])
    batcher = Batcher(fn, max_batch=8, max_wait=0.0, on_loop=True)

    async def scenario():
        first = [asyncio.ensure_future(batcher.submit(np.full((2, 28, 28), i, np.uint8))) for i in range(5)]
        urgent = asyncio.ensure_future(batcher.submit(np.full((1, 28, 28), 9, np.uint8), urgent=True))
        answers = await asyncio.gather(*first, urgent)
        return answers, threading.active_count()

    before = threading.active_count()
    answers, during = asyncio.run(scenario())
    assert seen == [[9, 0, 0, 1, 1, 2, 2, 3], [3, 4, 4]]  # one turn's requests: two passes, urgent first
    assert [len(a[0]) for a in answers] == [2, 2, 2, 2, 2, 1]
    assert batcher._thread is None and during == before


@EVENT_LOOPS
def test_on_the_event_loop_a_pass_waits_until_the_previous_answers_are_written(run):
    """A woken request writes its answer in the next turn, and the server sends the turn's writes at the
    end of it (server.CoalescedWrites: a callback of the next turn). The next pass must come after that
    send, not hold the answer back for its whole length: here each request 'sends' in a callback it
    schedules once answered, and every pass after the first sees all earlier answers sent."""
    sent, sent_before_pass = [], []

    def model(batch):
        sent_before_pass.append(sorted(sent))
        return row_sums(batch)

    batcher = Batcher(model, max_batch=1, max_wait=0.0, on_loop=True)  # one image a pass: a pass per request

    async def request(i: int) -> None:
        await batcher.submit(np.full((1, 28, 28), i, np.uint8))
        asyncio.get_running_loop().call_soon(sent.append, i)  # the write, at the end of the next turn

    async def scenario():
        await asyncio.gather(*(request(i) for i in range(4)))

    run(scenario())
    assert sent_before_pass == [[], [0], [0, 1], [0, 1, 2]]


@pytest.mark.parametrize("cores,workers,place", [(1, 1, "loop"), (2, 1, "thread"), (2, 2, "loop"), (4, 2, "thread"),
                                                 (16, 8, "thread"), (8, 8, "loop"), (3, 2, "loop")])
def test_passes_run_on_the_event_loop_where_a_worker_has_no_core_to_spare(monkeypatch, cores, workers, place):
    from fashionlab.serve.service import passes_on
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert passes_on(Settings(workers=workers)) == place
    assert passes_on(Settings(workers=workers, passes_on="thread")) == "thread"  # as set
    assert Settings.from_env({"FASHIONLAB_PASSES_ON": "loop"}).passes_on == "loop"
    with pytest.raises(ValueError, match="--passes-on .*expected one of thread, loop; got 'fibre'"):
        Settings(passes_on="fibre").checked()


@PLACES
def test_close_finishes_the_queued_work_then_refuses_more(on_loop):
    fn = Recording(seconds=0.02)
    submitted = threading.Semaphore(0)

    class Counting:  # the observer hears of every submitted request
        def queued(self, images):
            submitted.release()

        def ran(self, images, seconds):
            pass

    batcher = Batcher(fn, max_batch=2, max_wait=0.0, on_loop=on_loop, observer=Counting())
    results = []

    async def many():
        return await submit_all(batcher, [images(2, seed=i) for i in range(5)])

    worker = threading.Thread(target=lambda: results.append(asyncio.run(many())))
    worker.start()
    for _ in range(5):  # every request is queued (the first pass may already run) before closing
        assert submitted.acquire(timeout=30)
    batcher.close(timeout=30)
    worker.join(30)
    assert len(results) == 1 and len(results[0]) == 5 and sum(fn.sizes) == 10
    with pytest.raises(BatcherClosed):
        asyncio.run(batcher.submit(images(1)))


def test_each_event_loop_gets_its_own_answers():
    """Requests from several event loops (threads) share passes; each loop is woken with its own answers."""
    fn = Recording(seconds=0.005)
    batcher = Batcher(fn, max_batch=32, max_wait=0.002)
    answers: dict[int, list] = {}

    def loop_thread(k):
        requests = [images(3, seed=100 * k + i) for i in range(10)]
        answers[k] = [(r, a) for r, a in zip(requests, asyncio.run(submit_all(batcher, requests)))]

    threads = [threading.Thread(target=loop_thread, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for k in range(4):
        for request, (sums, _) in answers[k]:
            np.testing.assert_array_equal(sums, row_sums(request)[0])
    batcher.close()


# --------------------------------------------------------------------------- identical answers in any company

def size_dependent(batch):
    """Like PyTorch's CPU kernels: each image's arithmetic depends on the size of its pass."""
    return batch.reshape(len(batch), -1).astype(np.float32).mean(1) * np.float32(1 + 1e-6 * (len(batch) % 3))


def lone_image_differs(batch):
    """Like PyTorch's CPU convolutions: one image alone runs other code than two or more, in any number."""
    return batch.reshape(len(batch), -1).astype(np.float32).mean(1) * np.float32(1 + 1e-6 * (len(batch) == 1))


def company_dependent(batch):
    """Worse: each image's answer depends on the other images of its pass."""
    x = batch.reshape(len(batch), -1).astype(np.float32)
    return x.mean(1) + np.float32(1e-6) * x.mean()


@pytest.mark.parametrize("fn,plan", [(row_sums, "any size"), (lone_image_differs, "padded to a pass of 2"),
                                     (size_dependent, "exactly"), (company_dependent, "one image per pass")])
def test_the_pass_plan_gives_identical_rows_and_says_which_it_chose(fn, plan):
    probes = images(4, seed=9)
    forward, note = identical_passes(fn, probes, max_batch=32)
    assert plan in note.replace("1 to 32", "any size")
    assert same_rows(forward, images(4, seed=10), [2, 7, 8, 9, 31], seed=3)
    if fn is not row_sums:
        assert not same_rows(fn, probes, [2, 7, 8, 9, 31])


def test_fixed_passes_pad_and_trim():
    sizes = []
    forward = in_fixed_passes(lambda b: (sizes.append(len(b)), row_sums(b))[1], 8)
    x = images(19)
    np.testing.assert_array_equal(forward(x)[0], row_sums(x)[0])
    assert sizes == [8, 8, 8]
    assert len(forward(x[:0])[0]) == 0


def test_passes_of_at_least_pad_only_a_lone_image():
    sizes = []
    forward = in_passes_of_at_least(lambda b: (sizes.append(len(b)), row_sums(b))[1], 2)
    x = images(5)
    for batch in (x[:1], x[:2], x):
        np.testing.assert_array_equal(forward(batch)[0], row_sums(batch)[0])
    assert sizes == [2, 2, 5]
    assert len(forward(x[:0])[0]) == 0


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """The trained test run, copied, with its ONNX export."""
    from fashionlab import export
    run = tmp_path_factory.mktemp("batching") / "run"
    shutil.copytree(trained_run(), run)
    export.export_onnx(run, real_dataset().test_images[:200])
    return run


@pytest.mark.parametrize("passes", ["thread", "loop"])
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_real_model_answers_are_bit_identical_whatever_shares_the_pass(served_run, backend, passes):
    """40 requests of 1 to 11 real test images at once through the service's batcher: each request's
    probabilities and out-of-distribution scores equal, bit for bit, what the model gives that request
    alone (its own pass), and passes really were shared."""
    service = ModelService(Settings(run=str(served_run), backend=backend, samples=0, max_batch=16,
                                    passes_on=passes).checked())
    assert service.batcher.on_loop == (passes == "loop")
    passes = []
    checked_pass = service.batcher.fn
    service.batcher.fn = lambda batch: (passes.append(len(batch)), checked_pass(batch))[1]
    test_images = real_dataset().test_images
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(test_images) - 11, 40)
    requests = [test_images[s: s + int(rng.integers(1, 12))] for s in starts]

    async def all_at_once():
        return await asyncio.gather(*(service.infer(r) for r in requests))

    answers = asyncio.run(all_at_once())
    assert len(passes) < len(requests) and max(passes) > 1, passes
    for request, (probs, scores) in zip(requests, answers):
        alone_probs, alone_scores = service.forward(request)
        assert np.array_equal(probs, alone_probs), np.abs(probs - alone_probs).max()
        assert np.array_equal(scores, alone_scores, equal_nan=True)
    if backend == "onnx":  # ONNX Runtime's CPU kernels compute each image alike in a pass of any size
        assert "passes of 1 to 16 images give identical answers" in service.passes_note
        for request, (probs, _) in zip(requests, answers):
            assert np.array_equal(service.predictor.infer(request, len(request))[0], probs)
    service.close()


# --------------------------------------------------------------------------- flags and settings

@pytest.mark.parametrize("flag,value,accepts", [
    ("--port", "70000", "from 0 to 65,535"), ("--threads", "0", "from 1 to 1,024"),
    ("--workers", "0", "from 1 to 256"), ("--max-batch", "0", "from 1 to 1,024"),
    ("--max-batch", "5000", "from 1 to 1,024"), ("--max-wait-ms", "-1", "from 0 to 1,000"),
    ("--keep-alive-timeout", "0", "from 0.1 to 3,600"), ("--read-timeout", "nan", "from 0.1 to 3,600"),
    ("--shutdown-timeout", "1e9", "from 0 to 3,600"), ("--max-body-bytes", "0", "from 1 to"),
    ("--max-pixels", "0", "from 1 to"), ("--max-request-pixels", "-5", "from 1 to"),
    ("--max-decoded-bytes", "0", "from 1 to"), ("--max-concurrent-decodes", "0", "from 1 to 1,024"),
    ("--samples", "-1", "from 0 to 10,000"),
])
def test_every_serve_flag_is_range_checked_with_one_line_naming_it(tmp_path, capsys, flag, value, accepts):
    assert cli.main(["serve", str(tmp_path), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fashionlab serve: error: {flag} "), err
    assert f"expected an integer {accepts}" in err[0] or f"expected a number {accepts}" in err[0], err


@pytest.mark.parametrize("cores,workers,threads", [(1, 1, 1), (2, 1, 1), (2, 2, 1), (4, 1, 3), (16, 2, 7),
                                                   (16, 4, 3), (8, 8, 1)])
def test_each_workers_event_loop_keeps_a_core(monkeypatch, cores, workers, threads):
    from fashionlab.serve.service import inference_threads
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert inference_threads(Settings(workers=workers)) == threads
    assert inference_threads(Settings(workers=workers, threads=5)) == 5  # as set


def test_batching_settings_come_from_the_environment():
    s = Settings.from_env({"FASHIONLAB_MAX_BATCH": "32", "FASHIONLAB_MAX_WAIT_MS": "1.5",
                           "FASHIONLAB_READ_TIMEOUT": "7", "FASHIONLAB_THREADS": "3"})
    assert (s.max_batch, s.max_wait_ms, s.read_timeout, s.threads) == (32, 1.5, 7.0, 3)
    with pytest.raises(ValueError, match="FASHIONLAB_MAX_WAIT_MS='soon': expected a number"):
        Settings.from_env({"FASHIONLAB_MAX_WAIT_MS": "soon"})


def test_concurrent_health_checks_share_one_check_of_the_known_images(served_run):
    service = ModelService(Settings(run=str(served_run), backend="onnx", samples=0).checked())
    submitted = []
    submit = service.batcher.submit

    async def counting(batch, urgent=False):
        submitted.append((len(batch), urgent))
        return await submit(batch, urgent)

    service.batcher.submit = counting

    async def storm():
        await asyncio.gather(*(service.require_ready() for _ in range(20)))
        await service.require_ready()  # after the storm: a check of its own

    asyncio.run(storm())
    assert submitted == [(4, True), (4, True)]
    service.close()


def test_a_request_of_no_images_gets_empty_outputs_of_the_right_shape():
    batcher = Batcher(in_fixed_passes(row_sums, 4), max_batch=8, max_wait=0.0)
    sums, firsts = asyncio.run(batcher.submit(images(0)))
    assert sums.shape == (0,) and firsts.shape == (0,)
    batcher.close()

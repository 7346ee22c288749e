"""The service as real `fashionlab serve` processes: keep-alive latency with two workers, /metrics
scraped with prometheus_client's own parser (one worker and two), connections that stall are closed,
and SIGTERM answers the requests in flight, stops accepting and exits 0.
"""

from __future__ import annotations

import http.client
import io
import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from serve_support import metric_samples, real_dataset, server_process, trained_run


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def body() -> bytes:
    return png(real_dataset().test_images[0])


@pytest.fixture(scope="module")
def asyncio_only(tmp_path_factory) -> dict[str, str]:
    """An environment in which uvloop cannot be imported, so uvicorn runs on asyncio's own event loop:
    where connections once lacked TCP_NODELAY (uvloop sets it on its own)."""
    shim = tmp_path_factory.mktemp("no-uvloop")
    (shim / "uvloop.py").write_text("raise ImportError('uvloop is hidden from this test server')\n")
    return {"PYTHONPATH": str(shim)}


@pytest.fixture(scope="module")
def two_workers(asyncio_only, tmp_path_factory):
    """Two worker processes with their passes on their event loops (the default on 2 cores); their metrics
    in a folder the test can look into."""
    metrics_dir = tmp_path_factory.mktemp("prometheus")
    env = {**asyncio_only, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with server_process(str(trained_run()), "--workers", "2", "--passes-on", "loop", "--samples", "0", env=env,
                        startup_timeout=240) as server:
        server.metrics_dir = metrics_dir
        yield server


@pytest.fixture(scope="module")
def one_worker():
    """One worker with short timeouts."""
    with server_process(str(trained_run()), "--samples", "0", "--read-timeout", "1", "--keep-alive-timeout",
                        "2") as server:
        yield server


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


# --------------------------------------------------------------------------- keep-alive with two workers

def test_later_requests_on_a_kept_alive_connection_are_as_fast_as_the_first_with_two_workers(two_workers, body):
    """The cause was Nagle's algorithm: the listening socket uvicorn 0.54 binds for several workers has
    protocol number 0 (0.55 names TCP), asyncio then skips TCP_NODELAY on its connections, and the
    second write of each response waited for the client's delayed ACK (about 40 ms), on every request
    after the first. Five requests over one connection: the fastest later one is compared, as a busy
    machine (the suite runs in one process per core) may delay any one request by as much, but not
    every one."""
    for _ in range(10):  # warm both workers' prediction path, each request on a connection of its own
        httpx.post(two_workers.url + "/v1/predict", content=body, headers={"content-type": "image/png"})
    conn = http.client.HTTPConnection("127.0.0.1", port_of(two_workers), timeout=30)
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        conn.request("POST", "/v1/predict", body=body, headers={"content-type": "image/png"})
        response = conn.getresponse()
        response.read()
        seconds.append(time.perf_counter() - start)
        assert response.status == 200
    conn.close()
    assert min(seconds[1:]) < seconds[0] + 0.025, [round(s * 1000, 1) for s in seconds]


def test_a_connection_accepted_from_a_socket_of_protocol_0_gets_tcp_nodelay():
    """What the test above checks end to end, where uvicorn itself leaves the cause out (0.55 binds its
    socket naming TCP, so asyncio sets TCP_NODELAY): fashionlab's connections set it on any TCP socket."""
    import asyncio

    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from fashionlab.serve import server

    async def app(scope, receive, send):
        pass

    async def accepted_nodelay(protocol_class) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:  # protocol 0, as uvicorn 0.54's
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            with socket.create_connection(listener.getsockname()):
                conn, _ = listener.accept()
                config = Config(app=app)
                config.load()
                protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
                transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, sock=conn)
                nodelay = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                transport.close()
                return nodelay

    assert asyncio.run(accepted_nodelay(server.connection_protocol())) == 1
    plain = server.connection_protocol().__bases__[-1]  # uvicorn's own protocol, without ConnectionRules
    assert asyncio.run(accepted_nodelay(plain)) == 0  # the cause is there: the check above can fail


def test_the_supervisor_of_two_workers_never_loads_torch_or_the_model(two_workers):
    """The model is checked in a child process that exits before the workers start: the supervisor, which
    lives as long as the server, holds neither torch nor the model (once 250 MiB of a 2-worker server)."""
    maps = Path(f"/proc/{two_workers.proc.pid}/maps").read_text()
    assert "libtorch" not in maps
    children = Path(f"/proc/{two_workers.proc.pid}/task/{two_workers.proc.pid}/children").read_text().split()
    assert sum("libtorch" in Path(f"/proc/{pid}/maps").read_text() for pid in children) == 2  # the workers


def test_two_workers_refuse_a_bad_model_folder_with_its_message_before_starting(tmp_path):
    (tmp_path / "model.json").write_text("{not json")
    proc = run_cli("serve", str(tmp_path), "--workers", "2", "--port", "0", timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{tmp_path / 'model.json'}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "Started server process" not in proc.stderr  # no worker ever started


# --------------------------------------------------------------------------- /metrics

def test_metrics_count_requests_by_route_and_status_and_describe_the_model(one_worker, body):
    url = one_worker.url
    for _ in range(5):
        assert httpx.post(url + "/v1/predict", content=body, headers={"content-type": "image/png"}).status_code == 200
    assert httpx.post(url + "/v1/predict", content=b"junk", headers={"content-type": "image/png"}).status_code == 400
    assert httpx.get(url + "/no/such/path").status_code == 404
    assert httpx.get(url + "/static/app.js").status_code == 200  # a file of the page: a route, not unmatched
    infer = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [3, 28, 28], "data": [0] * (3 * 784)}]}
    assert httpx.post(url + "/v2/models/fashionlab/infer", json=infer).status_code == 200
    scrape = httpx.get(url + "/metrics")
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    samples = metric_samples(scrape.text)
    requests = samples["fashionlab_requests_total"]
    assert requests[(("method", "POST"), ("route", "/v1/predict"), ("status", "200"))] >= 5
    assert requests[(("method", "POST"), ("route", "/v1/predict"), ("status", "400"))] >= 1
    assert requests[(("method", "GET"), ("route", "unmatched"), ("status", "404"))] >= 1  # no series per path
    assert requests[(("method", "GET"), ("route", "/static/{path}"), ("status", "200"))] >= 1
    assert not any(dict(k)["route"] == "unmatched" and dict(k)["status"] == "200" for k in requests)
    assert requests[(("method", "POST"), ("route", "/v2/models/{name}/infer"), ("status", "200"))] >= 1
    latency = samples["fashionlab_request_duration_seconds_bucket"]
    buckets = sorted((float(dict(k)["le"]), v) for k, v in latency.items() if dict(k)["route"] == "/v1/predict")
    assert buckets[-1] == (float("inf"), samples["fashionlab_request_duration_seconds_count"][
        (("route", "/v1/predict"),)]) and all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    assert samples["fashionlab_batch_images_count"][()] >= 1
    assert samples["fashionlab_batch_images_sum"][()] >= 5 + 3  # the predictions' images, at least
    assert samples["fashionlab_queue_images"][()] == 0
    (labels, value), = samples["fashionlab_model_info"].items()
    info = dict(labels)
    assert value == 1 and info["name"] == "fashionlab" and info["backend"] == "torch"
    assert len(info["version"]) == 12 and int(info["version"], 16) >= 0


def test_metrics_with_two_workers_sum_every_worker(two_workers, body):
    """prometheus_client's multiprocess mode: whichever worker answers a scrape reports both workers'
    requests. Fresh connections spread the requests over both workers."""
    def predict_count() -> float:
        samples = metric_samples(httpx.get(two_workers.url + "/metrics").text)
        return samples["fashionlab_requests_total"].get(
            (("method", "POST"), ("route", "/v1/predict"), ("status", "200")), 0.0)

    before = predict_count()
    for _ in range(24):  # a new connection each: the kernel hands them to either worker
        assert httpx.post(two_workers.url + "/v1/predict", content=body,
                          headers={"content-type": "image/png"}).status_code == 200
    counts = {predict_count() for _ in range(6)}  # six scrapes, answered by either worker
    assert counts == {before + 24}
    writers = {path.stem.rsplit("_", 1)[-1] for path in Path(two_workers.metrics_dir).glob("counter_*.db")}
    assert len(writers) == 2, writers  # both workers counted requests
    samples = metric_samples(httpx.get(two_workers.url + "/metrics").text)
    assert len(samples["fashionlab_model_info"]) == 1  # one served model, not one per worker
    assert dict(next(iter(samples["fashionlab_model_info"])))["threads"] == "1"  # the 2 cores shared


# --------------------------------------------------------------------------- timeouts

def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `sock` (reading what it sends), or None if it stayed open."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_half_sent_headers_idle_and_trickling_connections_are_closed(one_worker):
    port = port_of(one_worker)
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Ty")
    idle = socket.create_connection(("127.0.0.1", port))
    trickle = socket.create_connection(("127.0.0.1", port))

    def trickling():  # one header byte every 0.2 s: never a whole head
        for byte in b"GET /ping HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100:
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.2)

    threading.Thread(target=trickling, daemon=True).start()
    for sock in (half, idle, trickle):
        elapsed = closed_within(sock, 10)
        assert elapsed is not None and elapsed < 5, "a stalled connection stayed open"
        sock.close()
    assert httpx.get(one_worker.url + "/ping").status_code == 200


def test_a_stalled_body_gets_a_408_and_the_connection_is_closed(one_worker):
    sock = socket.create_connection(("127.0.0.1", port_of(one_worker)))
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
                 b"Content-Length: 1000\r\n\r\n" + b"\x89PNG\r\n\x1a\n")
    sock.settimeout(10)
    answer = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    sock.close()
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert "stalled" in json.loads(content)["error"]


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(one_worker):
    """--keep-alive-timeout 2 governs between requests, not the 1 s head deadline."""
    sock = socket.create_connection(("127.0.0.1", port_of(one_worker)))
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
    sock.settimeout(10)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    elapsed = closed_within(sock, 10)
    assert elapsed is not None and 1.5 < elapsed < 5, elapsed
    sock.close()


# --------------------------------------------------------------------------- SIGTERM

@pytest.mark.parametrize("workers,passes", [("1", "thread"), ("1", "loop"), ("2", "loop"), ("2", "thread")])
def test_sigterm_answers_requests_in_flight_stops_accepting_and_exits_0(body, workers, passes):
    """Requests wait in the batcher for company (--max-wait-ms 1000) when SIGTERM arrives: each is
    answered, new connections are refused (with one worker, while those requests still wait), and the
    process exits with status 0. Passes on an inference thread or on the event loop (a timer then)."""
    with server_process(str(trained_run()), "--workers", workers, "--passes-on", passes, "--samples", "0",
                        "--max-wait-ms", "1000", startup_timeout=240) as server:
        answers: list[int] = []
        answered_at: list[float] = []

        def predict():
            r = httpx.post(server.url + "/v1/predict", content=body, headers={"content-type": "image/png"},
                           timeout=60)
            answers.append(r.status_code)
            answered_at.append(time.monotonic())

        clients = [threading.Thread(target=predict) for _ in range(3)]
        for client in clients:
            client.start()
        time.sleep(0.3)  # the requests have arrived and wait for their pass
        terminated_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        refused_at = None
        deadline = time.monotonic() + 10
        while refused_at is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=1).close()
                time.sleep(0.05)
            except OSError:
                refused_at = len(answers)
        for client in clients:
            client.join(60)
        assert answers == [200, 200, 200], server.log()
        assert min(answered_at) > terminated_at  # they were in flight when the signal came
        assert refused_at is not None, "new connections were still accepted"
        if workers == "1":  # with two, the supervisor notices the signal within its 0.5 s poll
            assert refused_at < 3, "new connections were accepted while requests were in flight"
        assert server.proc.wait(60) == 0, server.log()
        assert "Traceback" not in server.log()

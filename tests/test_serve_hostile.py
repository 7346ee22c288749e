"""Hostile requests to the service (issue 18, "The service"), against a real server process.

Every malformed body is a 4xx JSON error naming the field; only PNG, JPEG, GIF, WebP, BMP and TIFF
reach Pillow (anything else is a 415 naming its format); a request's decoding is bounded from the
images' headers before any is decoded (413 naming the limit); a broken model does not start, and the
health routes answer 200 only while predictions work. The heavy inputs are built small: a header
claiming a large image, compressed zeros.

The case tables (JSON_CASES, OPEN_INFERENCE_CASES, FORMAT_CASES, BUDGET_CASES) are plain data, so the
same requests can be sent to any server (the before/after measurements of issue 18 used them).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
import struct
import threading
import time
import warnings

import anyio
import httpx
import numpy as np
import pytest
from PIL import Image

from fashionlab import cli, images
from fashionlab.checkpoint import RunError
from fashionlab.predict import Predictor
from fashionlab.serve import ModelService, Settings, create_app, decoding
from fashionlab.serve import service as service_module
from serve_support import blank_png, float_tiff, server_process, trained_run

V2 = "/v2/models/fashionlab/infer"
JSON = {"content-type": "application/json"}
BLANK = np.zeros((28, 28), np.uint8).tolist()


def raw_json(text: str) -> dict:
    return dict(content=text.encode(), headers=JSON)


def deep(levels: int = 100_000) -> str:
    return "[" * levels + "]" * levels


def v2_body(tensor: dict | None = None, **request) -> dict:
    """A valid inference request for one blank image, with `tensor` fields and request fields replaced."""
    good = {"name": "input", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}
    return {"inputs": [{**good, **(tensor or {})}], **request}


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npy_claiming(shape: tuple) -> bytes:
    """A .npy header claiming `shape` of uint8, followed by one image's bytes."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return head.getvalue() + bytes(784)


# --------------------------------------------------------------------------- the case tables
# (name, path, httpx keyword arguments, expected status, words the error must contain)

def json_cases() -> list[tuple]:
    huge_int = "1" + "0" * 5000
    return [
        ("JSON nested 100,000 deep, /v1/predict", "/v1/predict", raw_json('{"array": ' + deep() + "}"), 400, "nested"),
        ("JSON nested 100,000 deep, /invocations", "/invocations", raw_json('{"array": ' + deep() + "}"), 400, "nested"),
        ("JSON nested 100,000 deep, /v1/explain", "/v1/explain", raw_json('{"image": ' + deep() + "}"), 400, "nested"),
        ("JSON nested 100,000 deep, top-level list", "/v1/predict", raw_json(deep()), 400, "nested"),
        ("JSON nested 100,000 deep, Open Inference", V2, raw_json('{"inputs": ' + deep() + "}"), 400, "nested"),
        ("JSON nested 60 deep in a pixel array", "/v1/predict", raw_json('{"array": ' + deep(60) + "}"), 400,
         "not a rectangular array"),
        ("top_k Infinity", "/v1/predict", raw_json(f'{{"array": {BLANK}, "top_k": Infinity}}'), 400, "top_k"),
        ("top_k -Infinity", "/invocations", raw_json(f'{{"array": {BLANK}, "top_k": -Infinity}}'), 400, "top_k"),
        ("top_k NaN", "/v1/predict", raw_json(f'{{"array": {BLANK}, "top_k": NaN}}'), 400, "top_k"),
        ("top_k 1e400 (infinite as a float)", "/v1/predict", raw_json(f'{{"array": {BLANK}, "top_k": 1e400}}'), 400,
         "top_k"),
        ("top_k of 5,001 digits", "/v1/predict", raw_json(f'{{"array": {BLANK}, "top_k": {huge_int}}}'), 400,
         "malformed JSON"),
        ("top_k true", "/v1/predict", dict(json={"array": BLANK, "top_k": True}), 400, "top_k"),
        ("top_k [3]", "/v1/predict", dict(json={"array": BLANK, "top_k": [3]}), 400, "top_k"),
        ("top_k {}", "/v1/predict", dict(json={"array": BLANK, "top_k": {"k": 3}}), 400, "top_k"),
        ("top_k 2.5", "/v1/predict", dict(json={"array": BLANK, "top_k": 2.5}), 400, "top_k"),
        ("top_k a file in a form", "/v1/predict", dict(files=[("file", ("a.npy", npy(np.zeros((28, 28), np.uint8)))),
                                                              ("top_k", ("k.txt", b"3"))]), 400, "top_k"),
        ("pixels true/false", "/v1/predict", dict(json={"array": [[True] * 28] * 28}), 400, "boolean"),
        ("instances of booleans", "/invocations", dict(json={"instances": [[[False] * 28] * 28]}), 400, "boolean"),
        ("pixels mixing numbers and booleans", "/v1/predict", dict(json={"array": [[0] * 27 + [True]] * 28}), 400,
         "boolean"),
        ("pixels null", "/v1/predict", dict(json={"array": [[None] * 28] * 28}), 400, "null"),
        ("pixels objects", "/v1/predict", dict(json={"array": [[{}] * 28] * 28}), 400, "object"),
        ("pixel too large for any integer", "/v1/predict", dict(json={"array": [[10 ** 30] * 28] * 28}), 400,
         "too large"),
        ("pixels Infinity", "/v1/predict", raw_json('{"array": [' + ",".join(["[" + ",".join(["Infinity"] * 28) + "]"]
                                                                          * 28) + "]}"), 400, "infinite"),
        (".npy of booleans", "/v1/predict", dict(content=npy(np.ones((28, 28), bool)),
                                                 headers={"content-type": "application/x-npy"}), 400, "bool"),
        (".npy header claiming 10^400 values", "/v1/predict", dict(content=npy_claiming((10 ** 400,)),
                                                                    headers={"content-type": "application/x-npy"}),
         400, "only 784 bytes"),
        (".npy header claiming 10^4000 x 10^4000", "/invocations", dict(files={"file": ("a.npy", npy_claiming(
            (10 ** 4000, 10 ** 4000)))}), 400, "over 10^7999 bytes"),
        ("image: a number", "/v1/predict", dict(json={"image": 5}), 400, "image"),
        ("images: not a list", "/v1/predict", dict(json={"images": "abc"}), 400, "images"),
        ("JSON body a string", "/v1/predict", dict(json="x"), 400, "got a string"),
    ]


def open_inference_cases() -> list[tuple]:
    def case(name, body, words, status=400):
        return (f"Open Inference: {name}", V2, dict(json=body), status, words)
    return [
        case("parameters a string", v2_body(parameters="x"), "parameters"),
        case("parameters a list", v2_body(parameters=[1]), "parameters"),
        case("parameters.binary_data_output a string", v2_body(parameters={"binary_data_output": "yes"}),
             "binary_data_output"),
        case("outputs 5", v2_body(outputs=5), "outputs"),
        case("outputs a string", v2_body(outputs="label"), "outputs"),
        case("outputs an object", v2_body(outputs={"name": "label"}), "outputs"),
        case("outputs [5]", v2_body(outputs=[5]), "outputs[0]"),
        case("an output named by a list", v2_body(outputs=[{"name": ["label"]}]), "outputs[0].name"),
        case("an unknown output", v2_body(outputs=[{"name": "logits"}]), "requested output"),
        case("an output's parameters 'x'", v2_body(outputs=[{"name": "label", "parameters": "x"}]),
             "outputs[0].parameters"),
        case("an output's binary_data a string", v2_body(outputs=[{"name": "label", "parameters": {"binary_data": "no"}}]),
             "binary_data"),
        case("id a number", v2_body(id=5), "id"),
        ("Open Inference: id NaN (echoed as a bare NaN token before)", V2,
         raw_json(json.dumps(v2_body(id=float("nan")))), 400, "id"),
        case("id an object", v2_body(id={"a": 1}), "id"),
        case("inputs a string", {"inputs": "x"}, "inputs"),
        case("inputs [5]", {"inputs": [5]}, "inputs[0]"),
        case("input name a number", v2_body({"name": 5}), "inputs[0].name"),
        case("input parameters a string", v2_body({"parameters": "x"}), "inputs[0].parameters"),
        case("binary_data_size true", v2_body({"parameters": {"binary_data_size": True}}), "binary_data_size"),
        case("binary_data_size a string", v2_body({"parameters": {"binary_data_size": "784"}}), "binary_data_size"),
        case("binary_data_size negative", v2_body({"parameters": {"binary_data_size": -1}}), "binary_data_size"),
        case("datatype a list", v2_body({"datatype": ["UINT8"]}), "datatype"),
        case("datatype an object", v2_body({"datatype": {"t": 1}}), "datatype"),
        case("datatype BOOL", v2_body({"datatype": "BOOL", "data": [False] * 784}), "datatype"),
        case("shape 10^30", v2_body({"shape": [10 ** 30, 28, 28]}), "do not fill"),
        case("shape 10^400", v2_body({"shape": [10 ** 400]}), "do not fill"),
        case("shape 2^1000 x 2^1000", v2_body({"shape": [2 ** 1000, 2 ** 1000, 28]}), "do not fill"),
        case("shape negative", v2_body({"shape": [-1, 28, 28]}), "shape"),
        case("shape of floats", v2_body({"shape": [1.0, 28, 28]}), "shape"),
        case("shape of 5 dimensions", v2_body({"shape": [1, 1, 1, 28, 28]}), "shape"),
        case("shape a string", v2_body({"shape": "1,28,28"}), "shape"),
        case("data a string", v2_body({"data": "abc"}), "inputs[0].data"),
        case("data an object", v2_body({"data": {"a": 1}}), "inputs[0].data"),
        case("data null", v2_body({"data": None}), "inputs[0].data"),
        case("data of booleans", v2_body({"data": [True] * 784}), "boolean"),
        case("UINT8 data of numeric strings", v2_body({"data": ["7"] * 784}), "string"),
        case("UINT8 data with fractions", v2_body({"data": [0.5] * 784}), "found a number with a fraction"),
        case("UINT8 data of 300", v2_body({"data": [300] * 784}), "do not fit UINT8"),
        case("FP16 data too large", v2_body({"datatype": "FP16", "data": [1e6] * 784}), "infinite"),
        case("ragged data", v2_body({"data": [[0] * 28] * 27 + [[0] * 27]}), "rectangular"),
    ]


def psd_bytes(side: int = 8) -> bytes:
    """A minimal valid grey Photoshop file (Pillow reads it; nothing here may)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 1, side, side, 8, 1)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(side * side)


def saved(fmt: str, mode: str = "L", size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # Pillow deprecates writing some of these (IM); they are only samples here
        warnings.simplefilter("ignore", DeprecationWarning)
        Image.new(mode, size, 0).save(buf, format=fmt)
    return buf.getvalue()


def other_formats() -> dict[str, bytes]:
    """A small file of each format a client might send that is not accepted, with its name in the 415."""
    return {
        "EPS": saved("EPS"), "PDF": b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n", "ICO": saved("ICO"),
        "PSD": psd_bytes(), "SVG": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>',
        "PNM": saved("PPM"), "QOI": saved("QOI", "RGB"), "DDS": saved("DDS"), "XBM": saved("XBM", "1"),
        "SGI": saved("SGI"), "PCX": saved("PCX"), "ICNS": saved("ICNS"), "IM": saved("IM"), "MSP": saved("MSP", "1"),
        "JPEG 2000": saved("JPEG2000"), "AVIF": saved("AVIF"),
    }


def format_cases() -> list[tuple]:
    cases = []
    for name, blob in other_formats().items():
        cases.append((f"{name} as the body", "/v1/predict", dict(content=blob, headers={"content-type": "image/png"}),
                      415, name))
    eps = other_formats()["EPS"]
    cases += [
        ("EPS in a multipart form", "/invocations", dict(files={"file": ("x.png", eps, "image/png")}), 415, "EPS"),
        ("EPS as JSON base64", "/v1/predict", dict(json={"image": base64.b64encode(eps).decode()}), 415, "EPS"),
        ("EPS to /v1/explain", "/v1/explain", dict(content=eps, headers={"content-type": "image/jpeg"}), 415, "EPS"),
        ("bytes of no known format", "/v1/predict", dict(content=b"hello, world", headers={"content-type": "image/png"}),
         400, "not a recognised image format"),
    ]
    return cases


def budget_cases() -> list[tuple]:
    many_pngs = [("file", (f"{i}.png", blank_png(4000), "image/png")) for i in range(480)]
    five = [base64.b64encode(blank_png(4000)).decode()] * 5
    return [
        ("6320x6320 float TIFF (155 KB)", "/v1/predict", dict(content=float_tiff(), headers={"content-type": "image/tiff"}),
         413, "bytes per request"),
        ("multipart of 480 PNGs of 4000x4000", "/invocations", dict(files=many_pngs), 413, "pixels per request"),
        ("JSON of 5 PNGs of 4000x4000", "/v1/predict", dict(json={"images": five}), 413, "pixels per request"),
        ("one PNG of 8000x8000", "/v1/predict", dict(content=blank_png(8000), headers={"content-type": "image/png"}),
         413, "over the limit of 40,000,000"),
    ]


# --------------------------------------------------------------------------- against a real server

@pytest.fixture(scope="module")
def server():
    with server_process(str(trained_run()), "--samples", "0") as srv:
        yield srv


def still_serving(server) -> None:
    assert server.alive(), server.log()
    assert httpx.get(server.url + "/ping").status_code == 200
    r = httpx.post(server.url + "/v1/predict", json={"array": BLANK})
    assert r.status_code == 200, r.text


def check(server, path: str, kwargs: dict, status: int, words: str) -> None:
    r = httpx.post(server.url + path, timeout=60, **kwargs)
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json")
    assert words.lower() in strict_json(r.content)["error"].lower(), r.json()


def strict_json(content: bytes):
    """The answer as JSON, failing on a bare NaN or Infinity token (not JSON, though Python writes them)."""
    return json.loads(content, parse_constant=lambda token: pytest.fail(f"bare {token} token in {content[:200]!r}"))


@pytest.mark.parametrize("name,path,kwargs,status,words", json_cases(), ids=[c[0] for c in json_cases()])
def test_malformed_json_is_a_400_naming_the_field(server, name, path, kwargs, status, words):
    check(server, path, kwargs, status, words)
    still_serving(server)


@pytest.mark.parametrize("name,path,kwargs,status,words", open_inference_cases(),
                         ids=[c[0] for c in open_inference_cases()])
def test_every_open_inference_field_of_a_wrong_type_is_a_400_naming_it(server, name, path, kwargs, status, words):
    check(server, path, kwargs, status, words)


def test_open_inference_accepts_what_it_should(server):
    for body in (v2_body(), v2_body(outputs=[], parameters={}), v2_body({"shape": [28, 28]}),
                 v2_body({"datatype": "FP32", "data": [0.5] * 784}), v2_body(id="r1", parameters=None),
                 v2_body({"data": [[[0] * 28] * 28]}), v2_body(outputs=[{"name": "label", "parameters": {}}])):
        r = httpx.post(server.url + V2, json=body)
        assert r.status_code == 200, (body, r.text[:300])


@pytest.mark.parametrize("name,path,kwargs,status,words", format_cases(), ids=[c[0] for c in format_cases()])
def test_only_accepted_formats_are_decoded(server, name, path, kwargs, status, words):
    check(server, path, kwargs, status, words)


@pytest.mark.parametrize("name,path,kwargs,status,words", budget_cases(), ids=[c[0] for c in budget_cases()])
def test_request_budget_is_enforced_before_decoding(server, name, path, kwargs, status, words):
    check(server, path, kwargs, status, words)
    still_serving(server)


def test_images_within_the_budget_are_still_decoded(server):
    """Four 4000x4000 PNGs (64,000,000 pixels) fit the default budget; a big JPEG decodes in draft mode."""
    four = [("file", (f"{i}.png", blank_png(4000), "image/png")) for i in range(4)]
    r = httpx.post(server.url + "/v1/predict", files=four, timeout=60)
    assert r.status_code == 200 and len(r.json()) == 4, r.text[:300]
    buf = io.BytesIO()
    Image.new("RGB", (6000, 4000), (250, 250, 250)).save(buf, format="JPEG", quality=70)
    r = httpx.post(server.url + "/v1/predict", content=buf.getvalue(), headers={"content-type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200, r.text[:300]


def test_model_description_lists_the_limits(server):
    m = httpx.get(server.url + "/v1/model").json()
    assert (m["max_request_pixels"], m["max_decoded_bytes"]) == (64_000_000, 64 * 1024 * 1024)


# --------------------------------------------------------------------------- in-process: slots, budget, a broken model

NAMES = [f"class{i}" for i in range(10)]


class FakePredictor:
    """Stands in for a loaded model: `outputs(n)` gives its probabilities for n images. It has no
    out-of-distribution detector, as a run made before them whose dataset is not at hand."""

    ood, ood_note = None, "no ood.safetensors and no dataset to calibrate it (a stand-in model)"
    temperature, calibration_note = 1.0, "no calibration.json (a stand-in model)"

    def __init__(self, outputs, class_names=NAMES):
        self.outputs, self.class_names = outputs, list(class_names)

    def probabilities(self, batch, batch_size=1000):
        return self.outputs(len(batch))

    def infer(self, batch, batch_size=1000):
        return self.outputs(len(batch)), np.full(len(batch), np.nan)

    rank = Predictor.rank
    ood_status = Predictor.ood_status
    calibration_status = Predictor.calibration_status


def uniform(n: int) -> np.ndarray:
    return np.full((n, 10), 0.1, np.float32)


@pytest.fixture
def fake_service(tmp_path, monkeypatch):
    """ModelService(settings) over a FakePredictor (the folder only has to exist)."""
    def make(outputs=uniform, class_names=NAMES, **settings):
        predictor = FakePredictor(outputs, class_names)
        monkeypatch.setattr(service_module, "_load", lambda path, s: (predictor, None, "pytorch"))
        cfg = Settings(run=str(tmp_path), samples=0, **settings).checked()
        return ModelService(cfg), predictor
    return make


@pytest.mark.parametrize("outputs,class_names,words", [
    (lambda n: np.full((n, 10), np.nan, np.float32), NAMES, "not finite"),
    (uniform, NAMES[:5], "10 outputs per image but has 5 class names"),
    (lambda n: uniform(1), NAMES, "shape (1, 10)"),
    (lambda n: np.full((n, 10), -0.1, np.float32), NAMES, "not probabilities"),
    (lambda n: (_ for _ in ()).throw(RuntimeError("size mismatch\nmore lines")), NAMES, "RuntimeError: size mismatch"),
], ids=["NaN outputs", "5 names for 10 outputs", "wrong rows", "not probabilities", "raises"])
def test_a_broken_model_is_refused_at_start_up(fake_service, outputs, class_names, words):
    with pytest.raises(RunError, match=re.escape(words)) as caught:
        fake_service(outputs, class_names)
    assert "not serving it" in str(caught.value) and "\n" not in str(caught.value)


def test_real_runs_with_nan_weights_or_too_few_class_names_do_not_start(tmp_path, monkeypatch, capsys):
    """`fashionlab serve` exits 2 with one line naming the problem (the run-folder checks may catch it first)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    import uvicorn
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("a broken model was served"))
    nan_run, names_run = tmp_path / "nan", tmp_path / "names"
    shutil.copytree(trained_run(), nan_run)
    shutil.copytree(trained_run(), names_run)
    with safe_open(str(nan_run / "model.safetensors"), "np") as f:
        meta, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in weights.items()},
              str(nan_run / "model.safetensors"), metadata=meta)
    # as a run whose training diverged: no out-of-distribution detector or temperature could be fitted to
    # these weights (with the healthy run's files left beside them, those are refused first: test_ood,
    # test_calibration)
    (nan_run / "ood.safetensors").unlink()
    (nan_run / "calibration.json").unlink()
    info = json.loads((names_run / "model.json").read_text())
    info["class_names"] = info["class_names"][:5]
    (names_run / "model.json").write_text(json.dumps(info))
    for run, words in ((nan_run, r"NaN|finite"), (names_run, r"class.names")):
        assert cli.main(["serve", str(run), "--samples", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fashionlab serve: error: "), err
        assert re.search(words, err[0]), err


HEALTH_AND_PREDICTIONS = (("GET", "/ping", {}), ("GET", "/v2/health/ready", {}),
                          ("GET", "/v2/models/fashionlab/ready", {}),
                          ("POST", "/v1/predict", dict(json={"array": BLANK})), ("POST", V2, dict(json=v2_body())))


async def _health_and_predictions(app) -> dict[str, httpx.Response]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return {path: await client.request(method, path, **kwargs) for method, path, kwargs in HEALTH_AND_PREDICTIONS}


def test_a_model_that_breaks_while_serving_is_not_reported_healthy(fake_service):
    service, predictor = fake_service()
    app = create_app(service.settings, service)

    def calls():
        return anyio.run(_health_and_predictions, app)

    assert {p: r.status_code for p, r in calls().items()} == dict.fromkeys(calls(), 200)
    predictor.outputs = lambda n: np.full((n, 10), np.nan, np.float32)  # the weights went bad
    for path, r in calls().items():
        assert r.status_code == 503, (path, r.text)
        assert "not finite" in strict_json(r.content)["error"], (path, r.text)
    predictor.outputs = uniform  # recovered: the health routes' self-test passes again
    assert {p: r.status_code for p, r in calls().items()} == dict.fromkeys(calls(), 200)


@pytest.mark.parametrize("passes_on", ["thread", "loop"])
def test_an_image_the_model_cannot_answer_fails_only_its_own_request(fake_service, passes_on):
    """The outputs are checked once per pass, row by row: a request whose image gets NaN probabilities is
    answered 503, and the request that shared its pass gets its answer."""
    service, predictor = fake_service(passes_on=passes_on, max_wait_ms=50)
    passes = []

    def outputs_of(batch, batch_size=1000):  # NaN for images whose first pixel is 255
        passes.append(len(batch))
        probs = uniform(len(batch))
        probs[batch[:, 0, 0] == 255] = np.nan
        return probs, np.full(len(batch), np.nan)

    predictor.infer = outputs_of
    bad, good = np.full((1, 28, 28), 255, np.uint8), np.zeros((2, 28, 28), np.uint8)

    async def both():
        return await asyncio.gather(service.infer(bad), service.infer(good), return_exceptions=True)

    passes.clear()
    failed, answered = asyncio.run(both())
    service.close()
    assert passes == [3]  # one pass held both requests' images
    assert isinstance(failed, service_module.ModelUnavailable) and "not finite" in str(failed)
    probs, scores = answered
    assert np.array_equal(probs, uniform(2)) and np.isnan(scores).all()


async def _calls(app, calls) -> list[httpx.Response]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return [await client.request(method, path, **kwargs) for method, path, kwargs in calls]


def test_a_model_without_a_detector_answers_null_scores_and_says_why(fake_service):
    """Every route still answers; the fields are null, /v1/model says why, and Open Inference neither
    lists nor gives the two outputs (asking for them is a 400 that says why)."""
    service, predictor = fake_service()
    predict, invocations, explain, model, meta, v2, asked = anyio.run(_calls, create_app(service.settings, service), [
        ("POST", "/v1/predict", dict(json={"array": BLANK})), ("POST", "/invocations", dict(json={"array": BLANK})),
        ("POST", "/v1/explain", dict(json={"array": BLANK})), ("GET", "/v1/model", {}),
        ("GET", "/v2/models/fashionlab", {}), ("POST", V2, dict(json=v2_body())),
        ("POST", V2, dict(json=v2_body(outputs=[{"name": "ood_score"}])))])
    for r in (predict, invocations):
        assert strict_json(r.content)[0]["ood_score"] is None and r.json()[0]["unsure"] is None, r.text
    assert explain.json()["ood_score"] is None and explain.json()["unsure"] is None
    assert model.json()["ood"] == {"available": False, "note": predictor.ood_note}
    assert model.json()["calibration"] == {"calibrated": False, "temperature": 1.0, "note": predictor.calibration_note}
    assert [o["name"] for o in meta.json()["outputs"]] == ["probabilities", "class_index", "label"]
    assert [o["name"] for o in v2.json()["outputs"]] == ["probabilities", "class_index", "label"]
    assert asked.status_code == 400 and "no out-of-distribution detector" in asked.json()["error"]


def test_uniform_uploads_of_any_size_are_flagged_unsure(server):
    """A 1x1 image, a uniform 64x64 and a white page all preprocess to a blank 28x28 image: before, it got
    a confident garment label; now every such answer says it is unsure."""
    for size, level in (((1, 1), 128), ((64, 64), 200), ((300, 200), 255)):
        buf = io.BytesIO()
        Image.new("L", size, level).save(buf, format="PNG")
        r = httpx.post(server.url + "/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        assert r.json()[0]["unsure"] is True and r.json()[0]["ood_score"] > 0, (size, r.json())


def test_work_slots_bound_how_many_requests_decode_at_once(fake_service):
    service, _ = fake_service(max_concurrent_decodes=2)
    lock, running, most = threading.Lock(), [0], [0]

    def decode():
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    async def many():
        async with anyio.create_task_group() as tasks:
            for _ in range(16):
                tasks.start_soon(service.work, decode)
    anyio.run(many)
    assert most[0] == 2


def test_request_budget_is_charged_from_every_header_before_any_decoding(monkeypatch):
    monkeypatch.setattr(images, "pil_to_gray", lambda *a, **k: pytest.fail("an image was decoded"))
    settings = Settings(max_request_pixels=3_000_000).checked()
    parts = [(blank_png(1000), "a.png", ""), (blank_png(1000), "b.png", ""), (blank_png(1500), "c.png", "")]
    with pytest.raises(images.ImageTooLargeError, match="c.png: .*4,250,000 pixels in all .* 3,000,000 pixels per request"):
        decoding.decode_blobs(parts, settings)


def test_new_limits_come_from_the_environment():
    env = {"FASHIONLAB_MAX_REQUEST_PIXELS": "1000", "FASHIONLAB_MAX_DECODED_BYTES": "2000",
           "FASHIONLAB_MAX_CONCURRENT_DECODES": "3"}
    s = Settings.from_env(env)
    assert (s.max_request_pixels, s.max_decoded_bytes, s.max_concurrent_decodes) == (1000, 2000, 3)
    with pytest.raises(ValueError, match="max_concurrent_decodes"):
        Settings.from_env({"FASHIONLAB_MAX_CONCURRENT_DECODES": "0"})

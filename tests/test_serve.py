"""The HTTP service as a real process on 127.0.0.1, called by httpx, tritonclient and schemathesis.

One server (PyTorch backend, a small CNN trained on real data) serves the whole module; every
bad-input test ends by checking that it still answers /ping and still classifies.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from fashionlab import images
from fashionlab.predict import Predictor
from fashionlab.serve import Settings

from serve_support import blank_png, real_dataset, server_process, trained_run


@pytest.fixture(scope="module")
def run_dir():
    return trained_run()


@pytest.fixture(scope="module")
def reference(run_dir):
    """The same model in this process, to check the server's answers against."""
    return Predictor.from_run(run_dir, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def server(run_dir):
    with server_process(str(run_dir), "--samples", "10") as srv:
        yield srv


@pytest.fixture(scope="module")
def test_images():
    ds = real_dataset()
    return ds.test_images[:16], ds.test_labels[:16]


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def labels_of(answer) -> list[str]:
    """The top label per image, of a service answer (objects with "classes") or of Predictor.predict."""
    return [(ranked["classes"] if isinstance(ranked, dict) else ranked)[0]["label"] for ranked in answer]


def still_serving(server, image: np.ndarray) -> None:
    assert server.alive(), server.log()
    assert httpx.get(server.url + "/ping").status_code == 200
    r = httpx.post(server.url + "/v1/predict", content=npy_bytes(image), headers={"content-type": "application/x-npy"})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- good requests

def test_predict_accepts_every_body_form_and_matches_the_model(server, reference, test_images):
    x, _ = test_images
    expected = labels_of(reference.predict(x))
    url = server.url
    photo = images.render_photo_style(x[0])  # JPEG, RGB, 224 px plus margins
    photo_label = labels_of(reference.predict(images.preprocess_blob(photo)[None]))
    cases = {
        "npy batch": dict(content=npy_bytes(x), headers={"content-type": "application/x-npy"}),
        "multipart": dict(files={"file": ("a.png", png_bytes(x[1]), "image/png")}),
        "multipart batch": dict(files=[("file", ("a.png", png_bytes(x[1]), "image/png")),
                                       ("file", ("b.npy", npy_bytes(x[2:4]), "application/octet-stream"))]),
        "json base64": dict(json={"image": base64.b64encode(png_bytes(x[0])).decode()}),
        "json base64 list": dict(json={"images": [base64.b64encode(png_bytes(i)).decode() for i in x[:3]]}),
        "json array": dict(json={"array": x[0].tolist()}),
        "json instances of floats": dict(json={"instances": (x[:2] / 255.0).tolist()}),
        "png body": dict(content=png_bytes(x[5]), headers={"content-type": "image/png"}),
        "photo jpeg body": dict(content=photo, headers={"content-type": "image/jpeg"}),
    }
    want = {"npy batch": expected, "multipart": expected[1:2], "multipart batch": expected[1:4],
            "json base64": expected[:1], "json base64 list": expected[:3], "json array": expected[:1],
            "json instances of floats": expected[:2], "png body": expected[5:6], "photo jpeg body": photo_label}
    for name, kwargs in cases.items():
        for path in ("/v1/predict", "/invocations"):
            r = httpx.post(url + path, **kwargs)
            assert r.status_code == 200, (name, path, r.text)
            assert labels_of(r.json()) == want[name], (name, path)


def test_answers_are_sorted_top_k_lists(server, reference, test_images):
    x, _ = test_images
    body = npy_bytes(x[:2])
    r = httpx.post(server.url + "/v1/predict?top_k=4", content=body, headers={"content-type": "application/x-npy"})
    answer = r.json()
    assert [len(a["classes"]) for a in answer] == [4, 4]
    probs, scores = reference.infer(x[:2])
    for image, p, score in zip(answer, probs, scores):
        assert set(image) == {"classes", "ood_score", "unsure"}
        ranked = image["classes"]
        assert [e["score"] for e in ranked] == sorted((e["score"] for e in ranked), reverse=True)
        assert set(ranked[0]) == {"label", "index", "score"}
        assert ranked[0]["index"] == int(p.argmax())
        assert abs(ranked[0]["score"] - float(p.max())) < 1e-4
        assert image["ood_score"] == pytest.approx(score, rel=1e-4)
        assert image["unsure"] is bool(score > reference.ood.threshold)
    r = httpx.post(server.url + "/invocations", json={"array": x[0].tolist(), "top_k": 100})
    assert len(r.json()[0]["classes"]) == len(reference.class_names)  # capped at the number of classes


def test_every_route_carries_the_out_of_distribution_score_and_flag(server, reference, test_images):
    """/v1/predict, /invocations, /v1/explain and Open Inference answer the same score and flag, and a
    garment and an image that is not one get different flags."""
    x, _ = test_images
    candidates = np.concatenate([x, np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)])
    probs, scores = reference.infer(candidates)
    flags = reference.ood.unsure(scores)
    pick = [int(np.flatnonzero(~flags)[0]), int(np.flatnonzero(flags)[-1])]  # a garment, then noise flagged unsure
    batch = candidates[pick]
    for path in ("/v1/predict", "/invocations"):
        answer = httpx.post(server.url + path, content=npy_bytes(batch), headers={"content-type": "application/x-npy"}).json()
        assert [a["unsure"] for a in answer] == [False, True], (path, answer)
        assert [a["ood_score"] for a in answer] == pytest.approx(list(scores[pick]), rel=1e-4)
    for i, want in zip(pick, (False, True)):
        e = httpx.post(server.url + "/v1/explain", content=npy_bytes(candidates[i]),  # arrays are taken as they are
                       headers={"content-type": "application/x-npy"}).json()
        assert e["unsure"] is want and e["ood_score"] == pytest.approx(float(scores[i]), rel=1e-4)
    v2 = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [2, 28, 28], "data": batch.ravel().tolist()}]}
    outputs = {o["name"]: o for o in httpx.post(server.url + "/v2/models/fashionlab/infer", json=v2).json()["outputs"]}
    assert list(outputs) == ["probabilities", "class_index", "label", "ood_score", "unsure"]
    assert outputs["unsure"]["datatype"] == "BOOL" and outputs["unsure"]["data"] == [False, True]
    assert outputs["ood_score"]["data"] == pytest.approx(list(scores[pick]), rel=1e-4)
    only = {**v2, "outputs": [{"name": "unsure"}]}  # the request's selection is honoured
    assert [o["name"] for o in httpx.post(server.url + "/v2/models/fashionlab/infer", json=only).json()["outputs"]] \
        == ["unsure"]
    model = httpx.get(server.url + "/v1/model").json()["ood"]
    assert model["available"] and model["threshold"] == pytest.approx(reference.ood.threshold)
    assert model["false_alarm_rate"] == 0.05 and model["calibrated_on"] == "test images (one half)"
    meta = httpx.get(server.url + "/v2/models/fashionlab").json()
    assert [o["name"] for o in meta["outputs"]][-2:] == ["ood_score", "unsure"]


def test_sagemaker_ping_and_model_description(server, reference):
    assert httpx.get(server.url + "/ping").json()["status"] == "ok"
    m = httpx.get(server.url + "/v1/model").json()
    assert m["class_names"] == reference.class_names and m["backend"] == "torch" and m["saliency"]
    assert m["calibration"] == {"calibrated": True, "temperature": reference.temperature}  # every route's probabilities


def test_explain_gives_input_probabilities_and_saliency(server, reference, test_images):
    x, _ = test_images
    r = httpx.post(server.url + "/v1/explain", files={"file": ("x.png", png_bytes(x[3]), "image/png")})
    assert r.status_code == 200, r.text
    e = r.json()
    assert {"ood_score", "unsure"} <= set(e) and isinstance(e["unsure"], bool)
    assert np.array_equal(np.array(e["input"], dtype=np.uint8), x[3])
    probs = np.array([p["score"] for p in e["probabilities"]])
    assert len(probs) == 10 and abs(probs.sum() - 1) < 1e-4
    assert e["prediction"]["label"] == labels_of(reference.predict(x[3:4]))[0]
    sal = np.array(e["saliency"])
    assert sal.shape == (28, 28) and sal.max() == 255 and sal.min() >= 0


def test_samples_are_real_test_images(server):
    samples = httpx.get(server.url + "/v1/samples").json()["samples"]
    assert len(samples) == 10 and len({s["label"] for s in samples}) == 10  # one per class
    png = httpx.get(server.url + samples[0]["url"])
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (28, 28)
    assert httpx.get(server.url + "/v1/samples/999.png").status_code == 404


def test_one_log_line_per_request(server, test_images):
    marker = "/v1/samples/4242.png"
    httpx.get(server.url + marker)
    httpx.post(server.url + "/v1/predict", content=b"", headers={"content-type": "image/png"})
    # the line is written just after the response has gone out: give the server a moment
    for _ in range(50):
        log = server.log()
        if re.search(r"POST /v1/predict 400 \d+\.\dms", log) and "4242.png 404" in log:
            break
        time.sleep(0.1)
    assert len(re.findall(r"GET /v1/samples/4242\.png 404 \d+\.\dms", log)) == 1
    assert re.search(r"POST /v1/predict 400 \d+\.\dms", log)
    assert "Traceback" not in log


# --------------------------------------------------------------------------- bad requests

def _bad_cases():
    good_png = png_bytes(np.full((60, 40), 200, np.uint8))
    npy = lambda a: npy_bytes(a)  # noqa: E731
    header = {"content-type": "application/x-npy"}
    v2 = "/v2/models/fashionlab/infer"
    lying = json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 28, 28],
                                    "parameters": {"binary_data_size": 784}}]}).encode()
    head = io.BytesIO()  # a valid header for 78 billion pixels, followed by one image's worth of bytes
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": (99999999, 28, 28)})
    huge_npy = head.getvalue() + b"\x00" * 784
    return [
        ("not an image", "/v1/predict", dict(content=b"hello, world", headers={"content-type": "image/png"}), 400, "not a recognised image"),
        ("truncated png", "/v1/predict", dict(content=good_png[: len(good_png) // 2], headers={"content-type": "image/png"}), 400, "truncated or corrupt"),
        ("corrupt jpeg", "/invocations", dict(content=b"\xff\xd8\xff\xe0" + b"\x00" * 200, headers={"content-type": "image/jpeg"}), 400, "image"),
        ("empty body", "/v1/predict", dict(content=b"", headers={"content-type": "image/png"}), 400, "empty request body"),
        ("empty multipart file", "/v1/predict", dict(files={"file": ("e.png", b"", "image/png")}), 400, "empty file"),
        ("multipart without file", "/v1/predict", dict(files={"other": ("e.png", good_png, "image/png")}), 400, "field named 'file'"),
        ("body over 10 MB", "/v1/predict", dict(content=b"\x00" * (10 * 1024 * 1024 + 1), headers={"content-type": "image/png"}), 413, "over the limit"),
        ("decompression bomb", "/invocations", dict(content=blank_png(8000), headers={"content-type": "image/png"}), 413, "pixels"),
        ("wrong content type", "/invocations", dict(content=b"some text", headers={"content-type": "text/plain"}), 415, "not accepted"),
        ("wrong array shape", "/v1/predict", dict(content=npy(np.zeros((3, 32, 32), np.uint8)), headers=header), 400, "array shape"),
        ("wrong array dtype", "/invocations", dict(content=npy(np.array([["a"] * 28] * 28)), headers=header), 400, "dtype"),
        ("pixel values out of range", "/v1/predict", dict(content=npy(np.full((28, 28), 300, np.int32)), headers=header), 400, "[0, 255]"),
        ("npy header claiming a huge array", "/v1/predict", dict(content=huge_npy, headers=header), 400, "only 784 bytes"),
        ("not npy at all", "/v1/predict", dict(content=b"\x93NUMPYjunk", headers=header), 400, ".npy"),
        ("malformed json", "/invocations", dict(content=b'{"image": "abc', headers={"content-type": "application/json"}), 400, "malformed JSON"),
        ("json without an image", "/v1/predict", dict(json={"picture": "x"}), 400, "no 'image'"),
        ("json bad base64", "/v1/predict", dict(json={"image": "not base64!!"}), 400, "base64"),
        ("json ragged array", "/v1/predict", dict(json={"array": [[1, 2], [3]]}), 400, "array"),
        ("json strings as pixels", "/v1/predict", dict(json={"array": [["x"] * 28] * 28}), 400, "numbers"),
        ("top_k zero", "/v1/predict?top_k=0", dict(json={"array": np.zeros((28, 28)).tolist()}), 400, "top_k"),
        ("top_k not a number", "/v1/predict?top_k=lots", dict(json={"array": np.zeros((28, 28)).tolist()}), 422, "top_k"),
        ("v2 unknown model", "/v2/models/nope/infer", dict(json={"inputs": []}), 404, "not found"),
        ("v2 malformed json", v2, dict(content=b"{", headers={"content-type": "application/json"}), 400, "malformed JSON"),
        ("v2 wrong datatype", v2, dict(json={"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}), 400, "datatype"),
        ("v2 wrong shape", v2, dict(json={"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 10, 10], "data": [0] * 100}]}), 400, "array shape"),
        ("v2 data does not fill shape", v2, dict(json={"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 5}]}), 400, "do not fill"),
        ("v2 binary size lies", v2, dict(content=lying + b"\x00" * 10, headers={"inference-header-content-length": str(len(lying))}),
         400, "binary"),
        ("unknown path", "/v1/nothing", dict(content=b"x"), 404, "Not Found"),
    ]


@pytest.mark.parametrize("name,path,kwargs,status,words", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(server, test_images, name, path, kwargs,
                                                                        status, words):
    r = httpx.post(server.url + path, timeout=60, **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert words.lower() in r.json()["error"].lower(), r.json()
    still_serving(server, test_images[0][0])


def test_chunked_body_over_the_limit_is_refused(server, test_images):
    """No Content-Length to check up front: the limit is enforced while the body streams in."""
    def chunks():
        for _ in range(11):
            yield b"\x00" * (1024 * 1024)
    r = httpx.post(server.url + "/v1/predict", content=chunks(), headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 413, r.text
    still_serving(server, test_images[0][0])


def test_settings_come_from_arguments_then_environment():
    env = {"SAGEMAKER_BIND_TO_PORT": "9001", "SAGEMAKER_MODEL_SERVER_WORKERS": "3", "FASHIONLAB_MAX_PIXELS": "1000"}
    s = Settings.from_env(env)
    assert (s.port, s.workers, s.max_pixels, str(s.model_path)) == (9001, 3, 1000, "/opt/ml/model")
    assert Settings.from_env(env, port=7000, run="runs/x").port == 7000
    with pytest.raises(ValueError, match="SAGEMAKER_BIND_TO_PORT"):
        Settings.from_env({"SAGEMAKER_BIND_TO_PORT": "eighty"})
    with pytest.raises(ValueError, match="backend"):
        Settings.from_env({}, backend="tensorflow")


# --------------------------------------------------------------------------- Open Inference, stock client

def test_tritonclient_http_calls_the_open_inference_api(server, reference, test_images):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    x, _ = test_images
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fashionlab")
    meta = client.get_model_metadata("fashionlab")
    assert meta["inputs"][0]["name"] == "input" and meta["outputs"][0]["shape"] == [-1, 10]
    expected = reference.probabilities(x)
    for binary in (True, False):  # the client's default binary tensor extension, and plain JSON
        inp = triton.InferInput("input", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x, binary_data=binary)
        outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "class_index", "label")]
        result = client.infer("fashionlab", [inp], outputs=outputs, request_id="req-1")
        probs = result.as_numpy("probabilities")
        assert probs.shape == (len(x), 10) and np.abs(probs - expected).max() < 1e-4
        assert list(result.as_numpy("class_index")) == list(expected.argmax(1))
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
        assert labels == [reference.class_names[i] for i in expected.argmax(1)]
        assert result.get_response()["id"] == "req-1" and result.get_response()["model_name"] == "fashionlab"
    floats = triton.InferInput("input", [2, 1, 28, 28], "FP32")  # the model's own layout, pixels in [0, 1]
    floats.set_data_from_numpy((x[:2, None] / 255.0).astype(np.float32))
    assert list(client.infer("fashionlab", [floats]).as_numpy("class_index")) == list(expected[:2].argmax(1))
    versioned = client.infer("fashionlab", [floats], model_version="1")  # /v2/models/fashionlab/versions/1/infer
    assert list(versioned.as_numpy("class_index")) == list(expected[:2].argmax(1))
    assert client.is_model_ready("fashionlab", "1") and not client.is_model_ready("fashionlab", "2")
    with pytest.raises(InferenceServerException, match="not found"):
        client.infer("other-model", [inp])
    client.close()


# --------------------------------------------------------------------------- fuzzing the OpenAPI schema

def test_openapi_schema_fuzzing_finds_no_server_errors(server):
    """A bounded schemathesis run over every operation: client mistakes must never be 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    seen: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=8, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def fuzz(case):
            response = case.call(timeout=30)
            seen.setdefault(op.label, set()).add(response.status_code)
            assert response.status_code < 500, f"{op.label}: {response.status_code} {response.text[:300]}"
        fuzz()
    assert server.alive()
    assert any(code < 300 for code in seen["POST /v1/predict"]), seen  # the fuzzer reached the model too
    assert any(400 <= code < 500 for code in seen["POST /invocations"]), seen


# --------------------------------------------------------------------------- the web page in Chromium

def test_web_page_in_chromium_classifies_an_uploaded_photo_and_a_sample(server, reference, test_images, tmp_path):
    from browser import chromium_page

    x, _ = test_images
    photo = tmp_path / "garment.jpg"
    photo.write_bytes(images.render_photo_style(x[7]))  # a product-photo-style JPEG, as a user would have
    expected = labels_of(reference.predict(images.preprocess_blob(photo.read_bytes())[None]))[0]
    with chromium_page() as (page, problems):
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(server.url + "/")
        page.wait_for_selector("#samples button")
        page.set_input_files("#file", str(photo))
        page.wait_for_function("document.querySelector('#status').textContent === 'Done.'", timeout=30_000)
        assert page.inner_text("#prediction") == expected
        bars = page.query_selector_all("#bars .bar")
        assert [b.get_attribute("data-label") for b in bars] == reference.class_names
        # the 28x28 input and the saliency overlay were drawn: their canvases are not blank
        drawn = page.evaluate("""() => ['input-view', 'saliency-view'].map(id => {
            const c = document.getElementById(id), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let lit = 0; for (let i = 0; i < d.length; i += 4) lit += (d[i] + d[i + 1] + d[i + 2]) > 30;
            return lit; })""")
        assert all(n > 1000 for n in drawn), drawn
        # a sample test image: its true class is on the button; the page shows the model's answer for it
        button = page.query_selector_all("#samples button")[1]
        page.evaluate("document.querySelector('#status').textContent = ''")
        button.click()
        page.wait_for_function("document.querySelector('#status').textContent === 'Done.'", timeout=30_000)
        samples = httpx.get(server.url + "/v1/samples").json()["samples"]
        sample_png = httpx.get(server.url + samples[1]["url"]).content
        assert page.inner_text("#prediction") == labels_of(reference.predict(images.preprocess_blob(sample_png)[None]))[0]
        assert page.is_hidden("#ood-mark") and "looks like a garment" in page.inner_text("#ood-line")
        # a blank page (a uniform photo preprocesses to one): the visible "not a garment / unsure" mark
        assert reference.predict(np.zeros((1, 28, 28), np.uint8))[0].unsure
        blank = tmp_path / "blank.png"
        Image.new("L", (120, 90), 230).save(blank)
        page.evaluate("document.querySelector('#status').textContent = ''")
        page.set_input_files("#file", str(blank))
        page.wait_for_function("document.querySelector('#status').textContent === 'Done.'", timeout=30_000)
        assert page.is_visible("#ood-mark") and "Not a garment?" in page.inner_text("#ood-mark")
        assert "out-of-distribution score" in page.inner_text("#ood-detail")
        # an unreadable file gets the server's message on the page, not a broken page
        bad = tmp_path / "notes.png"
        bad.write_bytes(b"not really a png")
        page.set_input_files("#file", str(bad))
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('Error 400')", timeout=30_000)
    assert problems["page"] == [] and problems["failed"] == []
    assert requested and all(u.startswith(server.url + "/") or u.startswith("data:") for u in requested), requested
    # the 400 above is logged by Chromium as a failed resource load; nothing else may be
    assert all("400" in m for m in problems["console"]), problems["console"]

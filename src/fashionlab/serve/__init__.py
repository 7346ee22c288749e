"""The HTTP service: a JSON API, the SageMaker and Open Inference (KServe v2) contracts, a web page.

A thin shell over the library: images.py turns bodies into (N, 28, 28) uint8 batches, a
predictor (predict.Predictor on PyTorch, export.OnnxPredictor on ONNX Runtime) classifies them in
forward passes shared by concurrent requests, loaded once when the app is created and checked on
known images before it is served. Settings
come from one place (Settings: arguments, then environment, then defaults). Every client mistake
is a 4xx JSON error {"error": "..."}; what a request may cost is bounded before it is spent.

Modules
    settings      Settings: every setting once, from arguments and environment variables, range-checked
    service       ModelService: the loaded, self-tested model, shared by every router; its work slots
    batching      Batcher: concurrent requests' images gathered into one forward pass on one inference
                  thread; identical_passes: passes that keep each image's answer bit-identical
    metrics       GET /metrics: Prometheus metrics (multiprocess mode with several workers)
    decoding      request bodies -> uint8 images within the request's budget; strict JSON; ClientError
    routing       bind(): a plain route function with its service and settings, as an endpoint
    json_api      POST /v1/predict (image body, multipart `file`, JSON base64 or arrays, .npy; ?top_k=),
                  POST /v1/explain (one image -> preprocessed input, all probabilities, saliency), GET /v1/model
    web           GET / (the page in static/), /static, GET /v1/samples[/{i}.png] (its test images)
    sagemaker     GET /ping, POST /invocations, GET /execution-parameters (SageMaker inference contract)
    openinference GET /v2, /v2/health/{live,ready}, /v2/models/{name}[/ready], POST /v2/models/{name}/infer
                  (each model route also under /versions/1), and the protocol's codec
    app           create_app (the routers, error handlers, request guard), prepared, app_from_env
    server        run (uvicorn: its connections, worker processes, timeouts, SIGTERM); the model checked in
                  a child process, so a supervisor of several workers never loads torch

The names below load on first use: `fashionlab serve --workers N`'s supervisor imports only server.py.
"""

from ..lazy import exports

# public name -> the module that defines it
_PUBLIC = {"ClientError": "decoding", "decode_blob": "decoding", "read_batch": "decoding", "ModelService": "service",
           "Settings": "settings", "app_from_env": "app", "create_app": "app", "run": "server"}

__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = exports(__name__, _PUBLIC, globals())

"""The `fashionlab` command: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__

def _user_errors():
    from .errors import UserError
    return (UserError, ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError)


def _message(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


# --------------------------------------------------------------------------- shared options

def _data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="folder with the four IDX files (.gz or decompressed); searched first")
    g.add_argument("--offline", action="store_true", default=None,
                   help="never download (also FASHIONLAB_OFFLINE=1)")
    g.add_argument("--class-names", help="comma-separated class names, or a file with one per line: "
                                         "use --data-dir as a custom IDX dataset (no reference checksums)")


def _class_names(value: str | None) -> list[str] | None:
    if not value:
        return None
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [n.strip() for n in value.split(",") if n.strip()]
    return names


def load_data(args, quiet: bool = False):
    from . import data
    names = _class_names(getattr(args, "class_names", None))
    if names and not args.data_dir:
        raise ValueError("--class-names describes a custom dataset: give its folder with --data-dir")
    spec = data.custom_spec(names) if names else data.FASHION_MNIST
    return data.load(spec, data_dir=args.data_dir, offline=args.offline,
                     progress=None if quiet else (lambda m: print(m, file=sys.stderr)))


def _runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="auto: bf16 autocast and channels_last where the CPU or GPU supports it")


def _key_values(text: str | None, flag: str) -> dict:
    """'a=1,b=[3,5],c=max' -> {'a': 1, 'b': [3, 5], 'c': 'max'} (values parsed as JSON when they can be)."""
    if not text:
        return {}
    out = {}
    for part in _split_top(text):
        if "=" not in part:
            raise ValueError(f"{flag} {text!r}: expected key=value pairs separated by commas, got {part!r}")
        key, value = part.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets, so list values survive."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in parts + [cur] if p.strip()]


# --------------------------------------------------------------------------- commands

def cmd_data(args) -> int:
    import numpy as np
    ds = load_data(args)
    print(f"dataset      {ds.name}")
    print(f"source       {ds.source}")
    print(f"verified     {ds.verification}")
    for split, x, y in (("train", ds.train_images, ds.train_labels), ("test", ds.test_images, ds.test_labels)):
        print(f"{split:<12} images {tuple(x.shape)} {x.dtype}, pixels {int(x.min())}..{int(x.max())}; "
              f"labels {tuple(y.shape)} {y.dtype}")
    counts_tr = np.bincount(ds.train_labels, minlength=ds.num_classes)
    counts_te = np.bincount(ds.test_labels, minlength=ds.num_classes)
    print(f"\n{'class':<4} {'name':<14} {'train':>7} {'test':>6}")
    for i, name in enumerate(ds.class_names):
        print(f"{i:<4} {name:<14} {counts_tr[i]:>7} {counts_te[i]:>6}")
    return 0


def cmd_models(args) -> int:
    from . import models
    print(f"{'name':<14} {'family':<9} {'params':>11}  origin")
    for name, entry in models.MODELS.items():
        n = models.count_params(models.build_model(name))
        print(f"{name:<14} {entry.family:<9} {n:>11,}  {entry.origin}")
    if args.summary:
        rows = models.summary(models.build_model(args.summary))
        print(f"\n{args.summary}:\n{'layer':<12} {'type':<12} {'output shape':<18} {'params':>10}")
        for r in rows:
            frozen = "  frozen" if r["params"] and not r["trainable"] else ""
            print(f"{r['layer']:<12} {r['type']:<12} {str(tuple(r['output_shape'])):<18} {r['params']:>10,}{frozen}")
        total, trainable = sum(r["params"] for r in rows), sum(r["trainable"] for r in rows)
        print(f"total params {total:,}: trainable {trainable:,}, non-trainable {total - trainable:,}")
    return 0


def cmd_recipes(args) -> int:
    from .recipes import RECIPES
    for r in RECIPES.values():
        ref = ", ".join(f"{m} {a:.2%}" for m, a in r.reference.items()) or "none"
        print(f"{r.name}\n  {r.description}\n  models: {', '.join(r.models)}; reported: {ref}")
    return 0


def train_config_from_args(args):
    from .train import make_config
    return make_config(
        recipe=args.recipe, model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
        val_split=args.val_split, patience=args.patience, monitor=args.monitor, ema=args.ema,
        sam_rho=args.sam_rho, sam_start=args.sam_start,
        tta_flip=args.tta_flip, tta_shift=args.tta_shift, precise_bn=args.precise_bn, seed=args.seed,
        subset=args.subset, device=args.device, precision=args.precision,
        augment=_key_values(args.augment, "--augment") or None,
        model_args=_key_values(args.model_arg, "--model-arg") or None,
        class_names=_class_names(args.class_names),
    )


def cmd_train(args) -> int:
    from . import train
    if args.resume:
        train.resume(args.resume, quiet=args.quiet, data_dir=args.data_dir, offline=args.offline)
        run_dir = Path(args.resume)
    else:
        cfg = train_config_from_args(args)
        run_dir = Path(args.out) if args.out else train.default_run_dir(cfg.model)
        train.train(cfg, run_dir, quiet=args.quiet, data_dir=args.data_dir, offline=args.offline)
    if not getattr(args, "no_report", False):
        from . import report
        path = report.write_run_report(run_dir, data_dir=args.data_dir, offline=args.offline)
        if not args.quiet:
            print(f"report: {path}")
    return 0


def cmd_evaluate(args) -> int:
    from . import checkpoint, evaluate
    from .device import resolve
    from .train import TrainConfig
    model, info = checkpoint.load_model(args.run)
    saved = checkpoint.read_json(Path(args.run) / "config.json")
    args.class_names = args.class_names or (",".join(saved["class_names"]) if saved.get("class_names") else None)
    ds = load_data(args)
    rt = resolve(args.device or saved.get("device", "auto"), args.precision or info.get("precision", "auto"),
                 conv_model=info["architecture"].get("channels_last", True))
    import torch
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(rt.device)
    m = evaluate.evaluate_model(model, ds.test_images, ds.test_labels, ds.class_names, rt,
                                saved.get("eval_batch_size", TrainConfig.eval_batch_size), info.get("tta_flip", False),
                                info.get("tta_shift", 0))
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"test accuracy {m['test_accuracy']:.4f}   loss {m['test_loss']:.4f}   ECE {m['ece']:.4f}\n")
    print(f"{'class':<14} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}")
    for name, s in m["per_class"].items():
        print(f"{name:<14} {s['precision']:>9.4f} {s['recall']:>7.4f} {s['f1']:>7.4f} {s['support']:>8}")
    print("\nconfusion matrix (rows = true class, columns = predicted):")
    for name, row in zip(ds.class_names, m["confusion_matrix"]):
        print(f"{name:<14} " + " ".join(f"{v:>5}" for v in row))
    print("\nmost confused: " + "; ".join(f"{p['true']} -> {p['predicted']} ({p['count']})" for p in m["most_confused"]))
    stored = Path(args.run) / "metrics.json"
    if stored.exists():
        ref = checkpoint.read_json(stored)
        same = abs(ref["test_accuracy"] - m["test_accuracy"]) < 1e-9 and abs(ref["test_loss"] - m["test_loss"]) < 1e-6
        print(f"\n{'matches' if same else 'DIFFERS FROM'} {stored} (accuracy {ref['test_accuracy']:.4f}, loss {ref['test_loss']:.4f})")
    return 0


def cmd_predict(args) -> int:
    from . import predict
    model_run = predict.Predictor.from_run(args.run, device=args.device or "auto")
    if args.out or any(Path(p).is_dir() for p in args.images):
        return _predict_many(model_run, args)
    for path in args.images:
        images = predict.images.load_images(path)
        for i, ranked in enumerate(model_run.predict(images, top_k=args.top_k)):
            label = f"{path}[{i}]" if len(images) > 1 else str(path)
            print(label + ": " + ", ".join(f"{r['label']} {r['score']:.3f}" for r in ranked))
    return 0


def _predict_many(model_run, args) -> int:
    """Folders (and files) in batches, with a progress bar; a CSV with --out, else one line per image."""
    from . import predict
    files = predict.expand_inputs(args.images)
    if not files:
        raise ValueError(f"no image or .npy files in {', '.join(args.images)}")
    k = min(args.top_k, len(model_run.class_names))
    rows = predict.predict_files(model_run, files, k, progress=not args.quiet)
    if args.out:
        done, errors = predict.write_predictions_csv(rows, args.out, k)
        print(f"{done} images from {len(files)} files classified -> {args.out}"
              + (f"; {errors} files could not be read (see the error column)" if errors else ""), file=sys.stderr)
    else:
        errors = 0
        for path, item, ranked, err in rows:
            if ranked is None:
                errors += 1
                print(f"{path}: error: {err}", file=sys.stderr)
            else:
                print(f"{path}[{item}]: " + ", ".join(f"{r['label']} {r['score']:.3f}" for r in ranked))
    return 1 if errors else 0


def cmd_serve(args) -> int:
    from . import serve
    settings = serve.Settings.from_env(
        run=args.run, backend=args.backend, host=args.host, port=args.port, workers=args.workers,
        device=args.device, threads=args.threads, max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels,
        model_name=args.model_name, samples=args.samples, data_dir=args.data_dir)
    serve.run(settings)
    return 0


def cmd_export(args) -> int:
    from . import export
    if args.format != "onnx":
        raise ValueError(f"--format {args.format!r}: only onnx is supported")
    saved = Path(args.run) / "config.json"
    if not args.class_names and saved.is_file():
        from . import checkpoint
        names = checkpoint.read_json(saved).get("class_names")
        args.class_names = ",".join(names) if names else None
    ds = load_data(args, quiet=True)
    n = min(args.parity_images, len(ds.test_images))
    result = export.export_onnx(args.run, ds.test_images[:n], args.out, args.tolerance)
    print(f"wrote {result['path']} ({result['bytes']:,} bytes): parity on {result['images']} test images: "
          f"max |dp| {result['max_abs_prob_diff']:.2e} (tolerance {result['tolerance']:g}), "
          f"top-1 mismatches {result['top1_mismatches']}")
    return 0


def cmd_package(args) -> int:
    from . import export
    result = export.package(args.run, args.out)
    print(f"wrote {result['path']} ({result['bytes']:,} bytes): {', '.join(result['files'])}")
    return 0


def cmd_sweep(args) -> int:
    from . import sweep
    from .train import TrainingInterrupted
    spec = sweep.load_spec(args.spec, folder=args.out)
    try:
        t = sweep.run_sweep(spec, args.storage, workers=args.workers, heartbeat_interval=args.heartbeat_interval,
                            grace_period=args.grace_period, max_retry=args.max_retry, threads=args.threads,
                            worker_only=args.worker_only, quiet=args.quiet)
    except TrainingInterrupted as e:
        print(f"\nfashionlab sweep: {e}; the trial is queued again: run the same command to continue",
              file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\nfashionlab sweep: interrupted; run the same command to continue", file=sys.stderr)
        return 130
    if args.worker_only:
        return 0
    if not t.finished:
        print(f"fashionlab sweep: stopped with {t.total - t.done - t.failed} of {t.total} trainings not done; "
              f"run the same command to continue", file=sys.stderr)
        return 1
    if not args.no_report:
        from . import sweep_report
        res, path = sweep_report.write_report(spec, args.storage)
        print(sweep_report.text_table(res))
        print(f"\nreport: {path}")
    return 1 if t.failed else 0


def cmd_sweep_report(args) -> int:
    from . import sweep, sweep_report
    spec = sweep.load_spec(args.spec, folder=args.out)
    res, path = sweep_report.write_report(spec, args.storage, args.html)
    print(sweep_report.text_table(res))
    if args.markdown:
        print("\n" + sweep_report.markdown_table(res))
    print(f"\nreport: {path}")
    return 0


def cmd_report(args) -> int:
    from . import report
    path = report.write_run_report(args.run, out=args.out, with_explain=not args.no_explain,
                                   data_dir=args.data_dir, offline=args.offline, device=args.device or "auto")
    print(f"report: {path}")
    return 0


def cmd_explain(args) -> int:
    from . import explain, report
    ds = report.dataset_for_run(args.run, args.data_dir, args.offline)
    path = explain.write_explanation(args.run, ds, out=args.out, device=args.device or "auto")
    print(f"explanation: {path}")
    return 0


def cmd_explore(args) -> int:
    from . import explore
    path = explore.write_exploration(load_data(args), args.out)
    print(f"exploration: {path}")
    return 0


def cmd_study(args) -> int:
    from . import study
    overrides = dict(epochs=args.epochs, subset=args.subset, device=args.device, precision=args.precision)
    out = args.out or f"studies/{args.name}"
    from .train import TrainingInterrupted
    try:
        result = study.run_study(args.name, out, seeds=args.seeds, overrides=overrides,
                                 run_reports=not args.no_run_reports, data_dir=args.data_dir, offline=args.offline)
    except TrainingInterrupted as e:
        again = " ".join(a for a in sys.argv[1:]) if sys.argv[1:] and sys.argv[1] == "study" else f"study {args.name} --out {out}"
        print(f"\nfashionlab study: {e}; finished runs are kept: run `fashionlab {again}` again to continue",
              file=sys.stderr)
        return 128 + e.signum
    print("\n".join(study.summary_lines(result["summary"])))
    print(f"\ntrained {len(result['trained'])} run(s), reused {len(result['reused'])}; report: {result['report']}")
    return 0


def cmd_compare(args) -> int:
    from . import study
    page, summary = study.write_comparison(args.runs, args.out, title=args.title or "Comparison of runs")
    print("\n".join(study.summary_lines(summary)))
    print(f"\nreport: {page}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fashionlab", description="Fast, reproducible image classification on Fashion-MNIST: data, models, "
        "training, evaluation, reports, sweeps and serving.")
    parser.add_argument("--version", action="version", version=f"fashionlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="find, verify and describe the dataset")
    _data_options(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("models", help="list registered models with parameter counts")
    p.add_argument("--summary", metavar="MODEL", help="also print one model's layers, output shapes and parameters")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("recipes", help="list training recipes and the figures their studies reported")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("train", help="train a model and write a run folder")
    p.add_argument("--model", help="registered model name (see `fashionlab models`)")
    p.add_argument("--model-arg", metavar="K=V,...", help="override model arguments, e.g. dropout=0.3,channels=[16,32]")
    p.add_argument("--recipe", help="named preset (see `fashionlab recipes`); explicit flags override it")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"])
    p.add_argument("--momentum", type=float)
    p.add_argument("--nesterov", action="store_true", default=None)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--schedule", choices=["constant", "cosine", "onecycle"])
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--val-split", type=float, help="fraction of training images held out for validation")
    p.add_argument("--patience", type=int, help="early stopping after this many epochs without improvement")
    p.add_argument("--monitor", choices=["val_accuracy", "val_loss"])
    p.add_argument("--augment", metavar="K=V,...", help="e.g. flip=0.5,crop=2,rotate=10,scale=0.1,erase=0.25")
    p.add_argument("--ema", type=float, help="evaluate an exponential moving average of the weights (decay)")
    p.add_argument("--sam-rho", type=float, metavar="RHO",
                   help="sharpness-aware minimisation: gradients at the steepest point within RHO (0.05-0.1); "
                        "a second forward and backward per step")
    p.add_argument("--sam-start", type=float, metavar="FRACTION", help="turn SAM on after this fraction of the run")
    p.add_argument("--tta-flip", action="store_true", default=None, help="average predictions with mirror images")
    p.add_argument("--tta-shift", type=int, default=None, metavar="PIXELS",
                   help="also average with copies moved 1 to PIXELS pixels up, down, left and right")
    p.add_argument("--precise-bn", type=int, metavar="N",
                   help="recompute BatchNorm statistics from N training images before each evaluation")
    p.add_argument("--seed", type=int)
    p.add_argument("--subset", type=int, metavar="N", help="train on a stratified subset of N training images")
    p.add_argument("--out", help="run folder (default runs/<time>-<model>)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    p.add_argument("--no-report", action="store_true", help="do not write report.html after training")
    _runtime_options(p)
    _data_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a run on the test set")
    p.add_argument("run")
    p.add_argument("--json", action="store_true", help="print all metrics as JSON")
    _runtime_options(p)
    _data_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify PNG/JPEG images or .npy arrays with a trained run")
    p.add_argument("run")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None)
    p.add_argument("--out", metavar="CSV", help="write one CSV row per image (folders are searched for images)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="HTTP service: web page, JSON API, SageMaker and Open Inference contracts")
    p.add_argument("run", nargs="?", help="run folder (default: $FASHIONLAB_RUN, else /opt/ml/model as on SageMaker)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; $FASHIONLAB_HOST)")
    p.add_argument("--port", type=int, help="port (default 8080; $SAGEMAKER_BIND_TO_PORT, $FASHIONLAB_PORT)")
    p.add_argument("--backend", choices=["torch", "onnx"], help="PyTorch, or ONNX Runtime on RUN/model.onnx")
    p.add_argument("--workers", type=int, help="processes (default 1; $SAGEMAKER_MODEL_SERVER_WORKERS)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None)
    p.add_argument("--threads", type=int, help="threads per inference call (default: all cores; 1 often serves "
                                               "concurrent requests faster; $FASHIONLAB_THREADS)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 10 MB)")
    p.add_argument("--max-pixels", type=int, help="largest decoded image (default 40 megapixels)")
    p.add_argument("--model-name", help="model name in the Open Inference API (default fashionlab)")
    p.add_argument("--samples", type=int, help="test images offered on the web page (default 20; 0 for none)")
    p.add_argument("--data-dir", help="dataset folder for the web page's sample images")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a run to ONNX after a parity check against PyTorch")
    p.add_argument("run")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", help="output file (default RUN/model.onnx)")
    p.add_argument("--parity-images", type=int, default=1000, help="test images compared (default 1000)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed probability difference")
    _data_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("package", help="write the model.tar.gz SageMaker expects")
    p.add_argument("run")
    p.add_argument("--out", help="output file (default RUN/model.tar.gz)")
    p.set_defaults(func=cmd_package)

    p = sub.add_parser("sweep", help="run a controlled experiment (a spec file) on Optuna storage, with any number of workers")
    p.add_argument("spec", help="experiment spec (TOML), e.g. experiments/conv-layers.toml")
    p.add_argument("--storage", metavar="URL", help="Optuna RDB storage shared by all workers (default: a SQLite "
                   "file in the experiment folder); e.g. postgresql://user:pass@host/db for many machines")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument("--out", metavar="DIR", help="experiment folder (default: the spec's folder, runs/sweeps/<name>)")
    p.add_argument("--heartbeat-interval", type=int, default=10, metavar="S",
                   help="seconds between a running trial's heartbeats (default 10)")
    p.add_argument("--grace-period", type=int, default=30, metavar="S",
                   help="a trial silent this long is failed and queued again (default 30)")
    p.add_argument("--max-retry", type=int, default=2, help="times a failed point is queued again (default 2)")
    p.add_argument("--threads", type=int, help="CPU threads per worker (default: cores / workers when workers > 1)")
    p.add_argument("--no-report", action="store_true", help="do not write the report when the sweep is done")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--worker-only", action="store_true", help=argparse.SUPPRESS)  # a child of --workers N
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("sweep-report", help="tables, tests and an HTML report of a sweep's results")
    p.add_argument("spec")
    p.add_argument("--storage", metavar="URL", help="the storage the sweep used (default: its SQLite file)")
    p.add_argument("--out", metavar="DIR", help="experiment folder, if the sweep used --out")
    p.add_argument("--html", metavar="PATH", help="where to write the report (default <folder>/report.html)")
    p.add_argument("--markdown", action="store_true", help="also print the per-level table as Markdown")
    p.set_defaults(func=cmd_sweep_report)

    p = sub.add_parser("report", help="write a run's report.html (figures embedded, PNGs beside it)")
    p.add_argument("run")
    p.add_argument("--out", help="HTML file to write (default RUN/report.html)")
    p.add_argument("--no-explain", action="store_true", help="leave out the look inside the model (faster)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None)
    _data_options(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("explain", help="filters, feature maps, Grad-CAM/saliency and embeddings of a run's model")
    p.add_argument("run")
    p.add_argument("--out", help="HTML file to write (default RUN/explain.html)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None)
    _data_options(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("explore", help="exploration report of the dataset: counts, samples, means, histograms")
    p.add_argument("--out", default="eda.html", help="HTML file to write (PNG figures go beside it)")
    _data_options(p)
    p.set_defaults(func=cmd_explore)

    p = sub.add_parser("study", help="train a study's models over several seeds and compare them in one report")
    p.add_argument("name", help="study name: dense-vs-conv, cnn-vs-rnn or zoo")
    p.add_argument("--seeds", type=int, default=3, help="runs per model, seeds offset from the recipe's (default 3)")
    p.add_argument("--out", help="study folder (default studies/<name>); finished runs in it are reused")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (quick looks)")
    p.add_argument("--subset", type=int, metavar="N", help="train on a stratified subset of N images (quick looks)")
    p.add_argument("--no-run-reports", action="store_true", help="skip each run's report.html (faster)")
    _runtime_options(p)
    _data_options(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("compare", help="compare finished runs side by side (mean and std over runs of a model)")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--out", default="compare.html", help="HTML page to write (PNG figures go beside it)")
    p.add_argument("--title")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .train import TrainingInterrupted
    try:
        return args.func(args) or 0
    except TrainingInterrupted as e:
        print(f"\nfashionlab {args.command}: {e}; continue with: fashionlab train --resume {e.run_dir}", file=sys.stderr)
        return 128 + e.signum
    except _user_errors() as e:
        print(f"fashionlab {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2

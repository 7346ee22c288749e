"""The `fashionlab` command: a thin shell over the public API (fashionlab.api).

Each command is an arguments function and a run function of a few lines, listed in COMMANDS.
The `train` flags are generated from the settings table (config.TrainConfig).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .device import DEVICES  # torch-free, as everything this module imports at start-up
from .errors import TrainingInterrupted


def _user_errors():
    from .errors import UserError
    return (UserError, ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError)


def _message(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


# --------------------------------------------------------------------------- shared options

def _data_options(p: argparse.ArgumentParser, class_names: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="folder with the four IDX files (.gz or decompressed); searched first")
    g.add_argument("--offline", action="store_true", default=None, help="never download (also FASHIONLAB_OFFLINE=1)")
    if class_names:
        from .config import parse_names
        g.add_argument("--class-names", type=parse_names, help="comma-separated class names, or a file with one "
                       "per line: use --data-dir as a custom IDX dataset (no reference checksums)")


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="auto")


def _track_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--track", action="append", metavar="TRACKER[=WHERE]",
                   help="log every run to an experiment tracker: tensorboard[=DIR] (default DIR: a tensorboard "
                        "folder beside the runs) or mlflow[=URI] (default: $MLFLOW_TRACKING_URI, else mlflow.db "
                        "beside the runs); repeat the flag or separate with commas for both")


def _refuse_if_busy(run: str, out: str | None = None) -> None:
    """A command about to write into a run folder another process is writing fails before torch loads."""
    from .runlock import check_free
    if out is None:
        check_free(run)


def load_data(args):
    from . import api
    return api.load_data(args.data_dir, args.offline, getattr(args, "class_names", None),
                         progress=lambda m: print(m, file=sys.stderr))


# --------------------------------------------------------------------------- commands

def args_data(p):
    _data_options(p)


def cmd_data(args) -> int:
    import numpy as np
    ds = load_data(args)
    print(f"dataset      {ds.name}\nsource       {ds.source}\nverified     {ds.verification}")
    for split, x, y in (("train", ds.train_images, ds.train_labels), ("test", ds.test_images, ds.test_labels)):
        print(f"{split:<12} images {tuple(x.shape)} {x.dtype}, pixels {int(x.min())}..{int(x.max())}; "
              f"labels {tuple(y.shape)} {y.dtype}")
    counts = [np.bincount(y, minlength=ds.num_classes) for y in (ds.train_labels, ds.test_labels)]
    print(f"\n{'class':<4} {'name':<14} {'train':>7} {'test':>6}")
    for i, name in enumerate(ds.class_names):
        print(f"{i:<4} {name:<14} {counts[0][i]:>7} {counts[1][i]:>6}")
    return 0


def args_models(p):
    p.add_argument("--summary", metavar="MODEL", help="also print one model's layers, output shapes and parameters")


def cmd_models(args) -> int:
    from . import api, models
    print(f"{'name':<14} {'family':<9} {'params':>11}  origin")
    for m in api.list_models():
        print(f"{m['name']:<14} {m['family']:<9} {m['params']:>11,}  {m['origin']}")
    if args.summary:
        rows = models.summary(api.build_model(args.summary))
        print(f"\n{args.summary}:\n{'layer':<12} {'type':<12} {'output shape':<18} {'params':>10}")
        for r in rows:
            frozen = "  frozen" if r["params"] and not r["trainable"] else ""
            print(f"{r['layer']:<12} {r['type']:<12} {str(tuple(r['output_shape'])):<18} {r['params']:>10,}{frozen}")
        total, trainable = sum(r["params"] for r in rows), sum(r["trainable"] for r in rows)
        print(f"total params {total:,}: trainable {trainable:,}, non-trainable {total - trainable:,}")
    return 0


def cmd_recipes(args) -> int:
    from . import api
    for r in api.list_recipes():
        ref = ", ".join(f"{m} {a:.2%}" for m, a in r["reference"].items()) or "none"
        print(f"{r['name']}\n  {r['description']}\n  models: {', '.join(r['models'])}; reported: {ref}")
        for device, settings in r["on_device"].items():
            print(f"  on {device}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return 0


def args_train(p):
    from .config import add_train_flags
    add_train_flags(p)
    p.add_argument("--out", help="run folder (default runs/<time>-<model>)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run (its settings are recorded)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    p.add_argument("--no-report", action="store_true", help="do not write report.html after training")
    _track_option(p)
    _data_options(p, class_names=False)  # --class-names is a training setting


def cmd_train(args) -> int:
    _refuse_if_busy(args.resume or args.out)
    from . import api, config
    if args.resume:
        run = api.Run(args.resume).resume(args.quiet, data_dir=args.data_dir, offline=args.offline, track=args.track)
    else:
        run = api.train(out=args.out, quiet=args.quiet, data_dir=args.data_dir, offline=args.offline,
                        track=args.track, report=not args.no_report, **config.settings_from_flags(args))
    if not args.no_report:
        if args.resume:
            run.report(data_dir=args.data_dir, offline=args.offline)
        if not args.quiet:
            print(f"report: {run.path / 'report.html'}")
    return 0


def args_evaluate(p):
    p.add_argument("run")
    p.add_argument("--json", action="store_true", help="print all metrics as JSON")
    p.add_argument("--device", choices=DEVICES, help="default: the device the run trained on")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="default: the precision it trained at")
    _data_options(p, class_names=False)  # the run knows its classes


def cmd_evaluate(args) -> int:
    """Recompute the test metrics; exit 1 when they differ from the run's metrics.json."""
    from . import api, run as run_mod
    run = api.Run(args.run)
    m = run.evaluate(device=args.device, precision=args.precision, data_dir=args.data_dir, offline=args.offline)
    print(json.dumps(m, indent=2) if args.json else _metrics_text(m))
    verdict = sys.stderr if args.json else sys.stdout  # --json keeps stdout pure JSON
    if run_mod.matches_record(run, m):
        print(f"\nmatches {run.metrics_path}", file=verdict)
        return 0
    ref = run.metrics
    print(f"\nDIFFERS FROM {run.metrics_path} (accuracy {ref['test_accuracy']:.4f}, loss {ref['test_loss']:.4f}): "
          f"another device or precision, or the files were changed", file=verdict)
    return 1


def _calibration_text(c: dict) -> str:
    """The temperature's effect on the test images it was not fitted on, or how to fit one."""
    if c.get("temperature") is None:
        return c.get("note", "not calibrated")
    return (f"calibration   temperature {c['temperature']:.4g} (fitted on {c['fitted_on']}): on {c['images']:,} "
            f"{c['measured_on']}: ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}, NLL {c['nll_before']:.4f} -> "
            f"{c['nll_after']:.4f}, accuracy {c['accuracy']:.4f} either way")


def _metrics_text(m: dict) -> str:
    lines = [f"test accuracy {m['test_accuracy']:.4f}   loss {m['test_loss']:.4f}   ECE {m['ece']:.4f} "
             f"(uncalibrated)", _calibration_text(m.get("calibration", {})) + "\n",
             f"{'class':<14} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    lines += [f"{n:<14} {s['precision']:>9.4f} {s['recall']:>7.4f} {s['f1']:>7.4f} {s['support']:>8}"
              for n, s in m["per_class"].items()]
    lines.append("\nconfusion matrix (rows = true class, columns = predicted):")
    lines += [f"{n:<14} " + " ".join(f"{v:>5}" for v in row) for n, row in zip(m["per_class"], m["confusion_matrix"])]
    lines.append("\nmost confused: " + "; ".join(f"{p['true']} -> {p['predicted']} ({p['count']})"
                                                 for p in m["most_confused"]))
    return "\n".join(lines)


def args_predict(p):
    p.add_argument("run")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image: 1 to the run's number of classes "
                   "(default 3)")
    _device_option(p)
    p.add_argument("--out", metavar="CSV", help="write one CSV row per image (folders are searched for images)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_predict(args) -> int:
    """Classes per image, each with its out-of-distribution score and, above the run's threshold, the
    mark `unsure: not a garment?`; a run without a detector says why once (a warning on stderr)."""
    from . import api
    from .atomic import check_writable
    if args.out:
        check_writable(args.out)  # before classifying anything
    run = api.Run(args.run).require_finished()
    classes = len(run.class_names)
    if not 1 <= args.top_k <= classes:
        raise ValueError(f"--top-k {args.top_k}: expected an integer from 1 to {classes} (the run's number of classes)")
    if args.out or any(Path(p).is_dir() for p in args.images):
        return _predict_many(run.predictor(args.device), args)
    for path in args.images:
        ranked_all = run.predict(path, args.top_k, args.device)
        for i, ranked in enumerate(ranked_all):
            label = f"{path}[{i}]" if len(ranked_all) > 1 else str(path)
            print(label + ": " + _classes_text(ranked))
    return 0


def _classes_text(ranked) -> str:
    from .predict import ood_text
    return ", ".join(f"{r['label']} {r['score']:.3f}" for r in ranked) + ood_text(ranked)


def _predict_many(predictor, args) -> int:
    """Folders (and files) in batches, with a progress bar; a CSV with --out, else one line per image."""
    from . import predict
    files = predict.expand_inputs(args.images)
    if not files:
        raise ValueError(f"no image or .npy files in {', '.join(args.images)}")
    rows = predict.predict_files(predictor, files, args.top_k, progress=not args.quiet)
    if args.out:
        done, errors = predict.write_predictions_csv(rows, args.out, min(args.top_k, len(predictor.class_names)))
        print(f"{done} images from {len(files)} files classified -> {args.out}"
              + (f"; {errors} files could not be read (see the error column)" if errors else ""), file=sys.stderr)
        return 1 if errors else 0
    errors = 0
    for path, item, ranked, err in rows:
        if ranked is None:
            errors += 1
            print(f"{path}: error: {err}", file=sys.stderr)
        else:
            print(f"{path}[{item}]: " + _classes_text(ranked))
    return 1 if errors else 0


def args_calibrate(p):
    p.add_argument("run")
    p.add_argument("--false-alarm-rate", type=float, default=0.05, metavar="RATE",
                   help="share of in-distribution images flagged unsure, between 0 and 1 (default 0.05)")
    _device_option(p)
    _data_options(p, class_names=False)  # the run knows its dataset


def cmd_calibrate(args) -> int:
    """The temperature (calibration.json) and the out-of-distribution detector (ood.safetensors), both
    fitted on the same held-out images."""
    from . import api, ood, run as run_mod
    ood.check_rate(args.false_alarm_rate, "--false-alarm-rate")  # before loading anything
    _refuse_if_busy(args.run)
    run = api.Run(args.run)
    dataset = run.require_finished().dataset(args.data_dir, args.offline)  # found and verified once for both
    run.calibrate_temperature(dataset, device=args.device)
    print(run_mod.describe_calibration(run.read_calibration()) + f"\nwrote {run.calibration_path}")
    run.calibrate_ood(args.false_alarm_rate, dataset, device=args.device)
    print(run_mod.describe_ood(run.read_ood()) + f"\nwrote {run.ood_path}")
    return 0


def args_robustness(p):
    p.add_argument("run")
    p.add_argument("--images", type=int, metavar="N", help="score a stratified subset of N of the held-out test "
                   "images (default: all of them; fewer is faster)")
    _device_option(p)
    p.add_argument("--no-write", action="store_true", help="print the table only; leave RUN/robustness.json as it is")
    _data_options(p, class_names=False)


def cmd_robustness(args) -> int:
    """Accuracy, ECE and unsure share per corruption and severity; RUN/robustness.json."""
    from . import api, robustness
    robustness.check_images(args.images, "--images")  # before loading anything
    run = api.Run(args.run)
    result = run.robustness(args.images, device=args.device, data_dir=args.data_dir, offline=args.offline,
                            write=not args.no_write, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(robustness.table_lines(result)) + ("" if args.no_write else f"\nwrote {run.robustness_path}"))
    return 0


def args_serve(p):
    p.add_argument("run", nargs="?", help="run folder (default: $FASHIONLAB_RUN, else /opt/ml/model as on SageMaker)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; $FASHIONLAB_HOST)")
    p.add_argument("--port", type=int, help="port (default 8080; $SAGEMAKER_BIND_TO_PORT, $FASHIONLAB_PORT)")
    p.add_argument("--backend", choices=["torch", "onnx"], help="PyTorch, or ONNX Runtime on RUN/model.onnx")
    p.add_argument("--workers", type=int, help="processes, each with its share of the cores (default 1; "
                                               "$SAGEMAKER_MODEL_SERVER_WORKERS)")
    p.add_argument("--device", choices=DEVICES, default=None)
    p.add_argument("--threads", type=int, help="threads per forward pass (default: the cores left once each worker's "
                                               "event loop has one, divided between the workers, at least 1; "
                                               "$FASHIONLAB_THREADS)")
    p.add_argument("--passes-on", choices=["thread", "loop"], help="where forward passes run: an inference "
                   "thread beside each worker's event loop, or the event loop itself (default: thread where each "
                   "worker has a core to spare for it, else loop; $FASHIONLAB_PASSES_ON)")
    p.add_argument("--max-batch", type=int, help="images per forward pass: concurrent requests share passes up to "
                                                 "this (default 64; 1 turns batching off)")
    p.add_argument("--max-wait-ms", type=float, help="how long a request arriving at an idle model waits for "
                                                     "others to share its pass, in milliseconds (default 0: passes "
                                                     "fill with what queues while the previous one runs)")
    p.add_argument("--keep-alive-timeout", type=float, help="seconds an idle connection stays open (default 5)")
    p.add_argument("--read-timeout", type=float, help="seconds a client may take to send a request head, or "
                                                      "between pieces of its body (default 30)")
    p.add_argument("--shutdown-timeout", type=float, help="seconds in-flight requests get to finish after SIGTERM "
                                                          "(default 30)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 10 MB)")
    p.add_argument("--max-pixels", type=int, help="largest decoded image (default 40 megapixels)")
    p.add_argument("--max-request-pixels", type=int, help="pixels of all a request's images, from their headers "
                                                          "before decoding (default 64 million)")
    p.add_argument("--max-decoded-bytes", type=int, help="bytes of all a request's images once decoded "
                                                         "(default 64 MiB)")
    p.add_argument("--max-concurrent-decodes", type=int, help="requests decoding images at once, in threads "
                                                              "(default 2)")
    p.add_argument("--model-name", help="model name in the Open Inference API (default fashionlab)")
    p.add_argument("--samples", type=int, help="test images offered on the web page (default 20; 0 for none)")
    p.add_argument("--data-dir", help="dataset folder for the web page's sample images")


def cmd_serve(args) -> int:
    from . import serve
    options = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    serve.run(serve.Settings.from_env(**options))
    return 0


def args_export(p):
    p.add_argument("run")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", help="output file (default RUN/model.onnx)")
    p.add_argument("--parity-images", type=int, default=1000, help="test images compared (default 1000)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed probability difference")
    _data_options(p, class_names=False)


def cmd_export(args) -> int:
    _refuse_if_busy(args.run, args.out)
    from . import api
    r = api.Run(args.run).export(args.out, args.format, args.parity_images, args.tolerance,
                                 data_dir=args.data_dir, offline=args.offline)
    print(f"wrote {r['path']} ({r['bytes']:,} bytes): parity on {r['images']} test images: max |dp| "
          f"{r['max_abs_prob_diff']:.2e} (tolerance {r['tolerance']:g}), top-1 mismatches {r['top1_mismatches']}")
    return 0


def args_package(p):
    p.add_argument("run")
    p.add_argument("--out", help="output file (default RUN/model.tar.gz)")


def cmd_package(args) -> int:
    _refuse_if_busy(args.run, args.out)
    from . import api
    result = api.Run(args.run).package(args.out)
    print(f"wrote {result['path']} ({result['bytes']:,} bytes): {', '.join(result['files'])}")
    return 0


def args_sweep(p):
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
    _track_option(p)
    p.add_argument("--worker-only", action="store_true", help=argparse.SUPPRESS)  # a child of --workers N


def cmd_sweep(args) -> int:
    from . import api
    try:
        result = api.sweep(args.spec, args.storage, args.workers, args.out, report=not args.no_report,
                           quiet=args.quiet, heartbeat_interval=args.heartbeat_interval,
                           grace_period=args.grace_period, max_retry=args.max_retry, threads=args.threads,
                           worker_only=args.worker_only, track=args.track)
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        again = "the trial is queued again: " if isinstance(e, TrainingInterrupted) else ""
        print(f"\nfashionlab sweep: {e or 'interrupted'}; {again}run the same command to continue", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    t = result.tally
    if args.worker_only:
        return 0
    if not t.finished:
        print(f"fashionlab sweep: stopped with {t.total - t.done - t.failed} of {t.total} trainings not done; "
              f"run the same command to continue", file=sys.stderr)
        return 1
    if result.report:
        print(f"{result.table()}\n\nreport: {result.report}")
    return 1 if t.failed else 0


def args_sweep_report(p):
    p.add_argument("spec")
    p.add_argument("--storage", metavar="URL", help="the storage the sweep used (default: its SQLite file)")
    p.add_argument("--out", metavar="DIR", help="experiment folder, if the sweep used --out")
    p.add_argument("--html", metavar="PATH", help="where to write the report (default <folder>/report.html)")
    p.add_argument("--markdown", action="store_true", help="also print the per-level table as Markdown")


def cmd_sweep_report(args) -> int:
    from . import sweeps
    from .atomic import check_writable
    if args.html:
        check_writable(args.html)
    res, path = sweeps.write_report(sweeps.load_spec(args.spec, folder=args.out), args.storage, args.html)
    print(sweeps.text_table(res) + ("\n\n" + sweeps.markdown_table(res) if args.markdown else ""))
    print(f"\nreport: {path}")
    return 0


def args_report(p):
    p.add_argument("run")
    p.add_argument("--out", help="HTML file to write (default RUN/report.html)")
    p.add_argument("--no-explain", action="store_true", help="leave out the look inside the model (faster)")
    _device_option(p)
    _data_options(p, class_names=False)


def cmd_report(args) -> int:
    _refuse_if_busy(args.run, args.out)
    from . import api
    path = api.Run(args.run).report(args.out, not args.no_explain, device=args.device, data_dir=args.data_dir,
                                    offline=args.offline)
    print(f"report: {path}")
    return 0


def args_explain(p):
    p.add_argument("run")
    p.add_argument("--out", help="HTML file to write (default RUN/explain.html)")
    _device_option(p)
    _data_options(p, class_names=False)


def cmd_explain(args) -> int:
    _refuse_if_busy(args.run, args.out)
    from . import api, explain
    from .atomic import check_writable
    run = api.Run(args.run).require_finished()
    if args.out:  # checked before loading anything; the default goes into the run folder
        check_writable(args.out)
    else:
        check_writable(run.path, folder=True)
    out = explain.write_explanation(run.path, run.dataset(args.data_dir, args.offline), out=args.out,
                                    device=args.device)
    print(f"explanation: {out}")
    return 0


def args_explore(p):
    p.add_argument("--out", default="eda.html", help="HTML file to write (PNG figures go beside it)")
    _data_options(p)


def cmd_explore(args) -> int:
    from . import api
    from .atomic import check_writable
    check_writable(args.out)  # before loading the dataset
    api.explore(load_data(args), args.out)
    print(f"exploration: {args.out}")
    return 0


def args_study(p):
    p.add_argument("name", help="study name: dense-vs-conv, cnn-vs-rnn, zoo or audit-exclude (with --exclude)")
    p.add_argument("--seeds", type=int, default=3, help="runs per model, seeds offset from the recipe's (default 3)")
    p.add_argument("--out", help="study folder (default studies/<name>); finished runs in it are reused")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (quick looks)")
    p.add_argument("--subset", type=int, metavar="N", help="train on a stratified subset of N images (quick looks)")
    p.add_argument("--no-run-reports", action="store_true", help="skip each run's report.html (faster)")
    p.add_argument("--exclude", metavar="AUDIT_CSV", help="train without the training images a label audit lists "
                   "(`fashionlab audit`); audit-exclude trains each seed with and without them")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"))
    _track_option(p)
    _data_options(p, class_names=False)


def cmd_study(args) -> int:
    from . import api, studies
    try:
        result = api.study(args.name, args.seeds, args.out, run_reports=not args.no_run_reports,
                           data_dir=args.data_dir, offline=args.offline, epochs=args.epochs, subset=args.subset,
                           exclude=args.exclude,
                           device=args.device, precision=args.precision, track=args.track)
    except TrainingInterrupted as e:
        print(f"\nfashionlab study: {e}; finished runs are kept: run `fashionlab {' '.join(sys.argv[1:])}` again "
              f"to continue", file=sys.stderr)
        return 128 + e.signum
    print("\n".join(studies.summary_lines(result.summary)))
    print(f"\ntrained {len(result.trained)} run(s), reused {len(result.reused)}; report: {result.report}")
    return 0


def args_audit(p):
    p.add_argument("--recipe", default="fast-full", help="the recipe each fold trains with (default fast-full; see "
                   "`fashionlab recipes`)")
    p.add_argument("--model", help="override the recipe's model")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds, 2 to 20 (default 5): each fold's "
                   "model predicts the training images it left out")
    p.add_argument("--seed", type=int, help="seed of the folds and of every fold's training (default: the recipe's)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--out", help="audit folder (default audits/<recipe>); finished folds in it are reused")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    _device_option(p)
    _data_options(p)


def cmd_audit(args) -> int:
    from . import api
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        result = api.audit(args.recipe, args.model, args.out, folds=args.folds, data_dir=args.data_dir,
                           offline=args.offline, class_names=args.class_names, device=args.device, log=log,
                           seed=args.seed, epochs=args.epochs)
    except TrainingInterrupted as e:
        print(f"\nfashionlab audit: {e}; finished folds are kept: run `fashionlab {' '.join(sys.argv[1:])}` again "
              f"to continue", file=sys.stderr)
        return 128 + e.signum
    s = result.summary
    acc = s["out_of_sample_accuracy"]
    print(f"suspected label errors: {s['suspects']['train']:,} of {s['images']['train']:,} training images, "
          f"{s['suspects']['test']:,} of {s['images']['test']:,} test images\n"
          f"out-of-sample accuracy: training images {acc['train']:.4f}, test images {acc['test']:.4f} "
          f"({s['folds']} folds, {s['folds_trained']} trained now)")
    for row in result.suspects[:10]:
        print(f"  {row['split']:<5} #{row['index']:<6} {row['given_name']} ({row['p_given']:.2f}) -> "
              f"{row['suggested_name']} ({row['p_suggested']:.2f})")
    print(f"page: {result.page}\ncsv: {result.csv}\ntrain without the suspects: "
          f"fashionlab train --recipe {args.recipe} --exclude {result.csv}")
    return 0


def args_compare(p):
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--out", default="compare.html", help="HTML page to write (PNG figures go beside it)")
    p.add_argument("--title", default="Comparison of runs")


def cmd_compare(args) -> int:
    from . import api, studies
    result = api.compare(args.runs, args.out, args.title)
    trust = studies.trust_lines(studies.trust_rows([studies.load_run(r.path) for r in result.runs]))
    print("\n".join(studies.summary_lines(result.summary)) + "\n\n" + "\n".join(trust)
          + f"\n\nreport: {result.report}")
    return 0


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable
    arguments: Callable = lambda p: None


COMMANDS = [
    Command("data", "find, verify and describe the dataset", cmd_data, args_data),
    Command("models", "list registered models with parameter counts", cmd_models, args_models),
    Command("recipes", "list training recipes and the figures their studies reported", cmd_recipes),
    Command("train", "train a model and write a run folder", cmd_train, args_train),
    Command("evaluate", "evaluate a run on the test set (exit 1 if it differs from metrics.json)", cmd_evaluate,
            args_evaluate),
    Command("predict", "classify PNG/JPEG images or .npy arrays with a trained run", cmd_predict, args_predict),
    Command("calibrate", "fit a run's temperature (calibrated probabilities, calibration.json) and its "
            "out-of-distribution detector and unsure threshold (ood.safetensors)", cmd_calibrate, args_calibrate),
    Command("robustness", "score a run on corrupted test images: 15 corruptions at 5 severities (robustness.json)",
            cmd_robustness, args_robustness),
    Command("serve", "HTTP service: web page, JSON API, SageMaker and Open Inference contracts", cmd_serve, args_serve),
    Command("export", "export a run to ONNX after a parity check against PyTorch", cmd_export, args_export),
    Command("package", "write the model.tar.gz SageMaker expects", cmd_package, args_package),
    Command("sweep", "run a controlled experiment (a spec file) on Optuna storage, with any number of workers",
            cmd_sweep, args_sweep),
    Command("sweep-report", "tables, tests and an HTML report of a sweep's results", cmd_sweep_report,
            args_sweep_report),
    Command("report", "write a run's report.html (figures embedded, PNGs beside it)", cmd_report, args_report),
    Command("explain", "filters, feature maps, Grad-CAM/saliency and embeddings of a run's model", cmd_explain,
            args_explain),
    Command("explore", "exploration report of the dataset: counts, samples, means, histograms", cmd_explore,
            args_explore),
    Command("study", "train a study's models over several seeds and compare them in one report", cmd_study,
            args_study),
    Command("audit", "find suspected label errors by cross-validation and confident learning (audit.html, "
            "audit.csv)", cmd_audit, args_audit),
    Command("compare", "compare finished runs side by side (mean and std over runs of a model)", cmd_compare,
            args_compare),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fashionlab", description="Fast, reproducible image classification on Fashion-MNIST: data, models, "
        "training, evaluation, reports, sweeps and serving.")
    parser.add_argument("--version", action="version", version=f"fashionlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help)
        c.arguments(p)
        p.set_defaults(func=c.run)
    return parser


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that what is still buffered for a closed pipe does not fail again (a
    BrokenPipeError message and exit status 120) when Python flushes it at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args) or 0
        try:
            sys.stdout.flush()  # output still buffered meets a reader that left here, not at exit
        except BrokenPipeError:
            _discard_stdout()  # the command finished: its status stands
        return status
    except TrainingInterrupted as e:
        print(f"\nfashionlab {args.command}: {e}; continue with: fashionlab train --resume {e.run_dir}", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:  # `fashionlab evaluate RUN --json | head`: the reader left; not an error
        _discard_stdout()
        return 0
    except _user_errors() as e:
        print(f"fashionlab {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2

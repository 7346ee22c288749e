"""Every example in README.md and docs/*.md runs here, so the docs cannot drift from the code.

Pages are found by their names (README.md and every docs/*.md, a new page included) and read with
Sybil, which finds the fenced code blocks and runs a page's examples in order, sharing one
namespace and one working folder per page. An indented code block is refused: fence it.

What is an example (the block's language, the first word after the fence):

    ```python    run; later blocks of the page see its names.
    ```sh        each line a command that must exit 0; its output is not compared.
    ```console   `$ COMMAND` lines, each followed by the output it prints (compared as below).
    ```toml      a sweep spec: loaded by fashionlab.sweeps.load_spec (every field checked; nothing trains).
    ```text, a bare ``` and any other language: a listing, not run.

Options after the language, `name="value"` (Markdown shows only the language):

    not-run="KIND: why"   the block is not run; KIND is one of NOT_RUN_KINDS. Every such block is
                          listed in NOT_RUN below, and test_the_examples_not_run_are_exactly_the_listed_ones
                          fails until a new one is added there: nothing is skipped silently.
    figures="MACHINE"     the printed figures depend on the machine and precision (say which in the
                          page's text too): numbers and class names are compared for form only.
    exit=N                the commands exit with status N (default 0).

How output is compared (```console): line by line, exactly, after the trailing spaces; a line `...`
stands for any number of lines. With figures=..., every number matches any number with as many
decimals (any number of them when the page shows over 4: a float printed in full), every class name
any class name, and `true` / `false` either.

How commands run: a line starting `fashionlab` runs in this process (`fashionlab.cli.main`), after
dropping `[optional parts]` and expanding `*` globs; any other line runs in bash. `fashionlab serve`
starts a real server in the background (`--samples 0`: the page's sample images are not loaded), on a
free port that replaces `localhost:8080` in the page's later examples; a later `fashionlab serve`
replaces it, and the page's end stops it. A page's folder holds
what its examples name: `RUN` (a finished run of the `fast` model), `DIR` (two images), `shirt.png`
(test image 4, a shirt), `blank.png` (a white 300x200 PNG), `runs/20260101-120000-cnn` (a copy of RUN)
and `experiments` (the repository's).

Small data, so the whole page set runs in about a minute: the real Fashion-MNIST is used (so class
names and shapes are real), with the test set cut to its first TEST_IMAGES images; `fashionlab train`
and `fashionlab study` get `--subset SUBSET --epochs 1` appended (train: `--no-report` too, the report
being run by docs/reports.md's own examples; study: `--seeds 1 --no-run-reports`), and
`fl.train(...)` / `fl.study(...)` calls get subset=SUBSET, epochs=1 (seeds=1), and `fl.audit(...)` the same
with folds=2; the rest is as written.
Each command's CPU seconds are printed (pytest -s) to keep an eye on the suite's time. A new command
or function that trains (folds, repeats, ...) gets its own small-data arguments in
small_data_arguments() and small_world(), or its example is marked not-run="long: ...".
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from sybil import Document, Region, Sybil
from sybil.parsers.markdown.lexers import RawFencedCodeBlockLexer

from fashionlab import api, cli, data

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = {"python", "sh", "console", "toml"}
NOT_RUN_KINDS = ("docker", "gpu", "postgresql", "server", "installs", "long", "suite")
TEST_IMAGES, SUBSET = 300, 600

# Every example the suite does not run, by page and first line; the reason is in the page.
NOT_RUN = {
    ('README.md', 'bash scripts/quickstart'),
    ('README.md', 'bash scripts/test'),
    ('README.md', 'fashionlab study cnn-vs-rnn --seeds 3 --track tensorboard,mlflow=http://mlflow.example:5000'),
    ('README.md', 'bash scripts/test                       # everything, as CI runs it'),
    ('api.md', 'run = fl.train(recipe="fast", track=["tensorboard", "mlflow=http://mlflow.example:5000"])'),
    ('deploy.md', 'docker build -t fashionlab .                   # the Dockerfile at the repository root'),
    ('deploy.md', 'mkdir -p model && tar xzf RUN/model.tar.gz -C model'),
    ('deploy.md', 'PYTHONPATH=src python benchmarks/serve_latency.py RUN --duration 10'),
    ('records.md', 'fashionlab train --recipe best --device cuda    # on a GPU: a wide ResNet (WRN-16-4), 64 epochs'),
    ('records.md', 'PYTHONPATH=src python benchmarks/time_to_accuracy.py --seeds 5 --reference-epochs 1 --targets 0.9173 0.93 \\'),
    ('records.md', 'bash benchmarks/gpu_check.sh                      # on the GPU machine, from the repository root'),
    ('records.md', 'GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh    # the same script end to end on a CPU, about a minute'),
    ('records.md', 'PYTHONPATH=src python benchmarks/time_to_accuracy.py --seeds 3 --epochs 2 6 7'),
    ('records.md', 'PYTHONPATH=src python benchmarks/floor.py      # one thread, CPU seconds, synthetic batches'),
    ('records.md', 'PYTHONPATH=src python benchmarks/best_accuracy.py --seeds 1 --first-seed 1 --threads 1'),
    ('records.md', 'PYTHONPATH=src python benchmarks/best_accuracy.py --seeds 3 --threads 2 --json benchmarks/results/best-accuracy-KIND.json'),
    ('records.md', 'ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 PYTHONPATH=src python benchmarks/best_accuracy.py --seeds 1 --first-seed 4 --threads 2'),
    ('records.md', 'PYTHONPATH=src python benchmarks/best_accuracy.py --seeds 1 --first-seed 1 --threads 1 --set \'model_args={"stem":16}\''),
    ('records.md', 'PYTHONPATH=src python benchmarks/best_accuracy.py --seeds 3 --out runs/best --set \'model_args={"stem":0}\''),
    ('records.md', 'PYTHONPATH=src python benchmarks/best_accuracy.py --seeds 1 --first-seed 1 --threads 1 --set sam_rho=0.1 --set sam_start=0.5'),
    ('records.md', 'PYTHONPATH=src python benchmarks/time_to_accuracy.py --seeds 3 --epochs 2 6 7 [--threads 1]'),
    ('reports.md', "fashionlab study zoo --seeds 3                          # every registered model, dense-vs-conv's recipe"),
    ('sweeps.md', 'fashionlab sweep experiments/conv-layers.toml                 # SQLite in the experiment folder, 1 worker'),
    ('sweeps.md', 'sudo apt-get install postgresql'),
    ('sweeps.md', 'PG=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)'),
    ('sweeps.md', 'fashionlab sweep experiments/conv-layers.toml --storage postgresql://sweeper:secret@db-host/sweeps --workers 2'),
    ('sweeps.md', 'fashionlab sweep-report experiments/conv-layers.toml --storage postgresql://sweeper:secret@db-host/sweeps'),
    ('sweeps.md', 'fashionlab sweep experiments/conv-layers-small.toml --workers 1 --threads 1 --out runs/sweeps/small-w1t1'),
    ('sweeps.md', 'fashionlab sweep experiments/conv-layers-small.toml --workers 1 --out runs/sweeps/small-w1              # torch default: 2 threads'),
    ('sweeps.md', 'PYTHONPATH=src python -m pytest tests/test_sweep.py'),
    ('audit.md', 'fashionlab audit --recipe fast-full --folds 5 --out audits/fast'),
    ('trust.md', 'python benchmarks/trust.py --show fast=runs/fast best=runs/best --figures docs/trust --write docs/trust.md'),
    ('trust.md', 'fashionlab compare runs/fast runs/best --out compare.html'),
    ('trust.md', 'python benchmarks/trust.py --baseline runs/fast-s0 runs/fast-s1 runs/fast-s2 --candidate runs/fast-robust-s0 runs/fast-robust-s1 runs/fast-robust-s2 --write docs/trust.md'),
    ('audit.md', 'import csv'),
    ('audit.md', 'PYTHONPATH=src python benchmarks/label_audit.py --recipe fast-full --folds 5 --out runs/bench-label-audit'),
    ('audit.md', 'PYTHONPATH=src python benchmarks/label_audit.py --recipe fast-full --epochs 4 --folds 5 --out runs/bench-label-audit-e4'),
    ('audit.md', 'fashionlab audit --data-dir runs/bench-label-audit/data --class-names "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot" --out audits/custom'),
}


# --------------------------------------------------------------------------- reading the pages

@dataclass
class Block:
    """One fenced code block: its language, options and source, where it is."""
    page: str
    line: int
    language: str
    options: dict[str, str]
    source: str

    @property
    def first_line(self) -> str:
        return self.source.splitlines()[0] if self.source.strip() else ""

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and "not-run" not in self.options


INFO = re.compile(r"(?P<language>[\w-]*)(?P<options>[^\n]*)$\n", re.MULTILINE)


def parse_options(text: str, where: str) -> dict[str, str]:
    options = {}
    for word in shlex.split(text):
        name, eq, value = word.partition("=")
        if not eq or name not in {"not-run", "figures", "exit"}:
            raise ValueError(f"{where}: unknown block option {word!r}; expected not-run=, figures= or exit=")
        options[name] = value
    if "not-run" in options and not options["not-run"].startswith(tuple(k + ":" for k in NOT_RUN_KINDS)):
        raise ValueError(f"{where}: not-run={options['not-run']!r}: start it with one of "
                         f"{', '.join(k + ':' for k in NOT_RUN_KINDS)}")
    return options


class BlockParser:
    """Sybil parser: every fenced block becomes a region evaluated by `run_block`."""

    lexer = RawFencedCodeBlockLexer(info_pattern=INFO)

    def __call__(self, document: Document):
        page = Path(document.path).name
        for region in self.lexer(document):
            line = document.text.count("\n", 0, region.start) + 1
            lex = region.lexemes
            block = Block(page, line, lex["language"], parse_options(lex["options"], f"{page}:{line}"),
                          str(lex["source"]))
            yield Region(region.start, region.end, block, run_block)


SYBIL = Sybil(parsers=[BlockParser()])


def blocks(page: Path) -> list[Block]:
    return [example.parsed for example in SYBIL.parse(page)]


# --------------------------------------------------------------------------- running them

@dataclass
class Workspace:
    """A page's working folder, the class names its runs have, and its server (while one runs)."""
    folder: Path
    class_names: list[str]
    server: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)
    port: int | None = None

    def local(self, text: str) -> str:
        """The page's text with the documented server address pointing at the running server."""
        return text.replace("localhost:8080", f"127.0.0.1:{self.port}") if self.port else text

    def serve(self, args: list[str]) -> None:
        from serve_support import free_port, server_process
        self.server.close()
        self.port = free_port()
        if "--port" in args:
            del args[args.index("--port"):args.index("--port") + 2]
        self.server.enter_context(server_process(*args, "--samples", "0", port=self.port))


def run_block(example) -> None:
    block: Block = example.parsed
    if not block.runs:
        return
    ws: Workspace = example.namespace["__workspace__"]
    where = f"{block.page}:{block.line}"
    if block.language == "python":
        code = compile(ws.local(block.source), f"{block.page} line {block.line}", "exec")
        exec(code, example.namespace)
    elif block.language == "toml":
        from fashionlab import sweeps
        spec = ws.folder / f"{block.page}-{block.line}.toml"
        spec.write_text(block.source)
        sweeps.load_spec(spec)
    elif block.language == "sh":
        for command in commands(block.source):
            status, _ = run_command(command, ws)
            assert status == int(block.options.get("exit", 0)), f"{where}: `{command}` exited {status}"
    else:
        for command, expected in console_sessions(block.source):
            status, printed = run_command(command, ws)
            assert status == int(block.options.get("exit", 0)), f"{where}: `{command}` exited {status}:\n{printed}"
            check_output(printed, expected, "figures" in block.options, ws.class_names, f"{where}: `{command}`")


def commands(source: str) -> list[str]:
    """The command lines of a ```sh block: comment-only and blank lines dropped."""
    return [line for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def console_sessions(source: str) -> list[tuple[str, list[str]]]:
    """`$ command` lines of a ```console block, each with the lines it prints."""
    sessions: list[tuple[str, list[str]]] = []
    for line in source.splitlines():
        if line.startswith("$ "):
            sessions.append((line[2:], []))
        elif sessions:
            sessions[-1][1].append(line)
    return sessions


def run_command(command: str, ws: Workspace) -> tuple[int, str]:
    """Run one command line in the page's folder: (exit status, stdout)."""
    start = time.process_time()
    try:
        return _run_command(command, ws)
    finally:
        print(f"docs example: {time.process_time() - start:6.1f} CPU s  {command}", file=sys.__stderr__)


def _run_command(command: str, ws: Workspace) -> tuple[int, str]:
    words = shlex.split(command, comments=True)
    if words and words[0] == "fashionlab":
        args = [w for w in shlex.split(re.sub(r"\s\[[^\]]*\]", "", command), comments=True)[1:]]
        args = [x for w in args for x in (sorted(glob.glob(w)) or [w] if "*" in w else [w])]
        if args[:1] == ["serve"]:
            ws.serve(args[1:])
            return 0, ""
        args += small_data_arguments(args)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                status = cli.main(args)
            except SystemExit as e:  # argparse: --help, or a usage error
                status = e.code if isinstance(e.code, int) else 2
        return status, out.getvalue()
    proc = subprocess.run(["bash", "-c", ws.local(command)], cwd=ws.folder, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                               "PYTHONPATH": str(ROOT / "src")})
    return proc.returncode, proc.stdout


def small_data_arguments(args: list[str]) -> list[str]:
    """What a training command gets appended so that it runs on small data (later flags win)."""
    if args[:1] == ["train"] and "--resume" not in args and "--help" not in args:
        return ["--subset", str(SUBSET), "--epochs", "1", "--no-report"]
    if args[:1] == ["study"]:
        return ["--subset", str(SUBSET), "--epochs", "1", "--seeds", "1", "--no-run-reports"]
    return []


NUMBER = re.compile(r"\d[\d,]*(?:\.(\d+))?")
BOOLEAN = re.compile(r"\b(?:true|false)\b")


def form(line: str, class_names: list[str]) -> re.Pattern:
    """A pattern of the line with its figures free: numbers (same decimals) and class names."""
    names = sorted(class_names, key=len, reverse=True)
    pattern, pos = "", 0
    tokens = re.compile("|".join([NUMBER.pattern, BOOLEAN.pattern, *map(re.escape, names)]))
    for m in tokens.finditer(line):
        pattern += re.escape(line[pos:m.start()])
        decimals = len(m.group(1) or "")
        if m.group(0)[0].isdigit():
            pattern += r"\d[\d,]*" + (r"\.\d+" if decimals > 4 else rf"\.\d{{{decimals}}}" if decimals else "")
        elif BOOLEAN.fullmatch(m.group(0)):
            pattern += "(?:true|false)"
        else:
            pattern += "(?:" + "|".join(map(re.escape, names)) + ")"
        pos = m.end()
    return re.compile(pattern + re.escape(line[pos:]) + "$")


def check_output(printed: str, expected: list[str], figures_free: bool, class_names: list[str], where: str) -> None:
    got = [line.rstrip() for line in printed.rstrip("\n").splitlines()]
    want = [line.rstrip() for line in expected]

    def same(g: str, w: str) -> bool:
        return bool(form(w, class_names).match(g)) if figures_free else g == w

    def match(gi: int, wi: int) -> bool:
        if wi == len(want):
            return gi == len(got)
        if want[wi] == "...":
            return any(match(k, wi + 1) for k in range(gi, len(got) + 1))
        return gi < len(got) and same(got[gi], want[wi]) and match(gi + 1, wi + 1)

    assert match(0, 0), f"{where} printed:\n" + "\n".join(got) + "\n\nthe page shows:\n" + "\n".join(want)


# --------------------------------------------------------------------------- the page's folder

@pytest.fixture(scope="module")
def small_data(real_data_module):
    ds = real_data_module
    return dataclasses.replace(ds, test_images=ds.test_images[:TEST_IMAGES], test_labels=ds.test_labels[:TEST_IMAGES])


@pytest.fixture(scope="module")
def real_data_module(tmp_path_factory):
    """The real dataset (the `real_data` rule: missing fails under CI, skips elsewhere), found as a
    fresh machine finds it: not in $FASHIONLAB_DATA nor the user's cache."""
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("FASHIONLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
            env.delenv("FASHIONLAB_DATA", raising=False)
            return data.load(data.FASHION_MNIST, offline=True)
    except data.DataError as e:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"the real dataset is required under CI and is missing: {e}")
        pytest.skip(f"real dataset not installed: {e}")


@pytest.fixture(scope="module")
def finished_run(small_data, tmp_path_factory) -> Path:
    run = api.train(recipe="fast-full", dataset=small_data, out=tmp_path_factory.mktemp("docs") / "RUN", quiet=True,
                    subset=SUBSET, epochs=1)
    return run.path


def page_folder(folder: Path, run: Path, ds) -> None:
    from PIL import Image
    shutil.copytree(run, folder / "RUN")
    shutil.copytree(run, folder / "runs" / "20260101-120000-cnn")
    Image.fromarray(ds.test_images[4]).save(folder / "shirt.png")
    Image.new("RGB", (300, 200), "white").save(folder / "blank.png")
    (folder / "DIR").mkdir()
    for i in range(2):
        Image.fromarray(ds.test_images[i]).save(folder / "DIR" / f"test-{i}.png")
    (folder / "experiments").symlink_to(ROOT / "experiments")


@pytest.fixture
def small_world(monkeypatch, small_data):
    """Every load of the dataset gives the cut one; train and study calls get the small-data settings."""
    import fashionlab
    monkeypatch.setattr(data, "load", lambda *a, **k: small_data)
    train, study, audit = api.train, api.study, api.audit

    def small_train(*args, **kwargs):
        return train(*args, **{**kwargs, "subset": SUBSET, "epochs": 1})

    def small_study(name, seeds=3, out=None, **kwargs):
        return study(name, 1, out, **{**kwargs, "subset": SUBSET, "epochs": 1})

    def small_audit(*args, **kwargs):
        return audit(*args, **{**kwargs, "subset": SUBSET, "epochs": 1, "folds": 2})

    # The package first: reading its lazy name gives api's, which must still be the real one to be restored.
    for module in (fashionlab, api):
        monkeypatch.setattr(module, "train", small_train)
        monkeypatch.setattr(module, "study", small_study)
        monkeypatch.setattr(module, "audit", small_audit)


# --------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_example_of_the_page_runs_as_shown(page, small_world, small_data, finished_run, tmp_path, monkeypatch):
    page_folder(tmp_path, finished_run, small_data)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    document = SYBIL.parse(page)
    workspace = document.namespace["__workspace__"] = Workspace(tmp_path, list(small_data.class_names))
    with workspace.server:  # a server an example started stops with the page
        for example in document:
            example.evaluate()


def test_the_examples_not_run_are_exactly_the_listed_ones():
    marked = {(b.page, b.first_line) for page in PAGES for b in blocks(page) if "not-run" in b.options}
    assert marked == NOT_RUN, (f"marked not-run but not listed in NOT_RUN: {sorted(marked - NOT_RUN)}; "
                               f"listed but not marked (or gone): {sorted(NOT_RUN - marked)}")


def test_code_blocks_are_fenced_so_that_they_are_found():
    md = MarkdownIt("commonmark")
    indented = [f"{page.name}:{t.map[0] + 1}" for page in PAGES for t in md.parse(page.read_text())
                if t.type == "code_block"]
    assert not indented, f"indented code blocks (fence them, with a language): {', '.join(indented)}"


def test_form_comparison_frees_only_figures_and_class_names():
    names = ["Shirt", "T-shirt/top", "Coat"]
    pattern = form("shirt.png: Shirt 0.743, T-shirt/top 0.153  ood 10.86", names)
    assert pattern.match("shirt.png: Coat 0.101, Shirt 0.099  ood 9.02")
    assert not pattern.match("shirt.png: Coat 0.1, Shirt 0.099  ood 9.02")  # another number of decimals
    assert not pattern.match("blank.png: Coat 0.101, Shirt 0.099  ood 9.02")  # file names are compared
    full = form('{"label":"Shirt","score":0.67432129383087158,"unsure":false}', names)
    assert full.match('{"label":"Coat","score":0.1,"unsure":true}') and not full.match('{"label":"Coat","score":1}')


def test_every_flag_the_pages_give_a_command_is_one_it_takes():
    """Prose and tables too: `fashionlab COMMAND ... --flag` on one line names a flag of that command."""
    commands = next(a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices
    takes = {name: {o for a in p._actions for o in a.option_strings} for name, p in commands.items()}
    unknown = [f"{page.name}: fashionlab {m[1]} {flag}" for page in PAGES
               for m in re.finditer(r"fashionlab ([a-z-]+)([^`\n|]*)", page.read_text()) if m[1] in takes
               for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m[2]) if flag not in takes[m[1]]]
    assert not unknown, f"flags the command does not take: {unknown}"


def test_the_service_settings_table_gives_the_defaults_the_server_uses():
    """docs/deploy.md's settings table: each flag's stated default (a number or a `word`) is Settings'."""
    from fashionlab.serve.settings import Settings
    text = (ROOT / "docs" / "deploy.md").read_text()
    table = text[text.index("| setting | flag | environment | default |"):].split("\n\n")[0].splitlines()[2:]
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    checked = 0
    for row in table:
        flags, stated = row.split(" | ")[1], row.rstrip(" |").split(" | ")[-1]
        for flag, value in zip(re.findall(r"`--([a-z-]+)`", flags), stated.split(", ")):
            if re.fullmatch(r"`[^`]+`|[\d.]+", value):
                actual = defaults[flag.replace("-", "_")]
                assert str(actual) in {value.strip("`"), f"{value}.0"}, f"--{flag}: the table says {value}, Settings {actual}"
                checked += 1
    assert checked >= 15

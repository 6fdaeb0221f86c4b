"""The course notebooks: stored clean, thin, and every one runs headless in smoke mode.

Each notebook runs in a fresh kernel (nbclient) with DDPM_MINI_SMOKE=1: CPU, tiny sizes,
no network. Where a notebook fetches the pretrained weights, a loopback HTTP mirror serves
stand-in files (random weights of UNet(**MEDFORJ_UNET), saved like the published ones), so
the real fetch path (manifest, Pooch, cache, strict load) runs.

The notebooks import ddpm_mini as dm and lab (notebooks/lab.py, the lessons' own helpers,
tested in test_lab.py). Their Colab setup cell, which clones the repository to get lab.py,
runs offline here against a local repository of this working tree. Each run gets its own data
folder (DDPM_MINI_DATA), never the user's shared one. The exercises run solved
(DDPM_MINI_SOLUTIONS=1: notebooks/solutions.py's answers); the students' version, as stored,
must stop at each exercise with "your turn".
"""
import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

import ddpm_mini as dm
from conftest import repository

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["00_quickstart", "01_parameterizations", "02_sampling", "03_training", "04_evaluation",
         "05_inverse_problems"]
CELL_TIMEOUT = 300          # seconds per cell (nbclient)
FETCHES = {"00_quickstart", "02_sampling"}   # notebooks that download the MedForj weights
STANDIN_NAMES = [f"MedForj-weights-{tag}_ema.safetensors" for tag in ("clean", "velocity", "flow", "rflow", "noise")]
MAX_FUNCTION_LINES = 6      # "no function in a notebook longer than a few lines"
EXERCISES = {"01_parameterizations": 4}   # notebooks with exercises: how many
STUDENT = "# STUDENT: replace this line"


def _read(name):
    import nbformat
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _code(cell) -> str:
    """Cell source with IPython line magics (%...) blanked, so ast can parse it."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in cell.source.splitlines())


# --- The stored notebooks -----------------------------------------------------------------------


def test_the_six_notebooks_exist():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs_and_valid(name):
    import nbformat
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a code cell has stored outputs"
            assert cell.execution_count is None, f"{name}: a code cell has an execution count"
        assert "attachments" not in cell or not cell.attachments


PREVIEWS = ROOT / "docs" / "previews"
#: Notebooks with a rendered preview. Not 00 and 02 (the published weights cannot be fetched where the
#: previews are rendered: with stand-in weights their images would be noise).
PREVIEWED = ["01_parameterizations", "03_training", "04_evaluation", "05_inverse_problems"]


def test_every_preview_is_checked():
    assert sorted(p.stem for p in PREVIEWS.glob("*.ipynb")) == PREVIEWED


@pytest.mark.parametrize("name", PREVIEWED)
def test_preview_matches_its_notebook(name):
    """docs/previews/<name>.ipynb (tests/render_previews.py) is the notebook as it is now, run in full:
    the same code cells in the same order, every one executed without an error, with outputs, under
    a header that says when and how long it ran."""
    import nbformat
    path = PREVIEWS / f"{name}.ipynb"
    assert path.is_file(), f"no preview {path}: python tests/render_previews.py {name}"
    preview = nbformat.read(path, as_version=4)
    nbformat.validate(preview)
    head, cells = preview.cells[0], preview.cells[1:]
    assert head.cell_type == "markdown" and "Preview with outputs" in head.source and " minutes" in head.source
    source = [c.source for c in _read(name).cells if c.cell_type == "code"]
    rendered = [c for c in cells if c.cell_type == "code"]
    assert [c.source for c in rendered] == source, (
        f"{path} no longer matches notebooks/{name}.ipynb: render it again (python tests/render_previews.py {name})")
    assert all(c.execution_count for c in rendered), f"{path}: a code cell did not run"
    outputs = [o for c in rendered for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1, f"{path}: no figure"
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})], (
        f"{path}: a widget, which a saved page cannot show (render with DDPM_MINI_STATIC=1)")


def test_render_previews_names_the_notebooks_it_knows():
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "render_previews.py"), "03_trainin"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "no notebook 03_trainin" in run.stderr and "03_training" in run.stderr
    assert not list(PREVIEWS.glob(".*.part")), "a half-written preview was left behind"


def _imported(source: str) -> set:
    """Top-level names a cell's import statements bind (import a.b as c -> c; import a.b -> a)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {alias.asname or alias.name.split(".")[0] for alias in node.names}
    return names


@pytest.mark.parametrize("name", NAMES)
def test_setup_and_parameters_cells(name):
    """First code cell: REPO_URL, pyproject's address; on Colab a clone of the repository, installed,
    with its notebooks/ on sys.path (a checkout uses the folder above); dm, lab and the device. A cell
    tagged "parameters" reads SMOKE from DDPM_MINI_SMOKE. A setup cell seeds and takes the shared data
    folder from lab.data_folder() (DDPM_MINI_DATA, else one per user)."""
    code = [c for c in _read(name).cells if c.cell_type == "code"]
    first = code[0].source
    url = repository()
    assert f'REPO_URL = "{url}"' in first
    assert '"google.colab" in sys.modules' in first
    assert '["git", "clone"' in first and "REPO_URL, KIT]" in first
    assert '"--no-deps", "-e", KIT]' in first
    assert 'os.path.join(KIT, "notebooks")' in first
    assert {"dm", "lab", "torch"} <= _imported(_code(code[0]))
    assert "DEVICE =" in first
    # one setup cell for all five (test_colab_setup_clones_the_kit runs it)
    assert first == [c for c in _read(NAMES[0]).cells if c.cell_type == "code"][0].source
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[1], f"{name}: the second code cell must be the tagged parameters cell"
    assert 'os.environ.get("DDPM_MINI_SMOKE") == "1"' in tagged[0].source
    assert any("torch.manual_seed(SEED)" in c.source and "DATA = lab.data_folder()" in c.source for c in code[:3])
    assert not any("tempfile" in c.source for c in code), f"{name}: a private temporary folder does not share work"
    # the address appears once, in REPO_URL (tests/set_repo_url.py keeps it equal to pyproject's)
    assert sum(c.source.count(url.split("github.com/")[1]) for c in _read(name).cells) == 1


@pytest.mark.parametrize("name", NAMES)
def test_no_install_from_pypi(name):
    """The kit is not on PyPI: the notebooks never tell a student to `pip install ddpm-mini`."""
    assert not [c for c in _read(name).cells if "pip install ddpm-mini" in c.source]


@pytest.mark.parametrize("name", NAMES)
def test_names_the_notebooks_use_exist(name):
    """Every dm.X a notebook reads is in ddpm_mini, every lab.X in notebooks/lab.py (no kernel needed)."""
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import lab
    finally:
        sys.path.remove(str(NOTEBOOKS))
    modules = {"dm": dm, "lab": lab}
    used = {(node.value.id, node.attr) for cell in _read(name).cells if cell.cell_type == "code"
            for node in ast.walk(ast.parse(_code(cell)))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules}
    missing = sorted(f"{mod}.{attr}" for mod, attr in used if not hasattr(modules[mod], attr))
    assert not missing, f"{name} uses names that do not exist: {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_thin_cells(name):
    """Functions defined in a notebook stay a few lines long (longer ones that only the lessons use
    go in notebooks/lab.py); prose and code alternate."""
    nb = _read(name)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tree = ast.parse(_code(cell))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                lines = node.end_lineno - node.lineno + 1
                assert lines <= MAX_FUNCTION_LINES, (f"{name}: a {lines}-line function belongs in notebooks/lab.py "
                                                     "(or in ddpm_mini, if users or the CLI call it)")
            assert not isinstance(node, ast.ClassDef), (f"{name}: a class belongs in notebooks/lab.py "
                                                        "(or in ddpm_mini, if users or the CLI call it)")
        assert len(cell.source.splitlines()) <= 16, f"{name}: a long code cell:\n{cell.source}"
    kinds = [c.cell_type for c in nb.cells]
    assert kinds.count("markdown") >= kinds.count("code") // 2 + 1, f"{name}: too little prose"


def _exercise_cells(name):
    return [c for c in _read(name).cells if c.cell_type == "code" and STUDENT in c.source]


@pytest.mark.parametrize("name", NAMES)
def test_exercises_wait_for_the_student(name):
    """Each exercise's STUDENT line is lab.your_turn(n, SOLUTIONS, ...), numbered 1, 2, ... in order, with
    a reference answer in notebooks/solutions.py, and an assert (the self-check) follows it in the cell."""
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import solutions
    finally:
        sys.path.remove(str(NOTEBOOKS))
    cells = _exercise_cells(name)
    assert len(cells) == EXERCISES.get(name, 0)
    for number, cell in enumerate(cells, 1):
        line = next(line for line in cell.source.splitlines() if STUDENT in line)
        assert f"lab.your_turn({number}, SOLUTIONS, " in line, line
        assert number in solutions.ANSWERS
        assert "assert " in cell.source.split(STUDENT, 1)[1]
    if cells:
        params = [c for c in _read(name).cells if "parameters" in c.metadata.get("tags", [])][0].source
        assert 'SOLUTIONS = os.environ.get("DDPM_MINI_SOLUTIONS") == "1"' in params


# --- The Colab set-up, offline -------------------------------------------------------------------

# Runs a setup cell as Colab would: google.colab imported, the working directory /content (here
# a temporary folder). subprocess.run is wrapped: git runs for real; pip is recorded, not run
# (it would need the network and would install into this environment).
_COLAB_RUNNER = r"""
import json, subprocess, sys, types
google = types.ModuleType("google")
google.colab = types.ModuleType("google.colab")
sys.modules.update({"google": google, "google.colab": google.colab})
calls, real_run = [], subprocess.run


def run(cmd, *args, **kwargs):
    calls.append([str(c) for c in cmd])
    if list(cmd[1:3]) == ["-m", "pip"]:
        return subprocess.CompletedProcess(cmd, 0)
    return real_run(cmd, *args, **kwargs)


subprocess.run = run
cell = compile(open(sys.argv[1], encoding="utf-8").read(), "setup cell", "exec")
for _ in range(2):  # running the cell again must not clone again
    exec(cell, {"__name__": "__main__"})
import ddpm_mini, lab
print(json.dumps({"calls": calls, "dm": ddpm_mini.__file__, "lab": lab.__file__,
                  "manifest_path": str(ddpm_mini.manifest_path()), "manifest": sorted(ddpm_mini.read_manifest())}))
"""


def _kit_repository(dest: pathlib.Path) -> pathlib.Path:
    """A git repository of this checkout's working tree (tracked and untracked, not ignored files;
    outside a git checkout, the files a clone needs), committed: what a clone of the published
    repository would bring."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True)
    if listed.returncode == 0:
        files = listed.stdout.split("\0")
    else:
        files = ["ddpm_mini.py", "pyproject.toml", "README.md", "data_manifest.csv"]
        files += [str(f.relative_to(ROOT)) for f in sorted(NOTEBOOKS.glob("*.ipynb")) + [NOTEBOOKS / "lab.py"]]
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    git = ["git", "-C", str(dest), "-c", "user.name=test", "-c", "user.email=test@example.invalid",
           "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "kit"]):
        subprocess.run(git + args, check=True, capture_output=True)
    return dest


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_colab_setup_clones_the_kit(tmp_path):
    """On Colab the setup cell clones REPO_URL (here a local repository of this working tree),
    installs the clone (command line checked, not run: no network), and imports ddpm_mini and lab
    from the clone, whose manifest read_manifest() finds."""
    source = _kit_repository(tmp_path / "source")
    url = source.as_uri()                                  # file://: cloned like a remote (--depth works)
    setup = _code([c for c in _read(NAMES[0]).cells if c.cell_type == "code"][0])
    cell = setup.replace(f'"{repository()}"', repr(url))
    assert cell != setup
    (tmp_path / "setup_cell.py").write_text(cell, encoding="utf-8")
    (tmp_path / "runner.py").write_text(_COLAB_RUNNER, encoding="utf-8")
    content = tmp_path / "content"
    content.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DDPM_MINI_MANIFEST")}
    env.update(MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "setup_cell.py")],
                          cwd=content, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])

    kit = content / "ddpm-mini"
    clones = [c for c in result["calls"] if c[:2] == ["git", "clone"]]
    assert len(clones) == 1 and clones[0][-2:] == [url, str(kit)]
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    installs = [c for c in result["calls"] if c[1:3] == ["-m", "pip"]]
    assert installs == 2 * [pip + ["--no-deps", "-e", str(kit)], pip + ["nibabel", "pooch", "safetensors"]]
    assert len(result["calls"]) == len(clones) + len(installs)

    assert result["dm"] == str(kit / "ddpm_mini.py") and result["lab"] == str(kit / "notebooks" / "lab.py")
    assert (kit / "notebooks" / "lab.py").read_bytes() == (NOTEBOOKS / "lab.py").read_bytes()
    assert result["manifest_path"] == str(kit / "data_manifest.csv")
    assert result["manifest"] == sorted(dm.read_manifest(ROOT / "data_manifest.csv"))

    # what `pip install -e <clone>` builds, built offline (the PEP 660 hook, this environment's setuptools)
    pytest.importorskip("setuptools", minversion="64")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                            "print(b.build_editable(sys.argv[1]))", str(wheels)],
                           cwd=kit, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    assert build.stdout.strip().splitlines()[-1].startswith("ddpm_mini-") and list(wheels.glob("*.whl"))


# --- Running them headless ------------------------------------------------------------------------


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@pytest.fixture
def smoke_env(request, tmp_path, monkeypatch):
    """The kernel's environment for a smoke run; serves stand-in weights where the notebook fetches."""
    manifest = tmp_path / "data_manifest.csv"
    shutil.copyfile(ROOT / "data_manifest.csv", manifest)
    (tmp_path / "weights").symlink_to(ROOT / "weights", target_is_directory=True)  # the shipped teaching models
    env = {
        "DDPM_MINI_SMOKE": "1",
        "DDPM_MINI_MANIFEST": str(manifest),
        "DDPM_MINI_CACHE": str(tmp_path / "cache"),
        "DDPM_MINI_DATA": str(tmp_path / "data"),    # never the user's shared folder
        "DDPM_MINI_SOLUTIONS": "1",                  # the exercises run the reference answers
        "MPLBACKEND": "Agg",
        "PYTHONDONTWRITEBYTECODE": "1",          # `import lab` leaves no __pycache__ in notebooks/
        "CUDA_VISIBLE_DEVICES": "",              # smoke mode is a CPU run
        # one thread unless told otherwise: on a small shared CI box, OpenMP threads that wait
        # for a busy core slow torch down many times over
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        # a closed loopback port: any fetch a notebook makes without a mirror fails at once
        "DDPM_MINI_MIRROR": "http://127.0.0.1:9",
    }
    if request.node.callspec.params.get("name") in FETCHES:
        root, base = request.getfixturevalue("http_server")
        for fname in STANDIN_NAMES:
            _link_or_copy(request.getfixturevalue("standin_weights"), root / fname)
        env["DDPM_MINI_MIRROR"] = base
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_smoke_mode(name, smoke_env, tmp_path):
    from nbclient import NotebookClient
    nb = _read(name)
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    print(f"{name}: {seconds:.1f} s in smoke mode")  # pytest -s shows it; --durations=0 too
    import nbformat
    nbformat.write(nb, str(tmp_path / f"{name}.executed.ipynb"))  # for a look after a failure

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "from " + str(ROOT) in text or str(ROOT / "ddpm_mini.py") in text, "the kernel imported another ddpm_mini"
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before, "a notebook wrote into notebooks/"
    data = pathlib.Path(smoke_env["DDPM_MINI_DATA"])
    if name in FETCHES:
        assert list(pathlib.Path(smoke_env["DDPM_MINI_CACHE"]).glob("medforj_*/*.safetensors"))
    if name in ("00_quickstart", "02_sampling"):
        assert list(data.glob("*.nii.gz")), f"{name} saved no NIfTI"


def test_setup_cell_takes_the_thread_count(monkeypatch):
    """DDPM_MINI_THREADS (or THREADS edited in the set-up cell) sets torch's CPU threads; the cell prints
    the count in use."""
    from nbclient import NotebookClient
    for key, value in {"DDPM_MINI_THREADS": "2", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "CUDA_VISIBLE_DEVICES": "",
                       "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)}.items():
        monkeypatch.setenv(key, value)  # OMP_NUM_THREADS 1: only the cell can make it 2
    for name in NAMES:
        setup = [c for c in _read(name).cells if c.cell_type == "code" and "DDPM_MINI_THREADS" in c.source]
        assert len(setup) == 1, name
    nb = _read(NAMES[0])
    nb.cells = [c for c in nb.cells if c.cell_type == "code" and "DDPM_MINI_THREADS" in c.source]
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    assert "CPU threads: 2" in "".join(o.get("text", "") for o in nb.cells[0].outputs)


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_students_version_says_your_turn(name, smoke_env, monkeypatch):
    """As stored (SOLUTIONS off), the notebook runs up to its last exercise and every exercise cell,
    and only those, stops with NotImplementedError("your turn: ...")."""
    from nbclient import NotebookClient
    monkeypatch.setenv("DDPM_MINI_SOLUTIONS", "0")
    nb = _read(name)
    last = max(i for i, c in enumerate(nb.cells) if STUDENT in c.source)
    nb.cells = nb.cells[:last + 1]
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = {i: o for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"}
    exercises = [i for i, c in enumerate(nb.cells) if STUDENT in c.source]
    assert sorted(errors) == exercises, {i: (o.ename, o.evalue) for i, o in errors.items()}
    for i in exercises:
        assert errors[i].ename == "NotImplementedError" and errors[i].evalue.startswith("your turn: exercise"), errors[i]

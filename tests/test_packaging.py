"""Packaging and the repository as a whole: environment.yml mirrors pyproject.toml, the README's
commands are the ones CI runs, the manifest ships with the module, and every docs/ page and anchor
that the code, tests, notebooks and README cite exists."""
import hashlib
import pathlib
import re
import pytest

import ddpm_mini as dm

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name


def requirement(spec):
    name, version = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", spec.strip()).groups()
    return name.lower(), version.replace(" ", "")


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = dict(requirement(s) for s in project["dependencies"] + extras["notebooks"] + extras["test"])
    conda = {}
    text = (ROOT / "environment.yml").read_text()
    for line in text[text.index("dependencies:"):].splitlines():
        m = re.match(r"^\s+-\s+([A-Za-z][A-Za-z0-9_.\-]*)\s*([<>=!~].*)?$", line)
        if m and m.group(1) not in ("pip",):
            conda[m.group(1).lower()] = (m.group(2) or "").replace(" ", "")
    for name, version in wanted.items():
        conda_name = CONDA_NAMES.get(name, name)
        assert conda_name in conda, f"{name} is in pyproject.toml but not in environment.yml"
        assert conda[conda_name] == version, f"{name}: pyproject says {version!r}, environment.yml {conda[conda_name]!r}"
    extra = set(conda) - {CONDA_NAMES.get(n, n) for n in wanted} - {"python"}
    assert not extra, f"environment.yml has dependencies pyproject.toml lacks: {extra}"


def test_declared_torch_floor_has_what_the_code_uses():
    """torch.amp.GradScaler(device_type) (training) came with torch 2.3: the floor says so, in both
    files, and README names it with the versions tested."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch>=2.3" in [s.replace(" ", "") for s in project["dependencies"]]
    assert "torch.amp.GradScaler(" in (ROOT / "ddpm_mini.py").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "torch >= 2.3" in readme and "2.13.0" in readme


def test_readme_setup_reads_top_to_bottom():
    """The CPU-torch line comes before the first `pip install -e .`; the notebooks extra brings a
    Jupyter front-end and README says how to install it; README names the console command."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cpu = readme.index("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert cpu < readme.index("pip install -e .") < readme.index('pip install -e ".[test]"')
    assert 'pip install -e ".[notebooks]"' in readme
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["notebooks"]
    assert any(requirement(s)[0] in ("jupyterlab", "notebook", "jupyter") for s in extra)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"ddpm-mini": "ddpm_mini:main"} and "ddpm-mini sample" in readme


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && pytest'
    assert command in readme and command in ci.splitlines()
    first = "ddpm-mini demo --pretrained"  # README (a)'s offline first run, in the same fresh environment
    assert first in readme and first in ci and ci.index(first) < ci.index(command)


def test_manifest_and_teaching_models_ship_with_the_module():
    """The wheel carries the manifest and every file of a teaching row (weights/<name>.safetensors),
    each in the repository with the manifest's sha256 and size, at most about 4 MB."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    files = project["tool"]["setuptools"]["data-files"]
    assert files["share/ddpm-mini"] == ["data_manifest.csv"]
    rows = {n: r for n, r in dm.read_manifest().items() if r["group"] == "teaching"}
    assert sorted(rows) == [f"teaching_{p}" for p in sorted(dm.PREDICTIONS)]
    assert sorted(files["share/ddpm-mini/weights"]) == sorted(f"weights/{n}.safetensors" for n in rows)
    for name, row in rows.items():
        data = (ROOT / "weights" / f"{name}.safetensors").read_bytes()
        assert row["hash"] == "sha256:" + hashlib.sha256(data).hexdigest() and int(row["size"]) == len(data) <= 4.2e6
        assert row["url"].endswith(f"/weights/{name}.safetensors") and row["kind"] == "weights"


def test_installed_module_finds_its_manifest(tmp_path):
    """A wheel installs ddpm_mini.py into <root>/lib/pythonX.Y/site-packages and the manifest into
    <root>/share/ddpm-mini (data-files); the module must find it there (venv, --user, /usr/local)."""
    import shutil
    import subprocess
    import sys

    site = tmp_path / "lib" / "python3.x" / "site-packages"
    share = tmp_path / "share" / "ddpm-mini"
    site.mkdir(parents=True)
    share.mkdir(parents=True)
    shutil.copy(ROOT / "ddpm_mini.py", site)
    shutil.copy(ROOT / "data_manifest.csv", share)
    shutil.copytree(ROOT / "weights", share / "weights")
    code = ("import ddpm_mini as dm; print(dm.__file__); print(dm.manifest_path()); print(len(dm.read_manifest())); "
            "print(dm.fetch('teaching_flow'))")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "DDPM_MINI_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    module, manifest, count, weights = out.stdout.split()
    assert module == str(site / "ddpm_mini.py") and manifest == str(share / "data_manifest.csv") and int(count) > 4
    assert weights == str(share / "weights" / "teaching_flow.safetensors")  # served from the install, no download


# --- Citations of the repository's own pages ------------------------------------------------------

DOC_LINK = re.compile(r"docs/([A-Za-z0-9_-]+)\.md(?:#([A-Za-z0-9_-]+))?")
PAGE_LINK = re.compile(r"\]\(([A-Za-z0-9_-]+\.md)?#([A-Za-z0-9_-]+)\)")  # [text](#a) or [text](page.md#a) in docs/


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped (letters, digits,
    spaces, '-' and '_' kept), each space a '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: pathlib.Path) -> set:
    """The heading anchors of a Markdown page (fenced code skipped; repeats get -1, -2, ... as on GitHub)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    found = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, flags=re.M):
        anchor, n = github_anchor(heading), 0
        while (anchor if not n else f"{anchor}-{n}") in found:
            n += 1
        found.add(anchor if not n else f"{anchor}-{n}")
    return found


def test_github_anchor_rules():
    assert github_anchor("Implied x0 weights") == "implied-x0-weights"
    assert github_anchor("Regional-volume statistics") == "regional-volume-statistics"
    assert github_anchor("DDIM update (eta > 0), step 2.") == "ddim-update-eta--0-step-2"


def test_cited_doc_pages_and_anchors_exist():
    """Every docs/<page>.md#<anchor> cited in ddpm_mini.py, tests/*.py, notebooks/ and README.md is a
    page of docs/ with that heading; so is every in-page or cross-page link inside docs/."""
    sources = [ROOT / "ddpm_mini.py", ROOT / "README.md", *sorted((ROOT / "tests").glob("*.py")),
               *sorted((ROOT / "notebooks").glob("*.py")), *sorted((ROOT / "notebooks").glob("*.ipynb"))]
    cited = {}
    for path in sources:
        for page, anchor in DOC_LINK.findall(path.read_text(encoding="utf-8")):
            cited.setdefault((f"{page}.md", anchor), set()).add(path.name)
    for page in sorted((ROOT / "docs").glob("*.md")):
        for target, anchor in PAGE_LINK.findall(page.read_text(encoding="utf-8")):
            cited.setdefault((target or page.name, anchor), set()).add(f"docs/{page.name}")
    # the scan works: the module and the tests cite both pages, with anchors
    assert {("math.md", "parameterizations"), ("methods.md", "preprocessing")} <= set(cited)
    assert any("ddpm_mini.py" in where for where in cited.values()) and any("test_core.py" in w for w in cited.values())
    problems = []
    for (page, anchor), where in sorted(cited.items()):
        path = ROOT / "docs" / page
        if not path.is_file():
            problems.append(f"{sorted(where)} cite docs/{page}, which does not exist")
        elif anchor and anchor not in anchors(path):
            problems.append(f"{sorted(where)} cite docs/{page}#{anchor}: no such heading (has {sorted(anchors(path))})")
    assert not problems, "\n".join(problems)


def test_tests_and_module_cite_nothing_outside_the_repository():
    """The project stands alone: no reference to files beside the checkout (the shared data-source
    notes) or to a guide that is not in the repository; docs/math.md and docs/methods.md are the references."""
    outside = ("GUI" + "DE", "../" + "shared", "shared/" + "data-sources")
    for path in [ROOT / "ddpm_mini.py", *sorted((ROOT / "tests").glob("*.py"))]:
        text = path.read_text(encoding="utf-8")
        assert not [word for word in outside if word in text], path.name


def test_cited_tests_exist():
    """Every tests/test_<x>.py::<name> that the module, docs, README or tests name is a test there."""
    cited = set()
    for path in [ROOT / "ddpm_mini.py", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                 *sorted((ROOT / "tests").glob("*.py"))]:
        cited |= set(re.findall(r"(?:tests/)?(test_\w+\.py)::(\w+)", path.read_text(encoding="utf-8")))
    assert ("test_unet.py", "test_fast_forward_equals_plain") in cited  # ddpm_mini.py's section 5b names it
    for file, name in sorted(cited):
        assert re.search(rf"^def {name}\(", (ROOT / "tests" / file).read_text(encoding="utf-8"), re.M), f"{file}::{name}"

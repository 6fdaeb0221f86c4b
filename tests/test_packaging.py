"""environment.yml mirrors pyproject.toml, and the README's commands are the ones CI runs."""
import pathlib
import re
import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name


def requirement(spec):
    name, version = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", spec.strip()).groups()
    return name.lower(), version.replace(" ", "")


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(requirement(s) for s in project["dependencies"] + project["optional-dependencies"]["test"])
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
    extra = set(conda) - {CONDA_NAMES.get(n, n) for n in wanted} - {"python", "jupyter"}
    assert not extra, f"environment.yml has dependencies pyproject.toml lacks: {extra}"


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && pytest'
    assert command in readme and command in ci.splitlines()


def test_manifest_ships_with_the_module():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["data-files"] == {"share/ddpm-mini": ["data_manifest.csv"]}


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
    code = "import ddpm_mini as dm; print(dm.__file__); print(dm.manifest_path()); print(len(dm.read_manifest()))"
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    module, manifest, count = out.stdout.split()
    assert module == str(site / "ddpm_mini.py") and manifest == str(share / "data_manifest.csv") and int(count) > 4

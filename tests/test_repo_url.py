"""One source of truth for the repository address: pyproject.toml's [project.urls] Repository.

README's clone line and Colab links, every notebook's REPO_URL line and the teaching models'
download URLs in data_manifest.csv agree with it, and tests/set_repo_url.py rewrites all of them
in one command (run here on a copy of the files)."""
import csv
import difflib
import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from conftest import repository

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = ROOT / "tests" / "set_repo_url.py"
NAMES = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
NEW = "https://github.com/ada-lab/brain.ddpm"   # a name with a dot: the hardest legal case


def _slug(url: str) -> str:
    match = re.fullmatch(r"https://github\.com/([^/\s]+/[^/\s]+)", url)
    assert match, f"pyproject's Repository must be https://github.com/OWNER/REPO, got {url!r}"
    return match.group(1)


def agreement_problems(root: pathlib.Path) -> list:
    """Every place that spells the kit's address, checked against pyproject's (empty: all agree)."""
    url = repository(root)
    slug = _slug(url)
    readme = (root / "README.md").read_text(encoding="utf-8")
    problems = []
    if f"git clone {url}.git ddpm-mini && cd ddpm-mini" not in readme:
        problems.append(f"README: no `git clone {url}.git ddpm-mini && cd ddpm-mini`")
    badges = re.findall(r"\]\((https://colab\.research\.google\.com/github/[^)\s]+)\)", readme)
    wanted = [f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{n}.ipynb" for n in NAMES]
    if badges != wanted:
        problems.append(f"README's Colab links {badges} are not {wanted}")
    for name in NAMES:
        cells = json.loads((root / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8"))["cells"]
        setup = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
        if f'REPO_URL = "{url}"' not in setup:
            problems.append(f"{name}: its setup cell has no REPO_URL = {url!r}")
    with open(root / "data_manifest.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            want = f"https://raw.githubusercontent.com/{slug}/main/weights/{row['name']}.safetensors"
            if row["group"] == "teaching" and row["url"] != want:
                problems.append(f"data_manifest.csv: {row['name']} is fetched from {row['url']}, not {want}")
    return problems


def _tool(*args, root=ROOT):
    return subprocess.run([sys.executable, str(TOOL), *args, "--root", str(root)], capture_output=True, text=True,
                          timeout=120)


def test_readme_badges_notebooks_and_manifest_agree_with_pyproject():
    assert not agreement_problems(ROOT)
    check = _tool("--check")
    assert check.returncode == 0 and "every place agrees" in check.stdout, check.stdout + check.stderr


def test_readme_says_how_to_change_the_address():
    assert "python tests/set_repo_url.py https://github.com/" in (ROOT / "README.md").read_text(encoding="utf-8")


def _copy(dest: pathlib.Path) -> list:
    """The files that spell the address, copied into dest (the layout the tool expects)."""
    (dest / "notebooks").mkdir(parents=True)
    rels = ["README.md", "pyproject.toml", "data_manifest.csv", *(f"notebooks/{n}.ipynb" for n in NAMES)]
    for rel in rels:
        shutil.copy2(ROOT / rel, dest / rel)
    return [dest / rel for rel in rels]


def test_set_repo_url_rewrites_every_place_on_a_copy(tmp_path):
    """On a copy: every file changes, only on the lines that spell the address; notebooks still
    validate (and keep nbformat's layout), pyproject and the manifest still parse, all places
    agree with the new address, and a second run changes nothing."""
    import nbformat
    files = _copy(tmp_path)
    before = {f: f.read_text(encoding="utf-8") for f in files}
    done = _tool(NEW, root=tmp_path)
    assert done.returncode == 0, done.stderr
    old_slug = _slug(repository(ROOT))
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert text != before[f], f"{f.name} did not change"
        assert old_slug not in text, f"{f.name} still has {old_slug}"
        changed = [line for line in difflib.ndiff(before[f].splitlines(), text.splitlines()) if line[:2] in ("- ", "+ ")]
        assert all("ada-lab/brain.ddpm" in line[2:] or old_slug in line[2:] for line in changed), changed
    for name in NAMES:
        path = tmp_path / "notebooks" / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert len(nb.cells) == len(nbformat.reads(before[path], as_version=4).cells)
        assert path.read_text(encoding="utf-8") == nbformat.writes(nb) + "\n"   # nbformat's own layout
    rows = list(csv.DictReader((tmp_path / "data_manifest.csv").open(encoding="utf-8", newline="")))
    assert len(rows) == len(list(csv.DictReader((ROOT / "data_manifest.csv").open(encoding="utf-8", newline=""))))
    tomllib = pytest.importorskip("tomllib")
    assert tomllib.loads((tmp_path / "pyproject.toml").read_text())["project"]["urls"]["Repository"] == NEW
    assert repository(tmp_path) == NEW and not agreement_problems(tmp_path)

    after = {f: f.read_bytes() for f in files}
    again = _tool(NEW + ".git", root=tmp_path)
    assert again.returncode == 0 and "nothing to change" in again.stdout
    assert {f: f.read_bytes() for f in files} == after


@pytest.mark.parametrize("bad", ["http://github.com/a/b", "https://gitlab.com/a/b", "https://github.com/a",
                                 "https://github.com/a/b/c", "https://github.com/-a/b"])
def test_set_repo_url_refuses_other_addresses(tmp_path, bad):
    files = _copy(tmp_path)
    before = {f: f.read_bytes() for f in files}
    done = _tool(bad, root=tmp_path)
    assert done.returncode == 2 and "expected https://github.com/OWNER/REPO" in done.stderr, done.stderr
    assert {f: f.read_bytes() for f in files} == before

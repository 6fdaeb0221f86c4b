#!/usr/bin/env python3
"""Set the kit's repository address everywhere it is written, in one command.

    python tests/set_repo_url.py https://github.com/OWNER/REPO      # rewrite every place
    python tests/set_repo_url.py --check                            # list places that disagree

pyproject.toml's `[project.urls] Repository` is the source of truth. The script reads the
current address there and rewrites each place that spells it, in three forms:

    https://github.com/OWNER/REPO                        pyproject.toml, README's clone line,
                                                         every notebook's REPO_URL line
    https://colab.research.google.com/github/OWNER/REPO  README's "Open in Colab" links
    https://raw.githubusercontent.com/OWNER/REPO         data_manifest.csv: the shipped teaching
                                                         models' download address (Colab)

Notebooks are edited as JSON (only cell sources change) and written back in nbformat's own
layout, so a diff shows just the changed lines. Every new file is parsed again before any file is
written, and each is written atomically (a temporary file beside it, then os.replace).
Standard library only; the address must be a GitHub one, because the Colab links and the
teaching models' downloads are GitHub addresses.
"""
import argparse
import csv
import io
import json
import os
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: The hosts in front of OWNER/REPO in each form of the address.
HOSTS = ("https://github.com/", "https://colab.research.google.com/github/", "https://raw.githubusercontent.com/")
_SLUG = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]+?"
_URL = re.compile(rf"^https://github\.com/({_SLUG})(?:\.git)?/?$")
#: Where a slug ends: ".git", or a character that cannot be part of a repository name.
_END = r"(?=\.git\b|[^A-Za-z0-9._-]|\.(?![A-Za-z0-9_-])|$)"


def parse_url(url: str) -> str:
    """'https://github.com/OWNER/REPO' (optionally ending in .git or /) -> 'OWNER/REPO'."""
    match = _URL.match(url.strip())
    if not match:
        raise ValueError(f"{url!r} is not a GitHub repository address: expected https://github.com/OWNER/REPO "
                         "(OWNER: letters, digits and '-'; REPO: letters, digits, '-', '_' and '.'), because "
                         "the Colab links and the teaching models' downloads are GitHub addresses")
    return match.group(1)


def read_repository(root=ROOT) -> str:
    """The Repository entry of pyproject.toml's [project.urls] (the source of truth)."""
    path = pathlib.Path(root) / "pyproject.toml"
    text = path.read_text(encoding="utf-8")
    section = re.search(r"^\[project\.urls\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    entry = section and re.search(r'^Repository\s*=\s*"([^"]+)"', section.group(1), re.M)
    if not entry:
        raise ValueError(f'{path}: no Repository = "https://github.com/OWNER/REPO" under [project.urls]')
    return entry.group(1)


def _pattern(slug: str) -> re.Pattern:
    hosts = "|".join(re.escape(h) for h in HOSTS)
    return re.compile(rf"({hosts}){re.escape(slug)}{_END}")


def rewrite(text: str, old: str, new: str) -> tuple:
    """Replace OWNER/REPO `old` by `new` after each of HOSTS -> (new text, number of replacements)."""
    return _pattern(old).subn(lambda m: m.group(1) + new, text)


def _rewrite_notebook(text: str, old: str, new: str) -> tuple:
    """Rewrite the cell sources of a notebook's JSON; written back as nbformat writes it."""
    nb, count = json.loads(text), 0
    for cell in nb["cells"]:
        source = cell["source"]
        lines = [source] if isinstance(source, str) else source
        changed = []
        for line in lines:
            line, n = rewrite(line, old, new)
            changed.append(line)
            count += n
        cell["source"] = changed[0] if isinstance(source, str) else changed
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n", count


def files(root=ROOT) -> list:
    """Every file that spells the address: pyproject, README, the notebooks, the manifest."""
    root = pathlib.Path(root)
    return [root / "pyproject.toml", root / "README.md", *sorted((root / "notebooks").glob("*.ipynb")),
            root / "data_manifest.csv"]


def _check_parses(path: pathlib.Path, before: str, after: str):
    """The rewritten file still parses as what it is, with the same shape."""
    if path.suffix == ".ipynb":
        old, new = json.loads(before), json.loads(after)
        if len(old["cells"]) != len(new["cells"]):
            raise RuntimeError(f"{path}: the rewrite changed the number of cells")
    elif path.suffix == ".csv":
        old, new = (list(csv.reader(io.StringIO(t))) for t in (before, after))
        if [len(r) for r in old] != [len(r) for r in new]:
            raise RuntimeError(f"{path}: the rewrite changed the table's shape")
    elif path.suffix == ".toml" and sys.version_info >= (3, 11):
        import tomllib
        tomllib.loads(after)


def plan(new_url: str, root=ROOT) -> dict:
    """{path: (old text, new text, replacements)} for every file the address appears in."""
    old, new = parse_url(read_repository(root)), parse_url(new_url)
    changes = {}
    for path in files(root) if new != old else []:
        text = path.read_text(encoding="utf-8")
        after, n = (_rewrite_notebook if path.suffix == ".ipynb" else rewrite)(text, old, new)
        if after != text:
            _check_parses(path, text, after)
            changes[path] = (text, after, n)
    return changes


def _write_atomic(path: pathlib.Path, text: str):
    """Write text to a temporary file beside path (same mode), then rename it over path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def places(root=ROOT) -> list:
    """(file, address) for every place that spells the kit's own address: README's clone line and
    Colab links, each notebook's REPO_URL line, the teaching rows' URLs in the manifest, pyproject.
    (Other projects' GitHub addresses, e.g. test data in the manifest, are not the kit's.)"""
    root = pathlib.Path(root)
    readme = (root / "README.md").read_text(encoding="utf-8")
    found = [("pyproject.toml", read_repository(root))]
    found += [("README.md", url) for url in re.findall(r"git clone (\S+)", readme)]
    found += [("README.md", url) for url in re.findall(r"https://colab\.research\.google\.com/github/[^\s)]+", readme)]
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        source = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        found += [(f"notebooks/{path.name}", url) for url in re.findall(r'^REPO_URL = "([^"]*)"', source, re.M)]
    with open(root / "data_manifest.csv", encoding="utf-8", newline="") as f:
        found += [("data_manifest.csv", row["url"]) for row in csv.DictReader(f) if row["group"] == "teaching"]
    return found


def disagreements(root=ROOT) -> list:
    """'file: address' for each of places() whose OWNER/REPO is not pyproject's."""
    want = parse_url(read_repository(root))
    hosts = "|".join(re.escape(h) for h in HOSTS)
    return [f"{where}: {url}" for where, url in places(root) if not re.match(rf"({hosts}){re.escape(want)}{_END}", url)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", help="the new address, https://github.com/OWNER/REPO")
    parser.add_argument("--check", action="store_true", help="change nothing; list places that disagree with "
                                                             "pyproject.toml, exit 1 if any")
    parser.add_argument("--root", type=pathlib.Path, default=ROOT, help="the repository folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.check == bool(args.url):
        parser.error("give either a new address (https://github.com/OWNER/REPO) or --check")
    try:
        if args.check:
            found = disagreements(args.root)
            print("\n".join(found) or f"every place agrees with pyproject.toml: {read_repository(args.root)}")
            return 1 if found else 0
        changes = plan(args.url, args.root)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"set_repo_url: {err}", file=sys.stderr)
        return 2
    for path, (_, text, n) in changes.items():
        _write_atomic(path, text)
        print(f"{path.relative_to(args.root)}: {n} replaced")
    url = f"https://github.com/{parse_url(args.url)}"
    print(f"repository address: {url}" if changes else f"nothing to change: the address is already {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

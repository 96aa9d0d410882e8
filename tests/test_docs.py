"""Every file and path that README.md, CHANGELOG.md and docs/*.md name exists in the repository.

Checked: markdown links and images (relative to the page, with their #anchors against the target
page's headings), backticked repository paths (`mlpim/engine/cache.py`, `scripts/paper.py`,
`conf/experiment/x.yaml` for `mlpim/conf/...`, globs and `<placeholder>`s as wildcards), dotted
module names (`mlpim.tasks.ioi.held_out_pairs`: the module and its top-level name), and the same
paths inside fenced code blocks. Run outputs (`outputs/...`, `metrics.csv`) are not repository
paths and are not checked. Pure text processing: no model, no import of mlpim.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


REPO_DIRS = ("mlpim/", "scripts/", "tests/", "docs/")
TOP_FILES = frozenset({"README.md", "CHANGELOG.md", "Makefile", "pyproject.toml"})
MAX_README_LINES = 300  # issue 19: the README is a front door, not a lab notebook

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SPAN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"mlpim(?:\.[A-Za-z_]\w*)+")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
SPLIT = re.compile(r"[\s=,;()'\"\[\]{}]+")


def pages() -> list[Path]:
    """The documentation pages under test: README.md, CHANGELOG.md and docs/*.md."""
    found = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [p for p in found if p.is_file()]


def split_fences(text: str) -> tuple[str, list[str]]:
    """(the text with fenced code blocks blanked, the fenced blocks)."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    return FENCE.sub("", text), blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors a page's headings define (duplicates get -1, -2 ... as on GitHub)."""
    prose, _ = split_fences(text)
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(prose):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def repo_path(token: str) -> str | None:
    """The repository path a token names (a glob pattern), or None when it names none."""
    token = token.strip().rstrip(".:,;").split("::")[0]
    token = re.sub(r":\d+(-\d+)?$", "", token)  # file.py:12
    if token.startswith("./"):
        token = token[2:]
    if token.startswith("conf/"):
        token = "mlpim/" + token
    if not (token.startswith(REPO_DIRS) or token in TOP_FILES):
        return None
    if " " in token:
        return None
    return re.sub(r"<[^>]*>", "*", token)


def path_exists(pattern: str) -> bool:
    """Whether a repository path (or glob) matches something under ROOT."""
    if any(c in pattern for c in "*?["):
        return any(ROOT.glob(pattern.rstrip("/")))
    return (ROOT / pattern).exists()


def _top_level_names(module: Path) -> set[str]:
    """Names a module defines or imports at top level."""
    names = set()
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def dotted_exists(name: str) -> bool:
    """Whether `mlpim.a.b[.attr]` is a module of the repository (and attr a top-level name)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else None
        if module is None and (base / "__init__.py").is_file():
            module = base / "__init__.py"
        if module is not None:
            rest = parts[i:]
            return not rest or rest[0] in _top_level_names(module)
    return False


def _link_problem(target: str, page: Path, text: str) -> str | None:
    """Why a markdown link target of `page` (whose text is `text`) is broken, or None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
        return None
    path, _, anchor = target.partition("#")
    if not path:
        return None if anchor in anchors(text) else f"link {target}: no such heading here"
    dest = (page.parent / path).resolve()
    try:
        rel = dest.relative_to(ROOT).as_posix()
    except ValueError:
        return f"link {target}: outside the repository"
    if not dest.exists():
        return f"link {target}: no such file"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
        return f"link {target}: no heading #{anchor} in {rel}"
    return None


def problems(text: str, page: Path) -> list[str]:
    """Every link, backticked path and dotted name in `text` (as if at `page`) that is missing."""
    prose, blocks = split_fences(text)
    out = [p for t in LINK.findall(prose) if (p := _link_problem(t, page, text))]
    tokens = SPAN.findall(prose)
    tokens += [t for b in blocks for t in SPLIT.split(b)]
    for token in tokens:
        if token.startswith("../"):  # a page-relative path in code: it must stay in the repository
            out += [p.replace("link", "path", 1) for p in [_link_problem(token, page, text)] if p]
            continue
        pattern = repo_path(token)
        if pattern is not None and not path_exists(pattern):
            out.append(f"path {token}: not in the repository")
        for name in DOTTED.findall(token) if token.startswith("mlpim.") else []:
            if not dotted_exists(name):
                out.append(f"name {name}: no such module or top-level name")
    return out


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_named_path_exists(page):
    assert problems(page.read_text(encoding="utf-8"), page) == []


def test_the_checker_finds_what_is_missing():
    """The checker itself, on a fake page in docs/: each kind of missing name is reported."""
    fake = "\n".join(
        [
            "# A page",
            "[fine](paper.md#terms) [fine too](../README.md) [self](#a-page) [no](#b)",
            "![figure](figures/layer_profile.png) [web](https://example.org/x.md)",
            "[gone](nowhere.md) [outside](../../shared/PAPER.md) [bad anchor](results.md#no-such-heading)",
            "[pending](install.md) [pending too](runs-identity.md)",
            "`mlpim/engine/cache.py` `conf/experiment/ioi_mlp8_das.yaml` `mlpim/conf/experiment/*.yaml`",
            "`mlpim/engine/nope.py` `conf/experiment/nope.yaml` `outputs/<run>/subspace.pt` `metrics.csv`",
            "`mlpim.config.compose` `mlpim.tasks.pairs` `mlpim.config.no_such_thing`",
            "see `../../shared/PAPER.md` and `../Makefile`",
            "```bash",
            "python scripts/paper.py --only x && python scripts/missing.py dataset.path=docs/gone.jsonl",
            "```",
        ]
    )
    assert problems(fake, ROOT / "docs" / "fake.md") == [
        "link #b: no such heading here",
        "link nowhere.md: no such file",
        "link ../../shared/PAPER.md: outside the repository",
        "link results.md#no-such-heading: no heading #no-such-heading in docs/results.md",
        "path mlpim/engine/nope.py: not in the repository",
        "path conf/experiment/nope.yaml: not in the repository",
        "name mlpim.config.no_such_thing: no such module or top-level name",
        "path ../../shared/PAPER.md: outside the repository",
        "path scripts/missing.py: not in the repository",
        "path docs/gone.jsonl: not in the repository",
    ]


def test_slug_follows_github():
    assert slug("Speed: `make bench`") == "speed-make-bench"
    assert slug("The fact set (`dataset=facts`)") == "the-fact-set-datasetfacts"
    assert slug("Measured on SmolLM2: stability over DAS seeds") == (
        "measured-on-smollm2-stability-over-das-seeds"
    )


def test_readme_is_a_front_door():
    """Short, and its first screen says how to check a direction."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES
    assert any("experiment=illusion_check direction=" in line for line in lines[:40])


CONTRIBUTING = {  # section of docs/contributing.md -> the most numbered files it may list
    "Add a verdict check": 3,  # its module, its thresholds, where it is measured
    "Add an experiment": 3,  # its YAML, its module, its options
    "Add a direction reader": 2,  # its reader, the sniffer
    "Add a model family": 0,  # bullets, not steps: tiny builder (+ model yaml), family.py
}


def contributing_sections() -> dict[str, str]:
    """docs/contributing.md's `## ` sections by heading."""
    text = (ROOT / "docs" / "contributing.md").read_text(encoding="utf-8")
    parts = re.split(r"^## +(.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize("heading", CONTRIBUTING)
def test_contributing_names_the_files_of_each_addition(heading):
    """Each kind of addition has its section, names files that exist, and stays small."""
    body = contributing_sections()[heading]
    named = [t for t in SPAN.findall(body) if repo_path(t) is not None]
    assert named and all(path_exists(repo_path(t)) for t in named), named
    steps = re.findall(r"^\d+\. ", body, flags=re.M)
    assert len(steps) <= CONTRIBUTING[heading]

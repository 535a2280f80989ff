"""The docs hold what the code says: the README's flag table is the parsers' help, its links and
every cited BENCHMARKS.md / docs heading exist, and it stays a newcomer's length."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))

import flags  # noqa: E402  docs/flags.py


def _headings(path: Path) -> set[str]:
    return {re.sub(r"^#+\s*", "", line).strip() for line in path.read_text().splitlines() if line.startswith("#")}


def test_the_readme_flag_table_is_the_help_of_the_parsers():
    readme = (ROOT / "README.md").read_text()
    assert flags.table() in readme, "README.md's flag table is stale: paste `python docs/flags.py` over it"


def test_the_readme_is_short_and_its_table_cells_too():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    cells = [c for line in lines if line.startswith("|") for c in re.split(r"(?<!\\)\|", line)]
    assert max(map(len, cells)) <= 300


def test_every_cited_heading_and_linked_file_exists():
    """Code, help and docs cite a measurement as `BENCHMARKS.md, "<heading>"` (or a docs/ file): the
    heading must be there, word for word, and every relative link in the Markdown must resolve."""
    sources = [*ROOT.glob("drn/*.py"), *ROOT.glob("search/*.py"), *ROOT.glob("bench/*.py"),
               *ROOT.glob("spaces/*.yaml"), *ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("docs/notes/*.md"),
               ROOT / "cluster.yaml"]
    cite = re.compile(r"((?:BENCHMARKS|docs/[\w.-]+/?[\w.-]*)\.md)[,:]?\s+\"([^\"]+)\"")
    missing, cited = [], 0
    for src in sources:
        flat = re.sub(r"\s*\n\s*(?:#\s*)?", " ", src.read_text())   # comments wrap over lines
        for m in cite.finditer(flat):
            cited += 1
            target = ROOT / m.group(1)
            if not target.exists() or m.group(2).strip() not in _headings(target):
                missing.append(f"{src.relative_to(ROOT)}: {m.group(1)}, \"{m.group(2)[:80]}\"")
        if src.suffix == ".md":
            for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", src.read_text()):
                if not re.match(r"[a-z]+:", link) and not (src.parent / link).exists():
                    missing.append(f"{src.relative_to(ROOT)}: link {link}")
    assert cited > 50 and missing == []

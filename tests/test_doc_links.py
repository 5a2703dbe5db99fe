"""Every relative link in README.md and docs/*.md resolves: the file exists inside the repository
(never under shared/), and a #fragment names a heading of the linked page. The README stays short:
the full benchmark tables live in docs/BENCHMARKS.md."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose(text: str) -> str:
    """The page without its fenced code blocks and inline code spans (no links live there)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page (lowercase, punctuation dropped, spaces to
    hyphens, repeats numbered -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(page.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ... are not checked here


def test_the_anchor_rule_matches_githubs():
    page = ROOT / "README.md"
    assert "durability-and-integrity" in anchors(page) and "headline-numbers" in anchors(page)
    assert "store--python-benchmarksbench_storepy" in anchors(ROOT / "docs" / "BENCHMARKS.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    found = links(page)
    if page.name in ("README.md", "BENCHMARKS.md"):
        assert found  # the parser saw this page's links
    for target in found:
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} -> {linked} does not exist"
        assert ROOT in linked.parents or linked == ROOT, f"{page.name}: {target} leaves the repository"
        assert (ROOT / "shared") not in (linked, *linked.parents), f"{page.name}: {target} points into shared/"
        if fragment:
            assert linked.suffix == ".md", f"{page.name}: {target}: a fragment on a non-markdown file"
            assert fragment in anchors(linked), f"{page.name}: {target}: no heading #{fragment} in {linked.name}"


def test_readme_is_short_and_links_every_benchmark():
    readme = ROOT / "README.md"
    bench = ROOT / "docs" / "BENCHMARKS.md"
    text = readme.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert "../shared" not in text and "](shared" not in text
    assert text.startswith("# lorif-stream\n\n```bash\nbash tools/setup.sh demo ")  # the two commands first
    headings = [l for l in bench.read_text(encoding="utf-8").splitlines() if l.startswith("## ")]
    for command in ("bench_store.py", "bench_build.py", "bench_capture.py", "bench_query.py", "bench_scale.py",
                    "bench_quality.py", "bench_single_pass.py", "bench_curvature.py", "bench_distributed.py",
                    "fault_check.py"):
        assert any(command in h for h in headings), command  # each table sits under its command
    # one headline number per benchmark section: the README links every one of them
    linked = {t.partition("#")[2] for t in links(readme) if t.startswith("docs/BENCHMARKS.md#")}
    assert linked == anchors(bench) - {"benchmarks"}, sorted(linked ^ (anchors(bench) - {"benchmarks"}))

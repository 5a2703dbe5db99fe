"""The report's whitening chart stays legible with many layers (no two labels overlap, long names
abbreviated with the whole name in a tooltip) and its scores keep the same significant digits in
both columns."""
import re

import pytest

from lorif_stream import report as report_module
from lorif_stream.report import SCORE_DIGITS, _score_format, whitening_svg

TEXT = re.compile(r'<text x="([-0-9.]+)" y="([-0-9.]+)"([^>]*)>(?:<title>(.*?)</title>)?(.*?)</text>')
FONT = 11  # the page's svg font-size; font-size="N" overrides it


def _layer(name: str, d_in: int, d_out: int, rank_in: float, rank_out: float, whitened_out: bool = True) -> dict:
    side = lambda dim, rank: {"dim": dim, "effective_rank": rank, "eig_max": 2.0, "eig_mean": 1.0}
    out = side(d_out, rank_out) if whitened_out else {"dim": d_out, "whitened": False}
    return {"name": name, "whitening": {"in": side(d_in, rank_in), "out": out}}


def _boxes(svg: str) -> list[tuple[float, float, float, float, str]]:
    """(left, right, top, bottom, text) of every <text>, from its anchor, font size and a generous
    0.62 em per character."""
    boxes = []
    for x, y, attrs, _, text in TEXT.findall(svg):
        size = float(re.search(r'font-size="([0-9.]+)"', attrs).group(1)) if "font-size" in attrs else FONT
        width = 0.62 * size * len(text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
        left = float(x) - (width if 'text-anchor="end"' in attrs else width / 2 if "middle" in attrs else 0)
        boxes.append((left, left + width, float(y) - size, float(y), text))
    return boxes


@pytest.mark.parametrize("n", [1, 9, 40])
def test_whitening_chart_labels_never_overlap(n):
    layers = [_layer(f"model.transformer.blocks.{i}.attention.output_projection_{i}", 768, 3072,
                     700.5 + i, 12.25 if i % 3 else 3071.0, whitened_out=i != 4) for i in range(n)]
    svg = whitening_svg(layers)
    boxes = _boxes(svg)
    names = [b for b in boxes if "…" in b[4]]
    assert len(names) == n  # every long name shown, abbreviated ...
    assert svg.count("<title>model.transformer.blocks.") >= n  # ... and whole in its tooltip
    assert all(b[4].startswith("model.trans") and b[4].endswith(f"_projection_{i}") for i, b in enumerate(names))
    width = float(re.search(r'viewBox="0 0 ([0-9.]+) ([0-9.]+)"', svg).group(1))
    height = float(re.search(r'viewBox="0 0 ([0-9.]+) ([0-9.]+)"', svg).group(2))
    for i, a in enumerate(boxes):
        assert 0 <= a[0] and a[1] <= width and 0 <= a[2] and a[3] <= height, a  # inside the picture
        for b in boxes[i + 1:]:
            apart = a[1] <= b[0] or b[1] <= a[0] or a[3] <= b[2] or b[3] <= a[2]
            assert apart, (a, b)
    assert (n > 4) == ("out: not whitened (3,072 wide)" in svg)


def test_whitening_chart_escapes_names_and_keeps_short_ones_whole():
    svg = whitening_svg([_layer("h.0.<mlp>", 8, 8, 2.0, 4.0), {"name": "none", "whitening": None}])
    assert "h.0.&lt;mlp&gt;" in svg and "<mlp>" not in svg and "…" not in svg and "none" not in svg
    assert whitening_svg([{"name": "x", "whitening": None}]) == ""


def _significant(shown: str) -> int:
    mantissa = shown.lstrip("+-").split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa)


@pytest.mark.parametrize("scores", [
    [12.3456, 0.5, 0.0123456, -0.00123456, -3.0],   # fixed-point, sizes 10^4 apart
    [9.99996, -0.0099996, 0.5],                      # rounding up to a new decade keeps the digits
    [3.2e5, -2.5e-2, 1.0],                           # one score out of range: scientific for all
    [4.2e-5, -1.5e-6],
])
def test_scores_keep_the_same_significant_digits_in_both_columns(scores):
    fmt = _score_format(scores)
    shown = [fmt(v) for v in scores]
    assert all(_significant(s) == SCORE_DIGITS for s in shown), shown
    assert all(s[0] == ("-" if v < 0 else "+") for s, v in zip(shown, scores)), shown
    assert all(abs(float(s) - v) <= 5e-4 * abs(v) for s, v in zip(shown, scores)), shown
    assert len({"e" in s for s in shown}) == 1  # one notation per query


def test_score_format_examples():
    fmt = _score_format([12.3456, -0.00123456])
    assert (fmt(12.3456), fmt(-0.00123456), fmt(0.0)) == ("+12.35", "-0.001235", "+0.000")
    assert _score_format([2e5])(2e5) == "+2.000e+05"
    assert report_module.SCORE_DIGITS == 4

"""Assertions shared by tests that compare two indexes row by row."""
from __future__ import annotations

import numpy as np

from lorif_stream.store import IndexReader


def assert_same_factors_and_ids(a_path, b_path, sketch_layers=()):
    """Same rows, same ids, bit-identical factors; the curvature statistics of `sketch_layers` (Nyström
    sketches of a lowrank index, EK-FAC sums of an ekfac one) equal within fp32 tolerance."""
    with IndexReader(a_path) as a, IndexReader(b_path) as b, a.snapshot() as sa, b.snapshot() as sb:
        assert sa.rows == sb.rows
        assert sa.ids(0, sa.rows) == sb.ids(0, sb.rows)
        for row in range(sa.rows):
            for (La, Ra), (Lb, Rb) in zip(sa.row(row), sb.row(row)):
                np.testing.assert_array_equal(La, Lb)
                np.testing.assert_array_equal(Ra, Rb)
        for name in sketch_layers:
            stat = f"sketch/{name}/Y" if sa.array(f"sketch/{name}/Y") is not None else f"ekfac/{name}/sums"
            assert sa.array(stat) is not None and sb.array(stat) is not None, stat
            np.testing.assert_allclose(sa.array(stat), sb.array(stat), rtol=1e-4, atol=1e-6)

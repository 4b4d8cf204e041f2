"""Grid semantics against an independent brute-force reference (pixel coverage rules)."""

import itertools

import pytest

from slidelake.grid import TILE_COLUMNS, axis_count, band_tiles, expand_grid, grid_shape, grid_size, row_bands


def reference(length, extent, stride, last):
    """Walk k = 0, 1, ... and apply the edge rules literally."""
    out = []
    k = 0
    while True:
        p = k * stride
        if p >= length:
            break
        fits = p + extent <= length
        if fits:
            out.append(p)
        elif last == "keep":
            # a partial tile, unless an earlier tile already reached the edge
            if not out or out[-1] + extent < length:
                out.append(p)
            break
        elif last == "shift":
            if length >= extent and (not out or out[-1] + extent < length):
                out.append(length - extent)
            break
        else:  # drop
            break
        k += 1
    # "keep"/"shift" when the full tiles stop before the strip that needs covering (gaps):
    return out


CASES = list(itertools.product(
    [1, 5, 100, 255, 256, 257, 511, 512, 1000, 1023],  # length
    [1, 64, 100, 256],  # extent
    [1, 32, 64, 100, 256, 300],  # stride (smaller and larger than extent)
    ["keep", "drop", "shift"],
))


@pytest.mark.parametrize("length,extent,stride,last", CASES)
def test_axis_count_matches_reference(length, extent, stride, last):
    assert axis_count(length, extent, stride, last) == len(reference(length, extent, stride, last))


def _axis_grid(spark, cases, downsample=1.0):
    """The Spark grid of one slide per case ``(length, extent, stride, last)``: ``length`` x 1
    tile px, tiles of ``extent`` x 1 every ``stride`` x 1; the cases sharing a tile geometry are
    the slides of one :func:`expand_grid` (one small job each, no wide union to plan). Returns
    ``{case: [rows sorted by tile_x]}``."""
    groups: dict[tuple, list] = {}
    for c in cases:
        groups.setdefault(c[1:], []).append(c)
    out = {c: [] for c in cases}
    for (extent, stride, last), members in groups.items():
        slides = [dict(slide_id=str(i), extent_x=c[0], extent_y=1, downsample=downsample) for i, c in enumerate(members)]
        for r in expand_grid(spark, slides, (extent, 1), (stride, 1), last).collect():
            out[members[int(r.slide_id)]].append(r)
    return {c: sorted(rows, key=lambda r: r.tile_x) for c, rows in out.items()}


@pytest.mark.spark
def test_spark_grid_matches_reference_on_the_full_table(spark):
    """Every (length, extent, stride, last) of :data:`CASES`: lengths equal to the extent, strides
    dividing ``length - extent``, strides above the extent (gaps); positions, grid indices and
    the part inside the slide."""
    got = _axis_grid(spark, CASES)
    for (length, extent, stride, last), rows in got.items():
        want = reference(length, extent, stride, last)
        assert [r.tile_x for r in rows] == want, (length, extent, stride, last)
        assert [r.tile_col for r in rows] == list(range(len(want)))
        assert [r.valid_width for r in rows] == [min(extent, length - x) for x in want]
        assert all(r.tile_row == r.tile_y == 0 and r.valid_height == 1 for r in rows)


@pytest.mark.spark
@pytest.mark.parametrize("last", ["keep", "drop", "shift"])
@pytest.mark.parametrize("extent,stride", [((64, 48), (64, 48)), ((64, 64), (40, 24)), ((50, 30), (80, 70))])
def test_spark_expand_grid_matches_reference(spark, last, extent, stride):
    specs = [("a", 1000, 777, 1.0), ("b", 130, 50, 2.0), ("c", 10, 10, 4.0)]
    slides = [dict(slide_id=sid, extent_x=W, extent_y=H, downsample=d) for sid, W, H, d in specs]
    rows = expand_grid(spark, slides, extent, stride, last).collect()
    for sid, W, H, d in specs:
        got = sorted((r.tile_x, r.tile_y) for r in rows if r.slide_id == sid)
        want = sorted(itertools.product(reference(W, extent[0], stride[0], last),
                                         reference(H, extent[1], stride[1], last)))
        assert got == want, sid
        assert len(got) == grid_size(W, H, d, extent, stride, last)
        for r in (r for r in rows if r.slide_id == sid):
            assert r.level0_x == int(r.tile_x * d + 0.5) and r.level0_y == int(r.tile_y * d + 0.5)
            assert r.valid_width == min(extent[0], W - r.tile_x)
            assert r.valid_height == min(extent[1], H - r.tile_y)


def test_semantics_on_a_worked_example():
    # 1000 px, 256 px tiles, no overlap: 3 full tiles cover 0..768, 232 px remain
    assert reference(1000, 256, 256, "drop") == [0, 256, 512]
    assert reference(1000, 256, 256, "keep") == [0, 256, 512, 768]
    assert reference(1000, 256, 256, "shift") == [0, 256, 512, 744]
    assert reference(512, 256, 128, "drop") == [0, 128, 256]  # 50 % overlap
    # slide smaller than a tile
    assert reference(100, 256, 256, "keep") == [0]
    assert reference(100, 256, 256, "drop") == reference(100, 256, 256, "shift") == []
    assert [axis_count(1000, 256, 256, last) for last in ("drop", "keep", "shift")] == [3, 4, 4]


@pytest.mark.spark
@pytest.mark.parametrize("downsample", [2.0005, 4.000135, 1.0 / 3.0])
def test_level0_placement_with_non_integer_downsamples(spark, downsample):
    """Real pyramids have downsamples like 2.0005 or 4.000135: level-0 positions are
    ``floor(x * downsample + 0.5)`` (round half up), checked against Python's arithmetic with
    ``Fraction`` (exact) on a grid whose products land near .5."""
    from fractions import Fraction

    cases = [(20011, 256, 256, "keep"), (20011, 224, 150, "shift")]
    for (length, extent, stride, last), rows in _axis_grid(spark, cases, downsample).items():
        assert [r.tile_x for r in rows] == reference(length, extent, stride, last)
        for r in rows:
            exact = Fraction(r.tile_x) * Fraction(downsample) + Fraction(1, 2)
            assert r.level0_x == int(exact // 1), (r.tile_x, downsample)


@pytest.mark.parametrize("rows,tiles,per_band", [(1, 10, 4), (7, 70, 10), (7, 70, 1000), (100, 10_000, 650), (3, 3, 1)])
def test_row_bands_cover_every_row_once(rows, tiles, per_band):
    bands = row_bands(rows, tiles, per_band)
    assert bands[0][0] == 0 and bands[-1][1] == rows
    assert all(b0 < b1 for b0, b1 in bands) and all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
    assert len(bands) == min(rows, -(-tiles // per_band))
    per_row = tiles / rows
    assert max(b1 - b0 for b0, b1 in bands) * per_row <= per_band + per_row  # about per_band tiles each


@pytest.mark.parametrize("batch,cores,want,bands", [
    (19_200, 2, 9_600, 2),        # the benchmark slide (160 x 120 tiles) on 2 cores: a band per core
    (19_200, 1, 19_200, 1),       # on 1 core: one band
    (121_680, 2, 60_840, 2),      # the 100,000 x 80,000 px slide (390 x 312 tiles): two bands, as with the cap alone
    (1_228_800, 2, 65_536, 19),   # capped: a large grid in several waves of bands
    (5_000, 2, 4_096, 2),         # no band below the minimum
    (19_200, 64, 4_096, 5),       # a cluster's many cores: bands of the minimum
    (0, 2, 4_096, 1),
])
def test_band_tiles_spread_a_batch_over_the_cores(batch, cores, want, bands):
    per_band = band_tiles(batch, cores, 65_536, 4_096)
    assert per_band == want
    cols = {19_200: 160, 121_680: 390, 1_228_800: 1280, 5_000: 100, 0: 1}[batch]
    assert len(row_bands(max(1, batch // cols), batch, per_band)) == bands


@pytest.mark.spark
@pytest.mark.parametrize("roi", [None, (300, 250, 1200, 900)])
def test_spark_grid_in_row_bands_is_the_whole_grid(spark, roi):
    """A slide's grid made by several input rows, each a band of grid rows (as the pipeline
    splits a large slide over tasks), equals its grid made in one piece, row for row, with or
    without a ROI (level-0 px; downsample 2)."""
    extent, stride, last = (64, 48), (40, 24), "shift"
    cols, rows = grid_shape(1000, 777, 2.0, extent, stride, last, roi)
    bands = row_bands(rows, cols * rows, cols * rows // 5)
    assert len(bands) == 5
    slide = [dict(slide_id="a", extent_x=1000, extent_y=777, downsample=2.0)]
    got = expand_grid(spark, slide, extent, stride, last, roi, cols * rows // 5).collect()
    want = expand_grid(spark, slide, extent, stride, last, roi).collect()
    assert len(want) == cols * rows and got == want  # same rows, same (raster) order
    assert list(want[0].asDict()) == ["slide_id", *TILE_COLUMNS]


@pytest.mark.spark
def test_spark_expand_grid_roi(spark):
    slides = [dict(slide_id="a", extent_x=1000, extent_y=800, downsample=2.0)]
    # ROI in level-0 px: x 400..1000, y 200..600 -> tile px x 200..500, y 100..300
    rows = expand_grid(spark, slides, (100, 100), (100, 100), "drop", roi=(400, 200, 600, 400)).collect()
    got = sorted((r.tile_x, r.tile_y) for r in rows)
    assert got == sorted(itertools.product([200, 300, 400], [100, 200]))
    assert len(rows) == grid_size(1000, 800, 2.0, (100, 100), (100, 100), "drop", (400, 200, 600, 400))


@pytest.mark.parametrize("expected, per_task, cores, n", [
    (5753, 2048, 2, 4),    # 3 tasks of work -> 4, so the last wave fills both cores
    (0, 2048, 2, 2),       # nothing expected: still one task per core
    (100, 2048, 8, 8),
    (20000, 2048, 8, 16),
    (4096, 2048, 1, 2),
])
def test_partition_count(expected, per_task, cores, n):
    from slidelake.decode import partition_count

    assert partition_count(expected, per_task, cores) == n


def test_repartition_keeps_regions_together_in_raster_order(spark):
    from slidelake.config import PartitionConfig
    from slidelake.decode import repartition_tiles

    slides = [dict(slide_id="a", extent_x=2000, extent_y=1500, downsample=1.0),
              dict(slide_id="b", extent_x=1024, extent_y=1024, downsample=1.0)]
    grid = expand_grid(spark, slides, (64, 64), (64, 64), "keep")
    cfg = PartitionConfig(region_tiles=4, tiles_per_partition=300)
    parts = repartition_tiles(grid, cfg, grid.count()).select(
        "slide_id", "tile_x", "tile_y", "tile_col", "tile_row").rdd.glom().collect()
    # 32 x 24 + 16 x 16 = 1024 tiles -> ceil(1024 / 300) = 4 tasks, a multiple of the cores
    cores = spark.sparkContext.defaultParallelism
    assert len(parts) == cores * -(-4 // cores)
    rows = [r for p in parts for r in p]
    assert len(rows) == len({(r.slide_id, r.tile_x, r.tile_y) for r in rows}) == 32 * 24 + 16 * 16
    home = {}
    for i, p in enumerate(parts):
        # region by region, raster order within a region
        keys = [(r.slide_id, r.tile_row // 4, r.tile_col // 4, r.tile_y, r.tile_x) for r in p]
        assert keys == sorted(keys)
        for r in p:  # every tile of a 4 x 4 region is in one task
            assert home.setdefault((r.slide_id, r.tile_row // 4, r.tile_col // 4), i) == i


def test_region_task_deals_a_tissue_disc_evenly():
    """The diagonal lattice gives each task an even share of an elliptical tissue region (the
    largest task within 8 % of the mean for 2-8 tasks), where a random task per region (what a
    hash of the region does) leaves the largest task 8-30 % over the mean."""
    import numpy as np

    from slidelake.decode import region_task

    ty, tx = np.mgrid[0:120, 0:160]
    inside = ((tx - 70) / 55.0) ** 2 + ((ty - 60) / 40.0) ** 2 <= 1  # kept tiles: an ellipse
    rr, rc = ty[inside] // 8, tx[inside] // 8
    regions, inv = np.unique(rr * 1000 + rc, return_inverse=True)
    rng = np.random.default_rng(0)
    for n in (2, 4, 6, 8):
        task = region_task(rr, rc, 1, n)
        assert task.min() >= 0 and task.max() < n
        lattice = np.bincount(task, minlength=n).max() / (inside.sum() / n)
        hashed = np.median([np.bincount(rng.integers(0, n, len(regions))[inv], minlength=n).max() / (inside.sum() / n)
                            for _ in range(50)])
        assert lattice < 1.08 and hashed > lattice + 0.04, (n, lattice, hashed)
        # neighbouring regions, across and down, go to different tasks
        assert region_task(0, 0, 0, n) not in (region_task(0, 1, 0, n), region_task(1, 0, 0, n))


def test_repartition_puts_each_region_in_its_lattice_task(spark):
    """repartitionById sends each row to exactly the task region_task names (Spark >= 4.1),
    and the tasks of a disc of kept tiles are even."""
    from pyspark.sql import functions as F

    from slidelake.config import PartitionConfig
    from slidelake.decode import partition_count, region_task, repartition_tiles

    slides = [dict(slide_id="a", extent_x=4096, extent_y=3072, downsample=1.0),
              dict(slide_id="b", extent_x=2048, extent_y=2048, downsample=1.0)]
    grid = expand_grid(spark, slides, (64, 64), (64, 64), "drop")
    # keep a disc of each slide, as a mask would
    grid = grid.where((F.col("tile_col") - 30) ** 2 + (F.col("tile_row") - 24) ** 2 <= 20 ** 2)
    n_rows = grid.count()
    cfg = PartitionConfig(region_tiles=4, tiles_per_partition=300)
    n = partition_count(n_rows, 300, spark.sparkContext.defaultParallelism)
    parts = repartition_tiles(grid, cfg, n_rows).withColumn("offset", F.pmod(F.xxhash64("slide_id"), F.lit(n))) \
        .select("slide_id", "tile_col", "tile_row", "offset").rdd.glom().collect()
    assert len(parts) == n >= 4 and sum(len(p) for p in parts) == n_rows
    for i, p in enumerate(parts):
        for r in p:
            assert region_task(r.tile_row // 4, r.tile_col // 4, r.offset, n) == i
    sizes = [len(p) for p in parts]
    assert max(sizes) / (n_rows / n) < 1.1, sizes


def test_level0_rects_scale_the_valid_part_by_the_downsample():
    import numpy as np
    import pyarrow as pa

    from slidelake.grid import level0_rects

    t = pa.table({"level0_x": [0, 1024, 2048], "level0_y": [512, 512, 512], "valid_width": [256, 256, 100],
                  "valid_height": [256, 256, 37], "downsample": [4.0, 4.0, 2.5]})
    got = level0_rects(t)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [[0, 512, 1024, 1536], [1024, 512, 2048, 1536], [2048, 512, 2298, 604]])


def test_axis_count_edges_and_bad_input():
    """A slide exactly one tile long, an empty axis, and the errors' words."""
    for last in ("keep", "drop", "shift"):
        assert axis_count(256, 256, 256, last) == 1 == len(reference(256, 256, 256, last))
        assert axis_count(256, 256, 100, last) == 1
        assert axis_count(0, 256, 256, last) == 0 == axis_count(-5, 256, 256, last)
    assert axis_count(255, 256, 256, "keep") == 1 and axis_count(255, 256, 256, "drop") == 0
    for extent, stride in ((0, 256), (256, 0)):
        with pytest.raises(ValueError, match="extent and stride must be >= 1"):
            axis_count(1000, extent, stride, "drop")
    with pytest.raises(ValueError, match="unknown edge policy last='pad'"):
        axis_count(1000, 256, 256, "pad")


def test_band_sizes_at_their_bounds():
    assert row_bands(0, 0, 10) == [(0, 0)]  # an empty grid is one empty band
    assert band_tiles(1, 2, 8, 1) == 1 and band_tiles(0, 0, 8, 1) == 1  # never fewer than one tile
    assert band_tiles(100, 2, 8, 1) == 8 and band_tiles(10, 2, 64, 16) == 16

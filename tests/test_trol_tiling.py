"""trol.tiling: the released TroL/InternViT grid rule, tile shapes and order, thumbnail,
argument checks, and where transformers' InternVL grid choice differs from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trol.tiling import choose_grid, num_tiles, tile_image

TILE = 448


def reference_grid(width, height, min_tiles, max_tiles, tile_size=TILE):
    """The released rule, restated from its description (kept apart from trol.tiling)."""
    candidates = set()
    for budget in range(min_tiles, max_tiles + 1):  # released nesting; set order can hinge on it
        for i in range(1, budget + 1):
            for j in range(1, budget + 1):
                if min_tiles <= i * j <= max_tiles:
                    candidates.add((i, j))
    best, best_difference = (1, 1), float("inf")
    for i, j in sorted(candidates, key=lambda c: c[0] * c[1]):
        difference = abs(i / j - width / height)
        if difference < best_difference:
            best, best_difference = (i, j), difference
        elif difference == best_difference and width * height > 0.5 * tile_size * tile_size * i * j:
            best = (i, j)
    return best


# Aspect ratios from 1:6 to 6:1, then exact ties: 1.5 sits 0.5 from 1:1, 2:1 and 2:2; 2.5 is
# 0.5 from 2:1 and 3:1; same-ratio pairs of small and large images flip the area rule.
SIZES = [
    (100, 600), (100, 500), (100, 400), (100, 300), (200, 500), (100, 200), (200, 300),
    (300, 400), (400, 500), (500, 600), (100, 100), (600, 500), (500, 400), (400, 300),
    (300, 200), (200, 100), (500, 200), (300, 100), (700, 200), (400, 100), (500, 100),
    (600, 100), (1000, 300), (560, 448),
    (672, 448), (448, 672), (448, 448), (896, 896), (896, 448), (1344, 448), (448, 1344),
    (150, 100), (1500, 1000), (32, 32), (1000, 1000), (250, 100), (2500, 1000), (40, 16),
    (1120, 448), (5, 30), (3000, 500),
]


@pytest.mark.parametrize("max_tiles", range(1, 7))
@pytest.mark.parametrize("width,height", SIZES)
def test_choose_grid_follows_the_released_rule(width, height, max_tiles):
    assert choose_grid(width, height, max_tiles=max_tiles) == reference_grid(width, height, 1, max_tiles)


@pytest.mark.parametrize("min_tiles,max_tiles", [(2, 2), (2, 6), (3, 5), (4, 4), (4, 6), (5, 5), (6, 12)])
def test_choose_grid_with_a_minimum_tile_count(min_tiles, max_tiles):
    for width, height in SIZES:
        expected = reference_grid(width, height, min_tiles, max_tiles)
        assert choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles) == expected


@pytest.mark.parametrize(
    "width,height,max_tiles,expected",
    [
        (448, 448, 6, (1, 1)),    # 2x2 ties 1x1 but the image fills under half of it
        (896, 896, 6, (2, 2)),    # same ratio, enough pixels: the tie goes to 2x2
        (150, 100, 2, (1, 1)),    # 1.5 is 0.5 from 1:1 and 2:1; small image keeps 1x1
        (1500, 1000, 2, (2, 1)),  # ... a large one moves to 2x1
        (672, 448, 5, (2, 1)),    # 2x2 ties again but would be more than twice the area
        (672, 448, 6, (3, 2)),    # exact match
        (100, 600, 6, (1, 6)),
        (600, 100, 6, (6, 1)),
        (600, 100, 4, (4, 1)),
    ],
)
def test_choose_grid_known_answers(width, height, max_tiles, expected):
    assert choose_grid(width, height, max_tiles=max_tiles) == expected


def _transformers_grid(width, height, min_tiles, max_tiles):
    pil_processor = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    # get_optimal_tiled_canvas(original_image_size=(h, w), target_tile_size=(h, w), min, max) -> (cols, rows)
    return pil_processor.get_optimal_tiled_canvas((height, width), (TILE, TILE), min_tiles, max_tiles)


@pytest.mark.parametrize(
    "width,height,official,transformers_choice",
    [(40, 16, (4, 1), (2, 2)), (1120, 448, (2, 2), (4, 1))],
)
def test_transformers_breaks_equal_count_ties_the_other_way(width, height, official, transformers_choice):
    """Why trol.tiling owns the rule: with exactly 4 tiles, aspect 2.5 is 1.5 from both 4:1 and
    2:2; the released order meets 4:1 first, transformers meets 2:2 first."""
    assert reference_grid(width, height, 4, 4) == official
    assert choose_grid(width, height, min_tiles=4, max_tiles=4) == official
    assert _transformers_grid(width, height, 4, 4) == transformers_choice


def test_transformers_agrees_when_min_tiles_is_one():
    """TroL's own setting (min_tiles=1) is where the two coincide on every case here."""
    for width, height in SIZES:
        for max_tiles in range(1, 7):
            assert _transformers_grid(width, height, 1, max_tiles) == choose_grid(
                width, height, max_tiles=max_tiles
            ), (width, height, max_tiles)


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def _color_grid(columns, rows, cell):
    """Image of columns x rows cells of side `cell`, cell k (row-major) in COLORS[k]."""
    pixels = np.zeros((rows * cell, columns * cell, 3), np.uint8)
    for k in range(columns * rows):
        row, column = divmod(k, columns)
        pixels[row * cell:(row + 1) * cell, column * cell:(column + 1) * cell] = COLORS[k]
    return Image.fromarray(pixels)


def _center(tile):
    return tuple(int(v) for v in np.asarray(tile)[tile.height // 2, tile.width // 2])


def test_tiles_are_cut_row_major_with_the_thumbnail_last():
    image = _color_grid(3, 2, 224)  # 672x448 -> 3x2 grid, upscaled 2x before cutting
    tiles = tile_image(image)
    assert len(tiles) == 7 == num_tiles(*image.size)
    assert all(t.size == (TILE, TILE) and t.mode == "RGB" for t in tiles)
    assert [_center(t) for t in tiles[:6]] == COLORS
    thumbnail = np.asarray(tiles[6])
    for k, color in enumerate(COLORS):  # the thumbnail shows the whole image, cells in place
        row, column = divmod(k, 3)
        assert tuple(thumbnail[row * 224 + 112, column * 149 + 75]) == color


def test_thumbnail_only_with_more_than_one_tile():
    assert len(tile_image(Image.new("RGB", (448, 448)))) == 1
    assert len(tile_image(Image.new("RGB", (896, 448)))) == 3
    assert len(tile_image(Image.new("RGB", (896, 448)), thumbnail=False)) == 2
    assert len(tile_image(Image.new("RGB", (896, 448)), max_tiles=1)) == 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_any_mode_gives_rgb_tiles(mode):
    tiles = tile_image(Image.new(mode, (90, 30)), tile_size=32)
    assert len(tiles) == 4 and all(t.mode == "RGB" and t.size == (32, 32) for t in tiles)


@pytest.mark.parametrize("thumbnail", [True, False])
@pytest.mark.parametrize("width,height", [(20, 120), (64, 64), (40, 40), (96, 64), (300, 60), (128, 64), (7, 5)])
@pytest.mark.parametrize("min_tiles,max_tiles", [(1, 1), (1, 6), (2, 6), (1, 12)])
def test_num_tiles_matches_tile_image(width, height, min_tiles, max_tiles, thumbnail):
    settings = dict(tile_size=32, min_tiles=min_tiles, max_tiles=max_tiles, thumbnail=thumbnail)
    tiles = tile_image(Image.new("RGB", (width, height)), **settings)
    assert num_tiles(width, height, **settings) == len(tiles)
    assert all(t.size == (32, 32) for t in tiles)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(min_tiles=0), "min_tiles"),
        (dict(min_tiles=3, max_tiles=2), "max_tiles"),
        (dict(tile_size=0), "tile_size"),
        (dict(width=0), "width"),
        (dict(height=-1), "height"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    size = dict(width=kwargs.pop("width", 10), height=kwargs.pop("height", 10))
    with pytest.raises(ValueError, match=name):
        choose_grid(size["width"], size["height"], **kwargs)
    with pytest.raises(ValueError, match=name):
        num_tiles(size["width"], size["height"], **kwargs)
    with pytest.raises(ValueError, match=name):
        tile_image(Image.new("RGB", (size["width"], max(size["height"], 0))), **kwargs)


def test_module_needs_neither_torch_torchvision_nor_ray():
    path = Path(__file__).resolve().parent.parent / "trol" / "tiling.py"
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tiling', {str(path)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(sorted({'torch', 'torchvision', 'ray'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

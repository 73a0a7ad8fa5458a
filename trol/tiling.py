"""Dynamic image tiling of the released TroL-3.8B (InternViT-300M, 448-px tiles).

An image is resized onto a grid of `columns x rows` square tiles whose aspect ratio is
closest to the image's, cut row-major, and (with more than one tile) followed by a
thumbnail of the whole image. PIL + numpy only: no torch, torchvision or ray.

Why not transformers' `get_optimal_tiled_canvas` (models/got_ocr2, InternVL's processor):
it applies the same distance and area rules, but walks candidates of equal tile count in
nested-loop order ((1, 4), (2, 2), (4, 1)), whereas the released code walks a Python set
sorted by tile count ((4, 1) before (2, 2) in CPython). When two grids with the same tile
count are equally far from the image's aspect ratio, the one met first wins (or, for
large images, the one met second), so the two disagree. Example, min_tiles=max_tiles=4:
a 40x16 image (aspect 2.5 is 1.5 from both 4:1 and 2:2) gets (4, 1) officially and
(2, 2) from transformers; a 1120x448 image (the area rule now applies) gets (2, 2)
officially and (4, 1) from transformers. With min_tiles=1 (TroL's setting) no
disagreement was found, but the rule is cheap enough to own outright.
"""

from __future__ import annotations

from functools import lru_cache

from PIL import Image

__all__ = ["choose_grid", "num_tiles", "tile_image"]


def _check_settings(min_tiles: int, max_tiles: int, tile_size: int) -> None:
    if min_tiles < 1:
        raise ValueError(f"min_tiles must be >= 1, got {min_tiles}")
    if max_tiles < min_tiles:
        raise ValueError(f"max_tiles must be >= min_tiles ({min_tiles}), got {max_tiles}")
    if tile_size <= 0:
        raise ValueError(f"tile_size must be > 0, got {tile_size}")


def _check_image_size(width: int, height: int) -> None:
    if width <= 0:
        raise ValueError(f"image width must be > 0, got {width}")
    if height <= 0:
        raise ValueError(f"image height must be > 0, got {height}")


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """(columns, rows) grids in the order the released code tries them.

    The order among grids with equal tile count is a CPython set's iteration order, which
    decides ties, so it is reproduced by building a set the same way at run time. Set order
    also depends on insertion order when hashes collide (it does for min 3, max 5), hence
    the released loop nesting: tile budget n outermost, then columns, then rows.
    """
    grids = set(
        (columns, rows)
        for budget in range(min_tiles, max_tiles + 1)
        for columns in range(1, budget + 1)
        for rows in range(1, budget + 1)
        if min_tiles <= columns * rows <= max_tiles
    )
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def choose_grid(
    width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 6, tile_size: int = 448
) -> tuple[int, int]:
    """(columns, rows) of the tile grid whose aspect ratio is closest to width/height."""
    _check_settings(min_tiles, max_tiles, tile_size)
    _check_image_size(width, height)
    aspect_ratio = width / height
    image_area = width * height
    best_grid, best_difference = (1, 1), float("inf")
    for columns, rows in _candidate_grids(min_tiles, max_tiles):
        difference = abs(aspect_ratio - columns / rows)
        if difference < best_difference:
            best_grid, best_difference = (columns, rows), difference
        # On a tie prefer the later (larger) grid only while the image has more than half
        # the pixels the grid would hold, so small images are not blown up into many tiles.
        elif difference == best_difference and image_area > 0.5 * tile_size**2 * columns * rows:
            best_grid = (columns, rows)
    return best_grid


def num_tiles(
    width: int,
    height: int,
    *,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 6,
    thumbnail: bool = True,
) -> int:
    """Number of tiles `tile_image` yields for a width x height image, thumbnail included."""
    columns, rows = choose_grid(
        width, height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size
    )
    grid_tiles = columns * rows
    return grid_tiles + 1 if thumbnail and grid_tiles > 1 else grid_tiles


def tile_image(
    image: Image.Image,
    *,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 6,
    thumbnail: bool = True,
) -> list[Image.Image]:
    """Square RGB tiles of `image`, row-major, then a whole-image thumbnail if >1 tile."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    columns, rows = choose_grid(
        *rgb.size, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size
    )
    resized = rgb.resize((columns * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((column * tile_size, row * tile_size,
                      (column + 1) * tile_size, (row + 1) * tile_size))
        for row in range(rows)
        for column in range(columns)
    ]
    if thumbnail and len(tiles) > 1:
        tiles.append(rgb.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles

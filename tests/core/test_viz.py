"""viz.py: image conversions round to the right bytes, grids have the size of their cells, the heat ramp, one query
point per class inside its class, and the attention figure's layout."""

import numpy as np
import torch

import viz


def test_tensor_to_image_conversions():
    gray = viz.to_pil_gray(torch.tensor([[[0.0, 0.5, 1.0, 2.0]]]))
    assert gray.mode == "L" and list(gray.tobytes()) == [0, 128, 255, 255]
    rgb = viz.to_pil_rgb(torch.tensor([[[-1.0]], [[0.0]], [[1.0]]]))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (0, 128, 255)


def test_grid_size_follows_its_cells():
    im = viz.to_pil_gray(torch.zeros(1, 8, 10))
    g = viz.grid([[im, im, im], [im]], labels=["a", "b", "c"], pad=2)
    assert g.size == (3 * 12 + 2, 12 + 2 * 10 + 2)
    assert viz.grid([[im]], pad=0, scale=3).size == (30, 24)


def test_heat_ramp_runs_black_to_white():
    h = viz.heat(np.array([[0.0, 1.0, 2.0]]))
    assert h.dtype == np.uint8 and h[0, 0].tolist() == [0, 0, 0] and h[0, 1].tolist() == [255, 255, 255]
    assert h[0, 2].tolist() == [255, 255, 255]


def test_query_points_are_one_per_class_inside_the_class_smallest_first():
    ids = torch.zeros(32, 32, dtype=torch.long)
    ids[4:8, 4:8] = 3
    ids[16:32, 0:16] = 5
    pts = viz.query_points(ids)
    assert [c for c, _, _ in pts] == [3, 5, 0]
    assert all(ids[y, x] == c for c, y, x in pts)


def test_attention_figure_has_a_row_per_block_and_a_column_per_class():
    H = W = 32
    ids = torch.zeros(H, W, dtype=torch.long)
    ids[:, 16:] = 1
    maps = {f"double.{i}": torch.rand(8, 4) for i in range(2)} | {"single.0": torch.rand(8, 4)}
    fig = viz.attention_figure(maps, torch.zeros(3, H, W), torch.zeros(3, H, W), ids, {0: "sky", 1: "road"})
    assert fig.size == (3 * (W + 2) + 2, 12 + 3 * (H + 2) + 2)

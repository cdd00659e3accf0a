"""Input geometries (square, letterbox, tiles): pixels, tiles, stitching, pooling and bad values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from defect_detection import UserError
from defect_detection.data.geometry import Letterbox, Square, Tiles, axis_starts, build_geometry, size_hw
from defect_detection.models.aggregation import image_logits, pool_log_odds


@pytest.mark.parametrize("length,tile,overlap", [(1024, 64, 16), (100, 32, 0), (97, 32, 31), (64, 64, 8),
                                                 (3796, 512, 64)])
def test_tiles_cover_every_pixel_and_the_last_is_flush_with_the_edge(length, tile, overlap):
    starts = axis_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == length - tile
    covered = np.zeros(length, dtype=bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    assert (np.diff(starts) <= tile - overlap).all() and (np.diff(starts) > 0).all()


def test_cut_matches_crops_and_stitch_inverts_it():
    g = Tiles(size=(32, 48), overlap=8)
    x = torch.rand(3, 70, 200)
    tiles = g.cut(x)
    ys, xs = g.tile_starts((70, 200))
    assert tiles.shape == (len(ys) * len(xs), 3, 32, 48)
    k = 0
    for y in ys:
        for xx in xs:
            assert torch.equal(tiles[k], x[:, y:y + 32, xx:xx + 48])
            k += 1
    # maps that are the image itself stitch back to the image (overlaps average equal values)
    assert torch.allclose(g.stitch(tiles[:, 0], (70, 200)), x[0], atol=1e-6)


def test_letterbox_keeps_the_aspect_and_maps_return_without_the_padding():
    g = Letterbox(size=(64, 256))
    im = Image.fromarray(np.full((100, 800, 3), 200, dtype=np.uint8))
    out = g.prepare(im)
    top, left, h, w = g.content_box((100, 800))
    assert out.shape == (64, 256, 3) and (h, w) == (32, 256) and top == 16
    assert (out[:top] == 128).all() and (out[top:top + h] == 200).all()
    prepared_map = torch.zeros(64, 256)
    prepared_map[top:top + h] = 1.0  # evidence only on the photo
    back = g.to_original(prepared_map, (100, 800))
    assert back.shape == (100, 800) and torch.allclose(back, torch.ones(100, 800))


def test_square_is_the_old_resize():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    expected = np.asarray(im.resize((64, 64), Image.Resampling.BILINEAR))
    assert np.array_equal(Square(size=(64, 64)).prepare(im), expected)


def test_pooling_rules():
    z = torch.tensor([0.0, 5.0, 1.0, 2.0, 3.0])
    counts = torch.tensor([3, 2])
    assert pool_log_odds(z, counts, "max").tolist() == [5.0, 3.0]
    assert pool_log_odds(z, counts, "topk_mean", k=2).tolist() == [3.0, 2.5]
    smooth = pool_log_odds(z, counts, "smooth_max", tau=0.01)
    assert torch.allclose(smooth, torch.tensor([5.0, 3.0]), atol=0.02)  # tau -> 0 is the max
    logits = torch.stack([torch.zeros(5), z], 1)
    assert torch.equal(image_logits(logits, counts), torch.tensor([[0.0, 5.0], [0.0, 3.0]]))
    assert image_logits(logits, None) is logits  # one tile per image: the tile logits themselves


@pytest.mark.parametrize("cfg,key", [
    ({"name": "tiles", "tile_size": 64, "overlap": 64}, "input.overlap"),
    ({"name": "tiles", "tile_size": 64, "overlap": -1}, "input.overlap"),
    ({"name": "tiles", "tile_size": 64, "scale": 0}, "input.scale"),
    ({"name": "tiles", "tile_size": 64, "scale": 1.5}, "input.scale"),
    ({"name": "tiles", "tile_size": 0}, "input.tile_size"),
    ({"name": "tiles", "tile_size": [64, -3]}, "input.tile_size"),
    ({"name": "fisheye"}, "input="),
])
def test_bad_geometry_values_name_the_key_and_the_range(cfg, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        build_geometry(cfg, 224)


def test_bad_working_size_names_data_image_size():
    with pytest.raises(UserError, match=r"data\.image_size"):
        size_hw([224], "data.image_size")
    assert size_hw([128, 2048]) == (128, 2048) and size_hw(96) == (96, 96)


def test_an_image_smaller_than_a_tile_is_upscaled_to_fit_and_says_so():
    g = build_geometry({"name": "tiles", "tile_size": 256, "overlap": 32, "scale": 0.5}, 224)
    # 300 px high at scale 0.5 is 150 px: upscaled (aspect kept) until a 256 px tile fits
    assert g.prepared_hw((300, 4096)) == (256, 3496)
    assert g.upscale_note((300, 4096), "part.png") == (
        "part.png: 4096 x 300 px at input.scale=0.5 is smaller than one 256 x 256 tile: upscaled to "
        "3496 x 256")
    assert g.prepared_hw((512, 4096)) == (256, 2048) and g.upscale_note((512, 4096)) is None
    image = Image.fromarray(np.zeros((300, 4096, 3), np.uint8))
    x = torch.from_numpy(np.array(g.prepare(image))).permute(2, 0, 1)
    assert tuple(x.shape[1:]) == (256, 3496) and g.cut(x).shape[1:] == (3, 256, 256)  # cuts, no crash
    # size jitter: a portrait part 3 px shorter than the tile plan still tiles
    jitter = build_geometry({"name": "tiles", "tile_size": [282, 112], "overlap": 16}, 224)
    assert jitter.prepared_hw((279, 112)) == (282, 114)


def test_schema_rejects_a_tile_below_the_backbone_minimum(cfg_factory):
    from defect_detection.schema import validate_train_config

    cfg = cfg_factory("input=tiles", "input.tile_size=16")
    with pytest.raises(UserError, match=r"input\.tile_size=16"):
        validate_train_config(cfg)
    validate_train_config(cfg_factory("input=tiles", "input.tile_size=[32,64]"))
    validate_train_config(cfg_factory("input=letterbox", "data.image_size=[64,256]"))

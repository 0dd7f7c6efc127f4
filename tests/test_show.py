"""``keel show``: neighbour grids, attention maps and MAE reconstructions from checkpoints."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import keel
from keel import show
from keel.cli import main
from keel.data.sources import build_dataset
from keel.evaluate.frozen import make_eval_transform

# A ViT run small enough for seconds: 16 px digits (a 4x4 patch grid), one step.
VIT_RUN = ["model.name=vit_tiny_patch4_32", "data.img_size=16", "data.subset=64", "train.batch_size=32",
           "train.max_steps=1"]
MAE_RUN = VIT_RUN + ["method.name=mae", "method.decoder_depth=1", "method.decoder_dim=32", "method.decoder_heads=4"]


def _px(rows: int, cols: int) -> tuple[int, int]:
    """A grid picture's (width, height) in pixels: cells of CELL inches plus the title band."""
    return round(cols * show.CELL * show.DPI), round((rows * show.CELL + show.TITLE_BAND) * show.DPI)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("keel show: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def vit_run(tiny_cfg_factory, tmp_path_factory):
    from keel.jobs.pretrain import pretrain

    run = tmp_path_factory.mktemp("show") / "vit-run"
    pretrain(tiny_cfg_factory(*VIT_RUN), run_dir=run, quiet=True)
    return run


def _tiny_vit(**kw):
    torch.manual_seed(0)
    return keel.create_model("vit_tiny_patch4_32", img_size=16, depth=2, dim=48, num_heads=3, **kw).eval()


# ---------------------------------------------------------------- neighbours
def test_nearest_neighbors_is_a_cosine_sort():
    g = torch.Generator().manual_seed(0)
    gallery = torch.randn(40, 16, generator=g)
    query = torch.randn(5, 16, generator=g)
    query[2] = gallery[17] * 3.0  # a query in the gallery (scaled: cosine ignores the norm)
    got = show.nearest_neighbors(query, gallery, k=7)
    for i in range(len(query)):
        cos = [float(query[i] @ gallery[j] / (query[i].norm() * gallery[j].norm())) for j in range(len(gallery))]
        assert got[i].tolist() == sorted(range(len(gallery)), key=lambda j: -cos[j])[:7]
    assert got[2, 0] == 17
    # excluding a query's own row gives the next ones, and k is capped at what is left
    excl = show.nearest_neighbors(query, gallery, k=40, exclude=torch.tensor([-1, -1, 17, -1, -1]))
    assert excl.shape == (5, 39) and excl[2].tolist() == show.nearest_neighbors(query, gallery, k=40)[2, 1:].tolist()


def test_neighbors_png(vit_run, tmp_path, capsys):
    argv = ["show", "neighbors", "--checkpoint", str(vit_run), "--data", "digits", "--out", str(tmp_path),
            "--n", "3", "--k", "4", "--gallery", "64"]
    assert main(argv) == 0
    png = tmp_path / "neighbors.png"
    assert str(png) in capsys.readouterr().out
    assert Image.open(png).size == _px(rows=3, cols=1 + 4)


def test_gallery_rows_point_at_the_right_files(tmp_path):
    """A folder without labels, one file that cannot be decoded: each feature row carries the
    position of the image it came from, and queries never find themselves."""
    g = torch.Generator().manual_seed(0)
    for i in range(9):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
    (tmp_path / "img3.png").write_bytes(b"not a png")
    model = _tiny_vit()
    gal, queries = show.neighbor_splits(str(tmp_path), 16, gallery=0)
    assert queries is None and len(gal) == 9
    feats, labels, index = show.embed_dataset(model, gal, 16, progress=False)
    assert index.tolist() == [0, 1, 2, 4, 5, 6, 7, 8] and (labels == -1).all()
    images, _, _ = show.take_images(gal, index)
    torch.testing.assert_close(feats, show.embed_images(model, images, 16))
    out = show.show_neighbors(model, str(tmp_path), tmp_path / "out", 16, n=2, k=3, progress=False)
    assert Image.open(out).size == _px(rows=2, cols=4)


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("distilled", [False, True], ids=["cls", "cls+dist"])
def test_attention_maps_are_the_class_token_row(distilled):
    model = _tiny_vit(distilled=distilled)
    prefix = 2 if distilled else 1
    images = build_dataset("digits", "test", 16).images[:3]
    x = make_eval_transform(16)(images)
    row = show.class_token_attention(model, x)
    assert row.shape == (3, 3, prefix + 16)
    torch.testing.assert_close(row.sum(-1), torch.ones(3, 3))  # a softmax over prefix + patches
    maps = show.attention_maps(model, images, 16)
    assert maps.shape == (3, 3, 16, 16)
    # one flat 4x4 square per patch, holding that patch's weight (row by row)
    grid = row[:, :, prefix:].reshape(3, 3, 4, 4)
    torch.testing.assert_close(maps[..., ::4, ::4], grid, rtol=0, atol=0)
    torch.testing.assert_close(maps[..., 3::4, 3::4], grid, rtol=0, atol=0)


def test_attention_png(vit_run, tmp_path, capsys):
    assert main(["show", "attention", "--checkpoint", str(vit_run / "backbone.safetensors"),
                 "--out", str(tmp_path), "--n", "2"]) == 0  # data: the run's own (digits)
    png = tmp_path / "attention.png"
    assert str(png) in capsys.readouterr().out
    assert Image.open(png).size == _px(rows=2, cols=2 + 3)  # image, mean, 3 heads


def test_attention_of_a_resnet_is_a_one_line_error(tmp_path, capsys):
    from keel.engine.checkpoint import export_backbone

    export_backbone(keel.create_model("resnet10_cifar", img_size=8), tmp_path,
                    {"model": "resnet10_cifar", "model_kwargs": {"img_size": 8}})
    assert main(["show", "attention", "--checkpoint", str(tmp_path), "--data", "digits"]) == 2
    err = _error(capsys)
    assert "resnet10_cifar" in err and "ViT" in err
    assert not (tmp_path / "attention.png").exists()


@pytest.mark.parametrize("picture", ["neighbors", "attention", "mae"])
def test_missing_checkpoint_is_a_one_line_error(picture, tmp_path, capsys):
    assert main(["show", picture, "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "nope" in _error(capsys)


def test_bad_numbers_are_one_line_errors(tmp_path, capsys):
    assert main(["show", "neighbors", "--checkpoint", str(tmp_path), "--k", "0"]) == 2
    assert "--k" in _error(capsys)


# ---------------------------------------------------------------- MAE
def test_mae_of_another_method_names_it(vit_run, capsys):
    assert main(["show", "mae", "--checkpoint", str(vit_run)]) == 2
    assert "simclr" in _error(capsys)


def test_mae_png_and_visible_patches_kept(tiny_cfg_factory, tmp_path, capsys):
    from keel.jobs.pretrain import pretrain

    import keel.tasks.ssl.mae  # noqa: F401  (registers the method for pretrain)

    run = tmp_path / "mae-run"
    pretrain(tiny_cfg_factory(*MAE_RUN), run_dir=run, quiet=True)
    assert main(["show", "mae", "--checkpoint", str(run), "--n", "3"]) == 0
    assert str(run / "mae.png") in capsys.readouterr().out
    assert Image.open(run / "mae.png").size == _px(rows=3, cols=3)

    method, cfg = show.load_mae(run / "backbone.safetensors")  # any path inside the run will do
    images = build_dataset("digits", "test", 16).images[:4]
    pics = show.mae_reconstructions(method, images, seed=0)
    torch.testing.assert_close(pics["original"], images.float() / 255, rtol=0, atol=1e-6)

    def patches(t):  # (B, 3, 16, 16) -> (B, 16 patches, 48 values)
        return t.reshape(4, 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(4, 16, 48)

    orig, masked, rec = patches(pics["original"]), patches(pics["masked"]), patches(pics["reconstruction"])
    hidden = (masked == 0.5).all(-1)  # greyed out: digits' pixels are k/255, never exactly 0.5
    assert (hidden.sum(1) == 12).all()  # 75% of 16 patches
    visible = ~hidden
    assert torch.equal(masked[visible], orig[visible])
    assert torch.equal(rec[visible], orig[visible])  # what the encoder saw is shown as it is
    assert not torch.equal(rec[hidden], orig[hidden])  # the rest is drawn by the decoder
    # same seed, same mask
    assert torch.equal(show.mae_reconstructions(method, images, seed=0)["masked"], pics["masked"])


def test_show_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["show", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for picture in ("neighbors", "attention", "mae"):
        assert f"  keel show {picture} --checkpoint" in text

"""Image-text pretraining end to end on a tiny synthetic set: the data layouts and their skips,
the loss falling, zero-shot above chance, LiT, the exported backbone and the saved towers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from keel.config import load_config
from keel.data.pairs import PairShards, read_pairs
from keel.data.builtins import InMemoryImages
from keel.engine.checkpoint import load_backbone
from keel.evaluate.zeroshot import embed_dataset, zeroshot_eval
from keel.jobs.clip import clip_train, load_clip
from keel.tasks.clip_config import ClipConfig

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
WORDS = ["a photo of a {} square", "something {}", "{} colour", "a {} thing on a table"]


def _image(rgb, g, side=16):
    base = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, side, side)
    return (base + 25 * torch.randn(3, side, side, generator=g)).clamp(0, 255).to(torch.uint8)


def _write_folder(root: Path, n: int = 128) -> None:
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    names = list(COLORS)
    for i in range(n):
        c = names[i % 4]
        Image.fromarray(_image(COLORS[c], g).permute(1, 2, 0).numpy()).save(root / f"{i:04d}.png")
        (root / f"{i:04d}.txt").write_text(WORDS[(i // 4) % 4].format(c))
    (root / "empty.png").write_bytes((root / "0000.png").read_bytes())
    (root / "empty.txt").write_text("  \n")
    (root / "nocaption.png").write_bytes((root / "0000.png").read_bytes())
    (root / "broken.png").write_bytes(b"not a png at all")
    (root / "broken.txt").write_text("a red square")


def _labeled_colors(n=80) -> InMemoryImages:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % 4
    images = torch.stack([_image(list(COLORS.values())[int(k)], g) for k in labels])
    return InMemoryImages(images, labels, list(COLORS))


def _colors_folder(root: Path, n: int = 40) -> None:
    """A labeled folder (one sub-folder per colour) of _labeled_colors' images."""
    data = _labeled_colors(n)
    for k, c in enumerate(COLORS):
        (root / c).mkdir(parents=True)
        for i in (data.labels == k).nonzero().flatten().tolist():
            Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(root / c / f"{i}.png")


def _cfg(tmp_path, *extra):
    return load_config(None, [f"data.source={tmp_path / 'pairs'}", "data.img_size=16", "data.vocab_size=300",
                              "data.num_workers=0", "model.image=random:resnet10_cifar", "model.text=text_tiny",
                              "model.embed_dim=32", "train.batch_size=32", "train.epochs=12", "train.lr=0.02",
                              "train.weight_decay=0.0", "train.warmup_epochs=0.5", "train.log_every=4",
                              "train.device=cpu", f"train.out_dir={tmp_path / 'runs'}", *extra], cls=ClipConfig)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip")
    _write_folder(tmp / "pairs")
    res = clip_train(_cfg(tmp), tmp / "run", quiet=True)
    return tmp, res


def test_folder_pairs_skip_and_count(tmp_path):
    _write_folder(tmp_path / "pairs", n=8)
    rec = read_pairs(str(tmp_path / "pairs"))
    assert rec.skipped == {"empty text": 1, "no caption": 1}
    assert len(rec) == 9 and rec.texts[0] == "a photo of a red square"     # broken.png is kept until decoded


def test_csv_pairs_with_labels(tmp_path):
    _write_folder(tmp_path / "pairs", n=4)
    (tmp_path / "pairs.csv").write_text("filepath,caption,label\npairs/0000.png,a red thing,red\n"
                                        "pairs/0001.png,,green\npairs/0002.png,a blue thing,blue\n")
    rec = read_pairs(str(tmp_path / "pairs.csv"))
    assert rec.texts == ["a red thing", "a blue thing"] and rec.skipped == {"empty text": 1}
    assert rec.classes == ["blue", "red"] and rec.labels.tolist() == [1, 0]
    assert Path(rec.paths[1]).name == "0002.png" and Path(rec.paths[1]).is_file()
    from keel.data.errors import DataError
    with pytest.raises(DataError, match="text_column"):
        (tmp_path / "bad.csv").write_text("filepath,words\npairs/0000.png,x\n")
        read_pairs(str(tmp_path / "bad.csv"))


def test_training_learns_and_zero_shot_beats_chance(trained):
    tmp, res = trained
    run = Path(res["run_dir"])
    assert res["pairs"] == 129 and res["skipped_pairs"] == {"empty text": 1, "no caption": 1}
    assert res["skipped_images"] == 1 and "broken.png" in (run / "skipped.txt").read_text()
    losses = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.6 * losses[0]
    task, tok = load_clip(run)
    out = zeroshot_eval(task, tok, _labeled_colors(), list(COLORS), ["a photo of a {} square", "{} colour"])
    assert out["chance"] == 25.0 and out["top1"] >= 75.0


def test_exported_backbone_is_the_image_tower(trained):
    tmp, res = trained
    run = Path(res["run_dir"])
    card = json.loads((run / "card.json").read_text())
    assert card["model"] == "resnet10_cifar" and card["method"] == "clip"
    task, _ = load_clip(run)
    backbone = load_backbone(run).eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(backbone(x), task.backbone(x))
    # the text tower and projections came back too: the same embeddings as a second load
    again, _ = load_clip(run)
    data = _labeled_colors(8)
    torch.testing.assert_close(embed_dataset(task, data)[0], embed_dataset(again, data)[0])


def test_lit_keeps_the_image_tower_locked_and_siglip_trains(tmp_path):
    _write_folder(tmp_path / "pairs", n=64)
    first = clip_train(_cfg(tmp_path, "train.epochs=1"), tmp_path / "a", quiet=True)
    lit = clip_train(_cfg(tmp_path, f"model.image={first['run_dir']}", "model.lock_image=true", "model.loss=siglip",
                          "train.epochs=2"), tmp_path / "b", quiet=True)
    a, b = load_backbone(first["run_dir"]), load_backbone(lit["run_dir"])
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k        # weights and BatchNorm statistics as given
    task, _ = load_clip(lit["run_dir"])
    assert task.loss.logit_bias.item() != -10.0        # SigLIP's bias learned


def test_caption_shards(tmp_path):
    from keel.data.shards_write import write_shards
    _write_folder(tmp_path / "pairs", n=16)
    write_shards(str(tmp_path / "pairs"), str(tmp_path / "shards"), per_shard=8)
    src = PairShards(f"shards:{tmp_path / 'shards'}", 16)
    texts = src.texts()
    assert "a photo of a red square" in texts and all(t.strip() for t in texts)
    assert PairShards(f"shards:file://{tmp_path / 'shards'}", 16).texts() == texts     # a URL: streamed
    src.encode = lambda ts: torch.tensor([[len(t)] for t in ts])
    batch = next(src.stream(0, 0, 4, 0, 0, 1, torch.device("cpu"), 0))
    # whole images (16 px squares here) at the training side, for crops over the whole picture
    assert batch["images"].shape == (4, 3, 18, 18)      # one size: no canvas, no "sizes"
    assert batch["labels"].shape == (4, 1) and all(int(n) in {len(t) for t in texts} for n in batch["labels"])

    # the CUDA path (nvJPEG, one call a batch), run on the CPU, equals the workers' path; a sample
    # whose caption is empty is skipped by both, with its reason
    from keel.data.folders import collate_skip
    raw = next(src.raw_batches(0, 0, 6))
    raw[2][1]["txt"] = b"  "
    dec = src.decoder()
    by_device, by_workers = dec.on_device(raw, torch.device("cpu")), collate_skip([dec[r] for r in raw])
    assert dec.fallbacks == 0
    assert by_device.keys() == by_workers.keys()
    for key in ("images", "labels", "index", "skipped"):
        assert torch.equal(by_device[key], by_workers[key]), key
    assert by_device["skipped"].tolist() == [raw[2][0]] and by_device["reasons"] == ["empty text"]
    assert by_device["labels"].flatten().tolist() == [len(m["txt"].decode().strip()) for k, m in raw if k != raw[2][0]]

    # keel clip train from the shards, end to end: the tokenizer from their captions, every pair used
    res = clip_train(_cfg(tmp_path, f"data.source=shards:{tmp_path / 'shards'}", "train.epochs=2",
                          "train.batch_size=8", "data.num_workers=0"), tmp_path / "run", quiet=True)
    assert res["pairs"] == len(texts) == 16 and res["steps"] == 4 and res["skipped_images"] == 0
    task, tok = load_clip(tmp_path / "run")
    assert tok.encode(["a photo of a red square"]).shape[0] == 1 and task.img_size == 16


def _cli(argv):
    import argparse
    from keel.cli_clip import add_parser
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_zeroshot_and_retrieval(trained, tmp_path, capsys):
    tmp, res = trained
    _colors_folder(tmp_path / "colors")
    (tmp_path / "t.txt").write_text("something {}\n")
    assert _cli(["clip", "zeroshot", "--checkpoint", res["run_dir"], "--data", str(tmp_path / "colors"),
                 "--templates", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    z = json.loads((tmp_path / "o" / "zeroshot.json").read_text())
    assert z["images"] == 40 and z["top1"] >= 75
    assert _cli(["clip", "retrieval", "--checkpoint", res["run_dir"], "--data", str(tmp / "pairs"),
                 "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    r = json.loads((tmp_path / "o" / "retrieval.json").read_text())
    assert r["pairs"] == 128 and r["texts"] == 16      # the broken image left out; 4 wordings x 4 colours
    # an image's own caption differs from 3 others of its colour only in wording, which the image
    # cannot show: a trained model has it among its top 4 (chance: 4 of 16 captions = 25%)
    assert r["image_to_text@5"] >= 75
    assert "top-1" in capsys.readouterr().out

    # the same through keel eval, configured like the other protocols
    from keel.cli import main
    assert main(["eval", "zeroshot", f"model.backbone={res['run_dir']}", f"data.source={tmp_path / 'colors'}",
                 f"eval.templates={tmp_path / 't.txt'}", "run.device=cpu", f"eval.json={tmp_path / 'z.json'}"]) == 0
    assert json.loads((tmp_path / "z.json").read_text())["top1"] == z["top1"]
    assert main(["eval", "retrieval", f"model.backbone={res['run_dir']}", f"data.source={tmp / 'pairs'}",
                 "run.device=cpu", f"eval.json={tmp_path / 'r.json'}"]) == 0
    assert json.loads((tmp_path / "r.json").read_text()) == r
    capsys.readouterr()
    assert main(["eval", "zeroshot", "model.backbone=random:resnet10_cifar", "data.source=digits"]) == 2
    assert "needs a keel clip train run" in capsys.readouterr().err


def test_show_retrieval_draws_the_images_closest_to_each_text(trained, tmp_path, monkeypatch):
    from keel import show
    from keel.cli import main
    tmp, res = trained
    _colors_folder(tmp_path / "colors")
    drawn = {}
    real = show.plot_retrieval
    monkeypatch.setattr(show, "plot_retrieval", lambda *a, **kw: drawn.update(args=a) or real(*a, **kw))
    assert main(["show", "retrieval", "--checkpoint", res["run_dir"], "--data", str(tmp_path / "colors"),
                 "--query", "something red", "--query", "blue colour", "--k", "3", "--out", str(tmp_path / "pic"),
                 "--device", "cpu"]) == 0
    queries, images, labels, scores = drawn["args"][:4]
    classes = drawn["args"][6] if len(drawn["args"]) > 6 else sorted(COLORS)
    assert queries == ["something red", "blue colour"] and images.shape[:2] == (2, 3)
    # the test split (every 5th image: 2 of each colour) has its 2 images of the colour asked for first
    assert [classes[int(i)] for i in labels[0, :2]] == ["red"] * 2 and labels[0, 2] != labels[0, 0]
    assert [classes[int(i)] for i in labels[1, :2]] == ["blue"] * 2
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    red = torch.tensor(COLORS["red"]).view(3, 1, 1).float()
    assert ((images[0, :2].float().mean(dim=(2, 3)) - red.view(1, 3)).abs() < 40).all()   # the pixels drawn are red
    from PIL import Image as PILImage
    w, h = PILImage.open(tmp_path / "pic" / "retrieval.png").size
    assert (w, h) == (4 * 125, 2 * 125 + 50)
    # no --query: one row per class of the data
    assert main(["show", "retrieval", "--checkpoint", res["run_dir"], "--data", str(tmp_path / "colors"),
                 "--out", str(tmp_path / "pic2"), "--device", "cpu"]) == 0
    assert drawn["args"][0] == [f"a photo of a {c}" for c in sorted(COLORS)]


def test_pairs_train_on_whole_images_of_any_shape(tmp_path):
    from keel.data.pairs import PairData
    root = tmp_path / "pairs"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(16, 24), (24, 16), (16, 16), (20, 30)] * 8):
        rgb = list(COLORS.values())[i % 4]
        img = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, h, w).contiguous()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {list(COLORS)[i % 4]} thing")
    rec = read_pairs(str(root))
    whole = PairData(rec, torch.zeros(len(rec), 4, dtype=torch.int64), 16, whole=True)
    # the training side is 16 * 8/7 = 18 on the shorter side, the aspect kept; evaluation centre-crops
    assert [tuple(whole[i][0].shape[1:]) for i in range(4)] == [(18, 27), (27, 18), (18, 18), (18, 27)]
    assert tuple(PairData(rec, whole.labels, 16)[0][0].shape) == (3, 16, 16)
    res = clip_train(_cfg(tmp_path, "train.epochs=2", "train.batch_size=8"), tmp_path / "run", quiet=True)
    assert res["steps"] == 8 and res["skipped_images"] == 0 and torch.isfinite(torch.tensor(res["loss"]))
    cfg = _cfg(tmp_path, "data.crop_from=middle")
    from keel.data.errors import DataError
    with pytest.raises(DataError, match="crop_from"):
        clip_train(cfg, tmp_path / "bad", quiet=True)

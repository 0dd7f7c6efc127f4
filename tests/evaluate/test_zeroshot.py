"""Prompt-ensemble zero-shot weights and retrieval recall, against hand-computed cases."""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.evaluate.zeroshot import read_templates, retrieval_recall, zeroshot_eval, zeroshot_weights
from keel.data.builtins import InMemoryImages


class _Tok:
    """Token 0: pad; a text's first word picks a fixed vector (so embeddings are known exactly)."""
    def encode(self, texts):
        return torch.tensor([[zlib.crc32(t.split()[0].encode()) % 97 + 1] for t in texts])


class _Task(nn.Module):
    """encode_text: a fixed table; embed_images: the image's mean colour channel as a 3-vector."""
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(100, 3)
        self.text = type("T", (), {"cfg": type("C", (), {"embed_dim": 3})})()

    def encode_text(self, tokens):
        return F.normalize(self.table(tokens[:, 0]), dim=-1)

    def embed_images(self, images):
        return F.normalize(images.float().mean((2, 3)), dim=-1)


def test_weights_are_the_renormalised_mean_over_templates():
    task, tok = _Task(), _Tok()
    w = zeroshot_weights(task, tok, ["cat", "dog"], ["{} photo", "{} picture"])
    emb = lambda t: task.encode_text(tok.encode([t]))[0]
    want = F.normalize(torch.stack([(emb("cat photo") + emb("cat picture")) / 2,
                                    (emb("dog photo") + emb("dog picture")) / 2]), dim=-1)
    torch.testing.assert_close(w, want.detach())
    assert torch.allclose(w.norm(dim=1), torch.ones(2))


def test_zeroshot_eval_counts_top1_and_top5():
    task, tok = _Task(), _Tok()
    with torch.no_grad():   # class names map to the axes: "red" -> x, "green" -> y, "blue" -> z
        for name, axis in (("red", 0), ("green", 1), ("blue", 2)):
            task.table.weight[tok.encode([name])[0, 0]] = F.one_hot(torch.tensor(axis), 3).float()
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[0, 0] = images[1, 1] = images[2, 2] = images[3, 0] = 200
    labels = torch.tensor([0, 1, 2, 1])                     # the last image is red but labeled green
    out = zeroshot_eval(task, tok, InMemoryImages(images, labels, ["red", "green", "blue"]),
                        ["red", "green", "blue"], ["{}"])
    assert out["top1"] == 75.0 and out["top5"] == 100.0 and out["chance"] == pytest.approx(100 / 3)


def test_retrieval_recall_hand_computed():
    img = torch.eye(3)
    # text 0 matches image 0; text 1 is closest to image 2 (its partner second); text 2 last
    txt = torch.tensor([[1.0, 0, 0], [0, 0.5, 0.8], [0.9, 0.4, 0.1]])
    out = retrieval_recall(img, txt, ks=(1, 2, 3))
    # image -> text: image 0: text0 (1.0) vs text2 (.9): rank 0; image 1: text1 .5 vs text2 .4: rank 0;
    # image 2: text2 .1 vs text1 .8: rank 1
    assert out["image_to_text@1"] == pytest.approx(200 / 3) and out["image_to_text@2"] == 100.0
    # text -> image: text 0 rank 0; text 1: image1 .5 < image2 .8: rank 1; text 2: image2 .1 is last: rank 2
    assert out["text_to_image@1"] == pytest.approx(100 / 3)
    assert out["text_to_image@2"] == pytest.approx(200 / 3) and out["text_to_image@3"] == 100.0


def test_retrieval_recall_shared_texts():
    # images 0 and 1 share text 0, image 2 has text 1
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = retrieval_recall(img, txt, ks=(1, 2), text_of_image=torch.tensor([0, 0, 1]))
    # image -> text: image 0 scores text0 0, text1 1: rank 1; image 1: .8 vs .6: rank 0; image 2: 0 vs 1: rank 1
    assert out["image_to_text@1"] == pytest.approx(100 / 3) and out["image_to_text@2"] == 100.0
    # text -> image: text 0's best own image is image 1 (.8); image 2 (not its) scores 1.0: rank 1;
    # text 1's own image 2 scores 0, images 0 (1.0) and 1 (.6) above: rank 2. Two queries, not three.
    assert out["text_to_image@1"] == 0.0 and out["text_to_image@2"] == 50.0


def test_retrieval_recall_equals_a_loop():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(40, 8, generator=g), torch.randn(12, 8, generator=g)
    owner = torch.randint(0, 12, (40,), generator=g)
    out = retrieval_recall(img, txt, ks=(1, 3), text_of_image=owner)
    sim = img @ txt.T
    i2t = [int((sim[i] > sim[i, owner[i]]).sum()) for i in range(40)]
    t2i = []
    for j in owner.unique().tolist():
        mine = owner == j
        t2i.append(int((sim[~mine, j] > sim[mine, j].max()).sum()))
    for k in (1, 3):
        assert out[f"image_to_text@{k}"] == pytest.approx(100 * sum(r < k for r in i2t) / 40)
        assert out[f"text_to_image@{k}"] == pytest.approx(100 * sum(r < k for r in t2i) / len(t2i))


def test_templates_file(tmp_path):
    (tmp_path / "t.txt").write_text("# prompts\na photo of a {}.\n\n{} on a table\n")
    assert read_templates(tmp_path / "t.txt") == ["a photo of a {}.", "{} on a table"]
    (tmp_path / "bad.txt").write_text("a photo\n")
    with pytest.raises(ValueError, match="class name"):
        read_templates(tmp_path / "bad.txt")

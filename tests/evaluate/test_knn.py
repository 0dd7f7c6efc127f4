import math

import numpy as np
import pytest
import torch

from keel.evaluate.knn import knn_eval, knn_predict
from keel.evaluate.linear import accuracy_topk


def _blobs(n, num_classes, dim, sep, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * sep
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return centers[labels] + torch.randn(n, dim, generator=g), labels


def test_hand_computed_scores():
    # unnormalised on purpose: cosine similarity must not depend on the length
    train = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0], [-5.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])
    query = torch.tensor([[2.0, 1.0]])
    # cosines with the query (2, 1)/sqrt(5)
    s = [2 / math.sqrt(5), 1 / math.sqrt(5), 3 / math.sqrt(10), -2 / math.sqrt(5)]
    # k=3 keeps points 2 (0.949), 0 (0.894) and 1 (0.447); point 3 is dropped
    t = 0.1
    expected = torch.tensor([[math.exp(s[2] / t) + math.exp(s[0] / t), math.exp(s[1] / t), 0.0]])
    scores = knn_predict(train, labels, query, num_classes=3, k=3, temperature=t)
    assert scores.shape == (1, 3)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)
    # k=4: the opposite point votes for class 1 with exp(-0.894/0.1)
    scores4 = knn_predict(train, labels, query, num_classes=3, k=4, temperature=t)
    torch.testing.assert_close(scores4[0, 1], expected[0, 1] + math.exp(s[3] / t), rtol=1e-5, atol=0)


def test_k_clamped_to_train_size():
    x, y = _blobs(30, 3, 8, 1.0, 0)
    q, _ = _blobs(10, 3, 8, 1.0, 1)
    torch.testing.assert_close(knn_predict(x, y, q, 3, k=1000), knn_predict(x, y, q, 3, k=30))


def test_matches_sklearn_weighted_knn():
    sklearn_neighbors = pytest.importorskip("sklearn.neighbors")
    x, y = _blobs(400, 6, 32, 0.4, 2)
    q, _ = _blobs(150, 6, 32, 0.4, 3)
    t, k = 0.1, 20
    clf = sklearn_neighbors.KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute",
        weights=lambda d: np.exp((1.0 - d) / t))  # cosine distance = 1 - similarity
    clf.fit(x.double().numpy(), y.numpy())
    scores = knn_predict(x, y, q, num_classes=6, k=k, temperature=t)
    ref_pred = torch.from_numpy(clf.predict(q.double().numpy()))
    assert torch.equal(scores.argmax(1), ref_pred)
    # the whole normalised vote distribution agrees, not just the winner
    proba = torch.from_numpy(clf.predict_proba(q.double().numpy())).float()
    torch.testing.assert_close(scores / scores.sum(1, keepdim=True), proba, rtol=1e-4, atol=1e-5)


def test_separable_blobs_near_perfect():
    xa, ya = _blobs(1300, 10, 64, 3.0, 4)
    x, y, q, qy = xa[:1000], ya[:1000], xa[1000:], ya[1000:]
    res = knn_eval(x, y, q, qy, ks=(20, 200))
    assert set(res) == {"knn_top1@20", "knn_top5@20", "knn_top1@200", "knn_top5@200"}
    assert res["knn_top1@20"] >= 99.0
    assert res["knn_top1@200"] >= 99.0
    for k in (20, 200):
        assert res[f"knn_top5@{k}"] >= res[f"knn_top1@{k}"]


def test_eval_consistent_with_predict_and_top5_ge_top1():
    x, y = _blobs(500, 8, 16, 0.3, 6)  # heavily overlapping: accuracy well below 100
    q, qy = _blobs(200, 8, 16, 0.3, 7)
    res = knn_eval(x, y, q, qy, ks=(5, 50), temperature=0.07, num_classes=8, chunk_size=33)
    for k in (5, 50):
        acc = accuracy_topk(knn_predict(x, y, q, 8, k=k, temperature=0.07), qy, (1, 5))
        assert res[f"knn_top1@{k}"] == pytest.approx(acc[1])
        assert res[f"knn_top5@{k}"] == pytest.approx(acc[5])
        assert res[f"knn_top5@{k}"] >= res[f"knn_top1@{k}"]
        assert 0.0 <= res[f"knn_top1@{k}"] < 100.0


def test_chunked_equals_unchunked():
    x, y = _blobs(300, 5, 24, 0.5, 8)
    q, _ = _blobs(101, 5, 24, 0.5, 9)
    full = knn_predict(x, y, q, 5, k=20, chunk_size=10_000)
    for chunk in (1, 7, 64):
        torch.testing.assert_close(knn_predict(x, y, q, 5, k=20, chunk_size=chunk), full,
                                   rtol=1e-5, atol=1e-6)


def test_no_top5_for_five_classes_or_fewer_and_a_warning_when_k_exceeds_the_bank():
    x, y = _blobs(100, 3, 8, 0.2, 10)
    q, qy = _blobs(40, 3, 8, 0.2, 11)
    res = knn_eval(x, y, q, qy, ks=(10,))
    assert set(res) == {"knn_top1@10"} and res["knn_top1@10"] < 100.0
    with pytest.warns(UserWarning, match="only 100 training features"):
        big = knn_eval(x, y, q, qy, ks=(10, 500))
    assert big["knn_top1@500"] == knn_eval(x, y, q, qy, ks=(100,))["knn_top1@100"]   # the whole bank


def test_accuracy_topk_hand_case():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    labels = torch.tensor([1, 1, 0, 1])
    acc = accuracy_topk(scores, labels, ks=(1, 2, 5))
    # top1 hits: row 0 only; top2 adds row 1; top5 (clamped to 3) hits every row
    assert acc == {1: 25.0, 2: 50.0, 5: 100.0}


def test_rejects_unlabeled_training_items():
    x, y = _blobs(20, 3, 4, 1.0, 12)
    y = y.clone()
    y[3] = -1
    with pytest.raises(ValueError):
        knn_predict(x, y, x[:2], num_classes=3, k=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, y = _blobs(500, 8, 16, 0.3, 13)
    q, qy = _blobs(100, 8, 16, 0.3, 14)
    cpu = knn_predict(x, y, q, 8, k=20)
    gpu = knn_predict(x.cuda(), y.cuda(), q.cuda(), 8, k=20)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
    assert knn_eval(x.cuda(), y.cuda(), q.cuda(), qy.cuda(), ks=(20,)).keys() == {"knn_top1@20", "knn_top5@20"}

import math

import pytest
import torch
import torch.nn.functional as F

from keel.evaluate.linear import _train_linear, accuracy_topk, linear_probe


def _blobs(n, num_classes, dim, sep, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * sep
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return (centers[labels] + torch.randn(n, dim, generator=g)) * scale, labels


def _split(x, y, n_train):
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def test_separable_features_near_perfect():
    # huge offset and scale: standardization must make the default lr work anyway
    x, y = _blobs(3000, 10, 64, 2.0, 0)
    x = x * 250.0 + 1000.0
    res = linear_probe(*_split(x, y, 2000), epochs=10)
    assert set(res) == {"linear_top1", "linear_top5", "linear_train_top1"}
    assert res["linear_top1"] >= 99.0
    assert res["linear_train_top1"] >= 99.0
    assert res["linear_top5"] >= res["linear_top1"]


def test_random_test_labels_give_chance():
    x, y = _blobs(3000, 10, 32, 2.0, 1)
    xtr, ytr, xte, _ = _split(x, y, 2000)
    random_labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(2))
    res = linear_probe(xtr, ytr, xte, random_labels, num_classes=10, epochs=5)
    assert res["linear_train_top1"] >= 95.0  # it did learn the real task
    assert res["linear_top1"] < 25.0


def test_deterministic_for_a_seed():
    x, y = _blobs(1500, 10, 32, 0.2, 3)
    args = _split(x, y, 1000)
    a = linear_probe(*args, epochs=5, seed=7)
    b = linear_probe(*args, epochs=5, seed=7)
    assert a == b
    c = linear_probe(*args, epochs=5, seed=8)
    assert c != a  # the seed does drive the shuffling (hard problem: results differ)


def test_close_to_sklearn_logistic_regression():
    linear_model = pytest.importorskip("sklearn.linear_model")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    x, y = _blobs(6000, 10, 32, 0.35, 4)  # overlapping blobs: roughly 70% reachable
    xtr, ytr, xte, yte = _split(x, y, 4000)
    scaler = preprocessing.StandardScaler().fit(xtr.numpy())
    clf = linear_model.LogisticRegression(C=1.0, max_iter=1000)
    clf.fit(scaler.transform(xtr.numpy()), ytr.numpy())
    ref = 100.0 * clf.score(scaler.transform(xte.numpy()), yte.numpy())
    res = linear_probe(xtr, ytr, xte, yte)  # default 100 epochs, default lr
    assert 40.0 < ref < 95.0  # the problem is neither trivial nor hopeless
    assert abs(res["linear_top1"] - ref) <= 2.0


def _reference_train(x, y, num_classes, epochs, batch_size, lr, weight_decay, seed):
    """The textbook version: nn.Linear + autograd + torch.optim.AdamW, same schedule and order."""
    model = torch.nn.Linear(x.shape[1], num_classes, dtype=x.dtype)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = torch.optim.AdamW([{"params": [model.weight], "weight_decay": weight_decay},
                             {"params": [model.bias], "weight_decay": 0.0}], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    total = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            step += 1
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_hand_written_adamw_matches_torch_optim(weight_decay):
    x, y = _blobs(300, 4, 12, 0.5, 5)
    x = x.double()
    kw = dict(epochs=3, batch_size=64, lr=3e-2, weight_decay=weight_decay, seed=11)  # last batch: 44
    ours = _train_linear(x, y, 4, **kw)
    ref = _reference_train(x, y, 4, **kw)
    assert ours.weight.abs().max() > 0.1  # it moved
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=1e-9, atol=1e-9)


def test_accuracy_topk_matches_argmax():
    g = torch.Generator().manual_seed(6)
    scores = torch.randn(50, 7, generator=g)
    labels = torch.randint(0, 7, (50,), generator=g)
    acc = accuracy_topk(scores, labels, ks=(1, 7))
    assert acc[1] == pytest.approx(100.0 * (scores.argmax(1) == labels).float().mean().item())
    assert acc[7] == 100.0


def test_rejects_labels_out_of_range():
    x, y = _blobs(100, 3, 4, 1.0, 7)
    y = y.clone()
    y[0] = -1  # an unlabeled item
    with pytest.raises(ValueError):
        linear_probe(x[:80], y[:80], x[80:], y[80:], num_classes=3, epochs=1)


def test_thread_count_restored():
    before = torch.get_num_threads()
    x, y = _blobs(200, 3, 4, 1.0, 8)
    linear_probe(x[:150], y[:150], x[150:], y[150:], epochs=2)
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_close_to_cpu():
    x, y = _blobs(3000, 10, 32, 0.35, 9)
    args = _split(x, y, 2000)
    cpu = linear_probe(*args, epochs=20)
    gpu = linear_probe(*args, epochs=20, device="cuda")
    assert abs(cpu["linear_top1"] - gpu["linear_top1"]) <= 1.0

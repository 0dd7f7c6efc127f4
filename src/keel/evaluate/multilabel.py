"""Multi-label and two-level (primary/secondary) classification: losses, metrics, tasks.

The metric functions take whole-test-set tensors and return fractions in [0, 1]
(comparable with scikit-learn); the two task objects, which plug into the fine-tuning
loop (``head``, ``loss``, ``metrics``, ``main_metric``), report percentages like the rest
of keel's evaluation (``linear_top1`` etc.).

* :class:`MultiLabelTask` -- one linear head, one independent sigmoid per class; trained
  with binary cross-entropy or the asymmetric loss; scored by mAP and F1.
* :class:`TwoLevelTask` -- a primary class and, conditioned on it, a secondary class;
  scored by primary / secondary / both top-1.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "bce_loss",
    "AsymmetricLoss",
    "average_precision",
    "mean_average_precision",
    "f1_at",
    "MultiLabelTask",
    "TwoLevelHead",
    "TwoLevelTask",
]


# ----------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------


def _check_pair(logits: Tensor, targets: Tensor) -> None:
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(f"logits and targets must both be (N, C), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")


def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of one sigmoid per class, averaged over classes and images."""
    _check_pair(logits, targets)
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="mean")


class AsymmetricLoss(nn.Module):
    """Asymmetric loss for multi-label classification (Ridnik et al., ICCV 2021).

    With ``p = sigmoid(logit)`` and the shifted probability ``p_m = max(p - clip, 0)``:

        L = - y * (1 - p)^gamma_pos * log(p) - (1 - y) * p_m^gamma_neg * log(1 - p_m)

    Negatives are focused harder than positives (``gamma_neg > gamma_pos``), and the
    shift discards easy negatives outright (``p < clip`` gives zero loss and gradient)
    while damping the loss of very confident ones, which is what makes it robust to
    mislabeled negatives.  The focusing weights are part of the loss (gradients flow
    through them), as in the paper's definition.

    ``reduction="sum"`` (default) sums over images and classes as the reference code
    does, so with ``gamma_neg = gamma_pos = clip = 0`` it equals ``N * C`` times
    :func:`bce_loss`; ``"mean"`` divides by ``N * C`` and equals :func:`bce_loss` then.

    ``eps`` floors the argument of ``log(1 - p_m)`` when shifted (the reference clamps
    every probability at ``eps``); unshifted terms use ``logsigmoid`` directly, which is
    the same value without the clamp, so a confident mistake (|logit| > 18) keeps its
    gradient instead of being flattened at ``log(eps)``.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 eps: float = 1e-8, reduction: str = "sum"):
        super().__init__()
        if gamma_neg < 0 or gamma_pos < 0 or not 0 <= clip < 1 or eps <= 0:
            raise ValueError("need gamma_neg, gamma_pos >= 0, 0 <= clip < 1 and eps > 0")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.clip = float(clip)
        self.eps = float(eps)
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_pair(logits, targets)
        x = logits.float()
        y = targets.float()
        # positives: log p, weighted by (1 - p)^gamma_pos
        pos = F.logsigmoid(x)
        if self.gamma_pos > 0:
            pos = pos * torch.sigmoid(-x).pow(self.gamma_pos)
        # negatives: log(1 - p_m), weighted by p_m^gamma_neg
        if self.clip > 0:
            one_minus = (torch.sigmoid(-x) + self.clip).clamp(max=1.0)  # 1 - p_m
            neg = one_minus.clamp(min=self.eps).log()
            p_m = 1.0 - one_minus
        else:
            neg = F.logsigmoid(-x)
            p_m = torch.sigmoid(x)
        if self.gamma_neg > 0:
            neg = neg * p_m.pow(self.gamma_neg)
        loss = -(y * pos + (1.0 - y) * neg)
        return loss.sum() if self.reduction == "sum" else loss.mean()

    def extra_repr(self) -> str:
        return (f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, "
                f"eps={self.eps}, reduction={self.reduction!r}")


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------


def _as_scores(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    t = torch.as_tensor(targets).detach().to("cpu", torch.float64)
    if s.ndim == 1:
        s, t = s.unsqueeze(1), t.unsqueeze(1)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores and targets must both be (N, C), got {tuple(s.shape)} and {tuple(t.shape)}")
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not ((t == 0) | (t == 1)).all():
        raise ValueError("targets must be 0/1 (multi-hot)")
    return s, t


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Average precision of each class (column): float64 ``(C,)``, NaN for a class with no positive.

    AP = sum over score thresholds of (recall increase) x (precision), one threshold per
    distinct score, so tied scores enter together -- the step-wise definition of
    ``sklearn.metrics.average_precision_score`` (no interpolation), which it equals.
    (For a class without positives sklearn returns 0 with a warning; here it is NaN so
    that :func:`mean_average_precision` can leave it out.)
    """
    s, t = _as_scores(scores, targets)
    n, c = s.shape
    if n == 0:
        return torch.full((c,), float("nan"), dtype=torch.float64)
    sorted_s, order = s.sort(dim=0, descending=True, stable=True)
    y = t.gather(0, order)
    tp = y.cumsum(0)
    rank = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
    precision = tp / rank
    # last position of each run of equal scores: the threshold at which that run enters
    last = torch.ones_like(y, dtype=torch.bool)
    last[:-1] = sorted_s[1:] != sorted_s[:-1]
    group = last.long().cumsum(0) - last.long()  # run id of each position
    # precision at the end of each run, then read back by every member of the run
    at_end = torch.zeros_like(precision).scatter_add_(0, group, precision * last)
    run_precision = at_end.gather(0, group)
    positives = y.sum(0)
    ap = (y * run_precision).sum(0) / positives
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Mean of :func:`average_precision` over the classes that have at least one positive
    (NaN if none has)."""
    ap = average_precision(scores, targets)
    kept = ap[~torch.isnan(ap)]
    return float(kept.mean()) if kept.numel() else float("nan")


def f1_at(scores: Tensor, targets: Tensor, threshold: float = 0.5,
          zero_division: float = 0.0) -> dict[str, float]:
    """Micro and macro F1 of the predictions ``scores >= threshold``.

    ``{"micro": 2TP / (2TP + FP + FN) over all (image, class) cells,
    "macro": mean over classes of each class's F1}`` -- the values of
    ``sklearn.metrics.f1_score(targets, preds, average=..., zero_division=...)``:
    a class (or, for micro, the whole set) with no positive and no predicted positive
    has F1 ``zero_division`` (0 by default, as sklearn's default gives).
    """
    s, t = _as_scores(scores, targets)
    pred = (s >= threshold).to(torch.float64)
    tp = (pred * t).sum(0)
    fp = (pred * (1 - t)).sum(0)
    fn = ((1 - pred) * t).sum(0)

    def f1(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        denom = 2 * tp + fp + fn
        return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(denom, float(zero_division)))

    micro = f1(tp.sum(), fp.sum(), fn.sum())
    macro = f1(tp, fp, fn).mean() if tp.numel() else torch.tensor(float("nan"))
    return {"micro": float(micro), "macro": float(macro)}


def _percent(x: float) -> float:
    return 100.0 * x


# ----------------------------------------------------------------------------
# Multi-label task
# ----------------------------------------------------------------------------


class MultiLabelTask:
    """Multi-label classification for the fine-tuning loop.

    ``head``: one ``nn.Linear(num_features, num_classes)``, a logit per class.
    ``loss``: ``"bce"`` (:func:`bce_loss`) or ``"asl"`` (:class:`AsymmetricLoss` with its
    paper defaults, averaged over images and classes rather than summed, so both losses
    have the same scale and one learning rate / gradient clip suits either).
    ``metrics`` of the logits of the whole test set, every value a float (the task protocol),
    in percent: ``mAP`` (over the classes with a positive in the test set),
    ``classes_without_positives`` (how many were left out), ``micro_f1`` and ``macro_f1`` of
    ``sigmoid(logit) >= threshold``, and with ``per_class=True`` the per-class list as keys
    ``ap/<class name or id>`` (NaN for a class without positives).  :meth:`per_class_ap`
    gives the same list as a list.
    """

    main_metric = "mAP"

    def __init__(self, num_classes: int, loss: str = "bce", threshold: float = 0.5,
                 class_names: Sequence[str] | None = None, per_class: bool = True):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if loss not in ("bce", "asl"):
            raise ValueError(f"loss must be 'bce' or 'asl', got {loss!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold is a probability in (0, 1), got {threshold}")
        self.num_classes = int(num_classes)
        self.loss_name = loss
        self.threshold = float(threshold)
        self._asl = AsymmetricLoss(reduction="mean") if loss == "asl" else None
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        self.per_class = bool(per_class)

    def head(self, num_features: int) -> nn.Module:
        return nn.Linear(num_features, self.num_classes)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if self._asl is not None:
            return self._asl(outputs, targets)
        return bce_loss(outputs, targets)

    def per_class_ap(self, outputs: Tensor, targets: Tensor) -> list[float | None]:
        """AP of each class in percent, None for a class without positives."""
        ap = average_precision(outputs.detach().float().cpu(), targets)
        return [None if math.isnan(a) else _percent(a) for a in ap.tolist()]

    def metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        logits = outputs.detach().float().cpu()
        ap = average_precision(logits, targets)  # AP depends on the ranking only: logits will do
        missing = torch.isnan(ap)
        f1 = f1_at(torch.sigmoid(logits), targets, self.threshold)
        out = {
            "mAP": _percent(float(ap[~missing].mean())) if (~missing).any() else float("nan"),
            "micro_f1": _percent(f1["micro"]),
            "macro_f1": _percent(f1["macro"]),
            "classes_without_positives": float(missing.sum()),
        }
        if self.per_class:
            names = self.class_names or [str(k) for k in range(self.num_classes)]
            out.update({f"ap/{name}": _percent(float(a)) for name, a in zip(names, ap)})
        return out

    def __repr__(self) -> str:
        return f"MultiLabelTask(num_classes={self.num_classes}, loss={self.loss_name!r}, threshold={self.threshold})"


# ----------------------------------------------------------------------------
# Two-level task
# ----------------------------------------------------------------------------


class TwoLevelHead(nn.Module):
    """Primary logits from the features, then secondary logits from the features
    concatenated with the primary's softmax.

    Output: one tensor ``(N, num_primary + num_secondary)``, primary logits first, so the
    fine-tuning loop can treat it like any other head output.

    Why the softmax, detached, rather than an embedding of the predicted primary with
    teacher forcing: the secondary branch then sees at training time exactly what it
    will see at test time -- the primary branch's own belief, mistakes and uncertainty
    included -- instead of a true primary it never gets at inference (exposure bias); a
    soft input also lets it hedge between two likely primaries.  Detaching keeps each
    loss term in charge of one output: the secondary loss cannot improve itself by
    bending the primary logits, which are trained by the primary loss alone (the shared
    features still get both gradients).
    """

    def __init__(self, num_features: int, num_primary: int, num_secondary: int):
        super().__init__()
        self.num_primary = int(num_primary)
        self.num_secondary = int(num_secondary)
        self.primary = nn.Linear(num_features, num_primary)
        self.secondary = nn.Linear(num_features + num_primary, num_secondary)

    def secondary_logits(self, features: Tensor, primary_probs: Tensor) -> Tensor:
        """Secondary logits for given primary probabilities ``(N, num_primary)``."""
        cond = primary_probs.to(features.dtype)
        return self.secondary(torch.cat([features, cond], dim=1))

    def forward(self, features: Tensor) -> Tensor:
        primary = self.primary(features)
        probs = torch.softmax(primary.detach().float(), dim=1)
        secondary = self.secondary_logits(features, probs)
        return torch.cat([primary, secondary.to(primary.dtype)], dim=1)


def _hierarchy_mask(hierarchy, num_primary: int, num_secondary: int) -> Tensor:
    """(P, S) bool: which secondary classes lie under each primary."""
    if isinstance(hierarchy, Tensor):
        mask = hierarchy.to(torch.bool).cpu()
        if mask.shape != (num_primary, num_secondary):
            raise ValueError(f"hierarchy mask must be ({num_primary}, {num_secondary}), got {tuple(mask.shape)}")
    elif isinstance(hierarchy, Mapping):
        mask = torch.zeros(num_primary, num_secondary, dtype=torch.bool)
        for p, secs in hierarchy.items():
            p = int(p)
            if not 0 <= p < num_primary:
                raise ValueError(f"hierarchy has primary id {p} outside [0, {num_primary})")
            for s in secs:
                s = int(s)
                if not 0 <= s < num_secondary:
                    raise ValueError(f"hierarchy has secondary id {s} outside [0, {num_secondary})")
                mask[p, s] = True
    else:
        raise TypeError("hierarchy must be a mapping {primary id: secondary ids} or a (P, S) bool tensor")
    shared = torch.nonzero(mask.sum(0) > 1).flatten().tolist()
    if shared:
        raise ValueError(f"secondary class(es) {shared} are listed under more than one primary")
    return mask


class TwoLevelTask:
    """A primary class and a secondary class per image, for the fine-tuning loop.

    ``head``: :class:`TwoLevelHead` (secondary conditioned on the primary's softmax).
    Targets: int64 ``(N, 2)`` rows of (primary id, secondary id).
    ``loss`` = CE(primary) + CE(secondary), in float32.
    ``metrics`` (percent): ``primary_top1``, ``secondary_top1``, ``both_top1`` (both
    right; the main metric) and ``secondary_top1_given_primary`` (secondary accuracy
    over the images whose primary is predicted right; NaN if there are none).

    ``hierarchy`` (``{primary id: secondary ids}``, e.g. ``LabeledCSV.hierarchy_ids``,
    or a ``(P, S)`` bool tensor): at inference -- :meth:`predict`, which ``metrics`` uses --
    secondary classes not under the predicted primary are ruled out, so the secondary
    prediction is always consistent with the primary one.  A predicted primary with no
    listed secondary leaves all secondaries allowed.  Training is not masked: the loss is
    the plain CE over all secondary classes, and the head's outputs are never masked (so a
    test loss stays the model's own cross-entropy).
    """

    main_metric = "both_top1"

    def __init__(self, num_primary: int, num_secondary: int, hierarchy=None):
        if num_primary < 1 or num_secondary < 1:
            raise ValueError("num_primary and num_secondary must be >= 1")
        self.num_primary = int(num_primary)
        self.num_secondary = int(num_secondary)
        self.mask = None if hierarchy is None else _hierarchy_mask(hierarchy, self.num_primary, self.num_secondary)

    def head(self, num_features: int) -> nn.Module:
        return TwoLevelHead(num_features, self.num_primary, self.num_secondary)

    def split(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """Head outputs -> (primary logits, secondary logits)."""
        if outputs.ndim != 2 or outputs.shape[1] != self.num_primary + self.num_secondary:
            raise ValueError(f"outputs must be (N, {self.num_primary + self.num_secondary}), "
                             f"got {tuple(outputs.shape)}")
        return outputs[:, :self.num_primary], outputs[:, self.num_primary:]

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        primary, secondary = self.split(outputs.float())
        targets = targets.long()
        return F.cross_entropy(primary, targets[:, 0]) + F.cross_entropy(secondary, targets[:, 1])

    @torch.no_grad()
    def predict(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted (primary ids, secondary ids), the secondary restricted by the hierarchy."""
        primary, secondary = self.split(outputs.float())
        p = primary.argmax(dim=1)
        if self.mask is not None:
            allowed = self.mask.to(secondary.device)[p]
            allowed |= ~allowed.any(dim=1, keepdim=True)  # no listed child: restrict nothing
            secondary = secondary.masked_fill(~allowed, float("-inf"))
        return p, secondary.argmax(dim=1)

    def metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        targets = targets.long().to(outputs.device)
        if outputs.shape[0] == 0:
            nan = float("nan")
            return {"primary_top1": nan, "secondary_top1": nan, "both_top1": nan,
                    "secondary_top1_given_primary": nan}
        p, s = self.predict(outputs)
        p_ok = p == targets[:, 0]
        s_ok = s == targets[:, 1]
        given = float(s_ok[p_ok].double().mean()) if p_ok.any() else float("nan")
        return {
            "primary_top1": _percent(float(p_ok.double().mean())),
            "secondary_top1": _percent(float(s_ok.double().mean())),
            "both_top1": _percent(float((p_ok & s_ok).double().mean())),
            "secondary_top1_given_primary": _percent(given),
        }

    def __repr__(self) -> str:
        return (f"TwoLevelTask(num_primary={self.num_primary}, num_secondary={self.num_secondary}, "
                f"hierarchy={'yes' if self.mask is not None else 'no'})")

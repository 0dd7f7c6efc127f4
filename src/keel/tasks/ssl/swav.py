"""SwAV (Caron et al. 2020): swapped prediction of online cluster assignments, with multi-crop.

Each crop is projected to the unit sphere and scored against K learnable prototypes (unit
vectors too). The codes of a global crop are its scores turned into a soft assignment by a few
Sinkhorn-Knopp iterations, which force the batch to spread evenly over the prototypes (the
equipartition that prevents collapse). Every other crop of the same image, local crops included,
must then predict those codes from its own scores: a cross-entropy between the codes of one view
and the softmax of another.

What runs where:

- ``on_step_start``: the prototypes are put back on the unit sphere; whether the queue is being
  filled or used follows from the global step (so a resumed run does exactly as an unbroken one).
- ``make_views``: 2 global crops + ``aug.local_crops`` (default 6) local crops.
- ``training_step``: one backbone call per crop resolution, one projector call over all crops,
  scores in float32, Sinkhorn (all-reduced over processes), the swapped-prediction loss, queue update.
- ``before_optimizer_step``: during the first ``method.freeze_prototypes_epochs`` epochs the
  prototypes' gradient (and their bias's, with ``method.prototype_bias``) is dropped, so no
  optimizer moves them (the paper's fix for early instability: the prototypes must not chase a
  projector that is still random).
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from keel.config import ConfigError, RunConfig
from keel.engine import distributed as D
from keel.tasks.ssl.augment import MultiCrop
from keel.tasks.ssl.base import Method, register_method
from keel.tasks.ssl.heads import mlp_head


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if D.world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)  # in place: x is always a tensor made here
    return x


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, iters: int = 3, eps: float = 0.05) -> torch.Tensor:
    """Soft codes of a batch of prototype scores, with equal prototype marginals.

    ``scores``: (n, K) similarities of this process's n samples to the K prototypes. Solves, by
    ``iters`` alternate normalisations, the entropy-regularised transport problem over the whole
    global batch of B samples (all processes): Q = exp(scores / eps)^T is scaled until every
    prototype (row of Q) carries 1/K of the mass and every sample (column) 1/B. Returns the
    codes Q^T * B, (n, K), float32: each row sums to 1 (the last normalisation is the column one,
    so that holds exactly; the prototype marginals are only approached, as in the paper).

    Across processes only sums travel: the total mass with the sample count (one all_reduce),
    then the K row sums per iteration. Processes may hold different numbers of samples, and
    the codes of a sample do not depend on how the global batch is split among processes.
    """
    q = torch.exp(scores.detach().float() / eps).T                  # (K, n)
    k = q.shape[0]
    total = _all_reduce_sum(torch.stack([q.sum(), q.new_full((), q.shape[1])]))
    mass, b = total[0], total[1]                                      # global mass, global B
    q /= mass
    for _ in range(iters):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True))              # each prototype: mass 1 ...
        q /= k                                                        # ... then 1/K
        q /= q.sum(dim=0, keepdim=True)                               # each sample: mass 1 ...
        q /= b                                                        # ... then 1/B
    return (q * b).T


def swav_loss(global_scores: list[torch.Tensor], local_scores: list[torch.Tensor], temperature: float = 0.1,
              iters: int = 3, eps: float = 0.05,
              queue_scores: list[torch.Tensor] | None = None,
              bias: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The swapped-prediction loss and the codes of the global crops.

    ``global_scores`` / ``local_scores``: one (n, K) tensor of prototype scores per crop, rows
    aligned (row j of every crop is image j). For each global crop i, its codes q_i come from
    Sinkhorn on its scores (no gradient), preceded by ``queue_scores[i]`` (past features' scores,
    or None) whose codes are dropped: only the current images are predicted. The term of crop i
    is the mean, over every other crop v, of the cross-entropy -sum_k q_i log softmax(s_v / T);
    the loss is the mean of the terms over the global crops, and the mean over this process's
    images. Float32 whatever the input dtype.

    ``bias`` (K,), optional, is added to the scores of the predictions only. The codes do not
    need it: it multiplies each row of exp(scores / eps) by a constant, which Sinkhorn's first
    prototype normalisation removes, so codes from the raw cosines are the same codes (and
    exp stays finite, cosines being at most 1).
    """
    crops = [s.float() for s in list(global_scores) + list(local_scores)]
    if len(global_scores) < 1 or len(crops) < 2:
        raise ValueError("SwAV needs at least one global crop and one other crop")
    log_p = [F.log_softmax((s if bias is None else s + bias.float()) / temperature, dim=1) for s in crops]
    terms, codes = [], []
    for i, s in enumerate(crops[:len(global_scores)]):
        if queue_scores is not None:
            s = torch.cat([queue_scores[i].float(), s])
        q = sinkhorn(s, iters, eps)[-len(crops[i]):]
        codes.append(q)
        others = [-(q * log_p[v]).sum(dim=1).mean() for v in range(len(crops)) if v != i]
        terms.append(torch.stack(others).mean())
    return torch.stack(terms).mean(), codes


@register_method
class SwAV(Method):
    name = "swav"
    defaults = dict(temperature=0.1, proj_dim=128, proj_hidden_dim=2048, num_prototypes=3000)

    def __init__(self, backbone: nn.Module, cfg: RunConfig):
        super().__init__(backbone, cfg)
        m = cfg.method
        self.temperature = self.opt("temperature")
        self.sinkhorn_iters = m.sinkhorn_iters
        self.sinkhorn_eps = m.sinkhorn_eps
        self.freeze_prototypes_epochs = m.freeze_prototypes_epochs
        self.queue_start_epoch = m.queue_start_epoch
        self.global_batch = cfg.train.batch_size
        # Scores are cosines (at most 1), so exp(scores / eps) stays finite in float32 while
        # 1 / eps < 88; below that bound Sinkhorn would return NaN codes.
        if not 1 / 88 < self.sinkhorn_eps:
            raise ConfigError(f"method.sinkhorn_eps must be above 1/88 ~ 0.0114 (exp(1/eps) overflows "
                              f"float32), got {self.sinkhorn_eps}")
        if m.queue_length < 0 or self.sinkhorn_iters < 1:
            raise ConfigError("method.queue_length must be >= 0 and method.sinkhorn_iters >= 1")
        proj_dim = self.opt("proj_dim")
        self.projector = mlp_head([backbone.num_features, self.opt("proj_hidden_dim"), proj_dim])
        # Unit vectors, no bias by default (the official code). With method.prototype_bias each score gets
        # a learned offset, as in lightly's SwaVPrototypes: Sinkhorn cancels it (a per-prototype factor on
        # exp(score / eps)), so it only shifts the predicted distribution, a learned log-prior.
        self.prototypes = nn.Linear(proj_dim, self.opt("num_prototypes"), bias=m.prototype_bias)
        self.normalize_prototypes()
        self.multicrop = MultiCrop(cfg, default_local_crops=6)
        self.n_global = self.multicrop.n_global

        # The queue: the unit projections of the global crops of the last queue_length images,
        # newest first, one slot per global crop. Why: Sinkhorn spreads the samples it sees
        # evenly over the K prototypes. With a small batch (B < K, e.g. 256 images for 3000
        # prototypes) that is less than one sample per prototype, and the constraint is met by
        # near-arbitrary codes; past features (which get codes but no gradient) enlarge the set
        # being partitioned to B + queue_length, and the current batch's codes become meaningful.
        # From epoch queue_start_epoch on (when features drift slowly enough to be reused), each
        # step pushes its batch; once the queue is full it is also used, as in the official code.
        #
        # Every process holds the same, global queue (all processes' features, in global batch
        # order) and gives Sinkhorn its own contiguous share of it, so each entry counts once.
        # Chosen over the official per-process queue of queue_length // world_size rows because
        # (1) checkpoints are written by rank 0 alone and DDP broadcasts rank 0's buffers before
        # every forward, so per-process queues would all become rank 0's; (2) the codes, hence
        # the run, then do not depend on the number of processes.
        self.register_buffer("queue", torch.zeros(self.n_global, m.queue_length, proj_dim))
        # Set by on_step_start from the global step alone: no state to save, exact on resume,
        # and each flips once per run (torch.compile recompiles once, not every step).
        self._push_queue = False
        self._use_queue = False

    # ---------------------------------------------------------------- hooks
    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def on_step_start(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        self.normalize_prototypes()
        length = self.queue.shape[1]
        pushed = step - round(self.queue_start_epoch * steps_per_epoch)  # batches pushed so far
        self._push_queue = length > 0 and pushed >= 0
        self._use_queue = self._push_queue and pushed * self.global_batch >= length

    def before_optimizer_step(self, step: int, steps_per_epoch: int) -> None:
        if step < self.freeze_prototypes_epochs * steps_per_epoch:
            # No gradient = skipped by AdamW, SGD and LARS alike: no update, no weight decay,
            # no optimizer state. Dropped after DDP's all-reduce, so every process agrees.
            for p in self.prototypes.parameters():
                p.grad = None

    # ---------------------------------------------------------------- views and loss
    def make_views(self, images, generator, sizes=None):
        return self.multicrop(images, generator, sizes)

    def embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Projections of all crops, (len(views) * n, proj_dim), in the views' order.

        Crops of one resolution go through the backbone together, as in the official code:
        fewer, larger calls, and BatchNorm normalises each resolution over all its crops."""
        groups = itertools.groupby(views, key=lambda v: tuple(v.shape[-2:]))
        feats = torch.cat([self.backbone.embed(torch.cat(list(g))) for _, g in groups])
        return self.projector(feats)

    def training_step(self, views) -> dict:
        n, g = views[0].shape[0], self.n_global
        z = self.embed(views)
        # Scores (the queue's too) and loss in float32, outside autocast: Sinkhorn divides the
        # scores by eps = 0.05, so bf16's ~3 significant digits would become ~10% noise on the codes.
        with torch.autocast(z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=1)
            crops = (z @ self.prototypes.weight.T).split(n)  # cosines; the bias enters the predictions alone
            queue_scores = self._queue_scores() if self._use_queue else None
            loss, codes = swav_loss(crops[:g], crops[g:], self.temperature, self.sinkhorn_iters,
                                    self.sinkhorn_eps, queue_scores, self.prototypes.bias)
        if self._push_queue:
            if n * D.world_size() != self.global_batch:
                raise RuntimeError(f"SwAV's queue expects batches of train.batch_size={self.global_batch} "
                                   f"images in all, got {n} x {D.world_size()} processes")
            self._enqueue(z[:g * n].detach().view(g, n, -1))

        with torch.no_grad():
            q = torch.cat(codes)
            entropy = -(q * q.clamp_min(1e-12).log()).sum(dim=1).mean()
            used = torch.zeros(q.shape[1], device=q.device).index_fill_(0, q.argmax(dim=1), 1.0).mean()
        # entropy of the codes (nats; log K = uniform), fraction of prototypes that are the top
        # code of at least one global crop of this process's batch
        return {"loss": loss, "code_entropy": entropy, "prototypes_used": used}

    # ---------------------------------------------------------------- queue
    @torch.no_grad()
    def _queue_scores(self) -> list[torch.Tensor]:
        """This process's share of the queue scored against the current prototypes, per global
        crop (no gradient: past features only shape the codes)."""
        length, world, r = self.queue.shape[1], D.world_size(), D.rank()
        share = self.queue[:, length * r // world: length * (r + 1) // world]
        return [share[i] @ self.prototypes.weight.T for i in range(self.n_global)]

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor) -> None:
        """Push the global batch's (g, n, d) features at the front of the queue, oldest out."""
        g, n, d = z.shape
        new = D.gather_with_grad(z.transpose(0, 1).reshape(n, g * d))  # (B, g*d) in rank order; no grad here
        new = new.view(-1, g, d).transpose(0, 1)                         # (g, B, d)
        self.queue.copy_(torch.cat([new, self.queue], dim=1)[:, :self.queue.shape[1]])

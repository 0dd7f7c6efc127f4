"""MAE, masked autoencoders (He et al. 2021): hide most patches of an image, encode only the
visible ones with the ViT, and let a light Transformer decoder draw the pixels of the hidden ones.

- Masking: per image, ``method.mask_ratio`` (0.75) of the patches, uniformly at random: the
  patches are ranked by noise drawn in ``make_views`` from the step's generator and the first
  ``round(N * (1 - ratio))`` are kept. The encoder sees the kept patches (with their position
  embeddings) and the class token, never a mask token (``VisionTransformer.forward_visible``).
- Decoder: Linear(encoder width -> ``decoder_dim``), a learned mask token for every hidden patch,
  fixed 2-D sine-cosine position embeddings (the paper's; prefix tokens get position zero),
  ``decoder_depth`` ViT blocks with ``decoder_heads`` heads, LayerNorm, Linear -> p*p*3 pixels.
  Left None, the three scale with the encoder (:func:`default_decoder`): MAE's own 8 x 512 for
  ViT-B/L/H, 2 x 192 with 6 heads for ``vit_tiny_patch4_32``; a value set in the config wins.
- Loss: mean squared error on the hidden patches only. Target pixels are the view itself: the
  image in [0, 1] normalized with mean = std = 0.5 (the views' normalization; MAE uses ImageNet's
  statistics, which only matters without ``norm_pix_loss``). With ``method.norm_pix_loss`` (default)
  each target patch is normalized by its own mean and variance (unbiased, eps 1e-6, as MAE's code),
  so that normalization cancels anyway.
- Views: one random resized crop (scale (aug.scale_min, 1), 0.2 by default as MAE) and flip, no
  colour jitter, grayscale or blur.

The class token gets no loss of its own (it only helps the decoder through attention), so export
the mean of the patch tokens for evaluation and transfer: ``model.global_pool=avg``, as MAE's
fine-tuning does. After 6 epochs on Fashion-MNIST's 60k images it is worth 5 points of kNN@200;
after a very short run (93 steps) the class token was 2.5 points ahead (BENCHMARKS.md).

ViT backbones only (no windowed attention, no relative position bias: both are laid out on the
full grid). The trainer owns the optimizer; the paper's pretraining setting is AdamW with
betas (0.9, 0.95), weight decay 0.05 (``train.weight_decay=0.05``) and a base lr of 1.5e-4 per 256
images (``train.lr=1.5e-4``), 40 warm-up epochs; keel's AdamW keeps PyTorch's betas (0.9, 0.999).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from keel.config import RunConfig
from keel.data.views import BatchAugment, eval_transform
from keel.tasks.ssl.augment import view_config
from keel.tasks.ssl.base import Method, register_method
from keel.models.vit import Block, VisionTransformer


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C): patches row by row, each flattened (row, column, channel)
    like MAE's code."""
    B, C, H, W = images.shape
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(patches: torch.Tensor, p: int, hw: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
    B = patches.shape[0]
    h, w = hw
    x = patches.reshape(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, -1, h * p, w * p)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each patch to zero mean and unit (unbiased) variance -> (normalized, mean, var)."""
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt(), mean, var


def num_kept(n: int, mask_ratio: float) -> int:
    """Patches the encoder sees out of ``n``: round(n * (1 - ratio)), at least 1, at most n - 1."""
    return max(1, min(n - 1, round(n * (1 - mask_ratio))))


def random_masking(noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """noise (B, N) -> (kept indices (B, keep), restore (B, N), mask (B, N) bool, True = hidden).

    The ``keep`` patches with the lowest noise are kept (a uniform random subset per image);
    ``restore`` puts the sequence [kept..., hidden...] back in grid order."""
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    kept = shuffle[:, :keep]
    mask = torch.ones_like(noise, dtype=torch.bool).scatter_(1, kept, False)
    return kept, restore, mask


def sincos_pos_embed(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding of an h x w grid, (h*w, dim): the first half of
    the channels encodes the column, the second the row, each as [sin, cos] of the position at
    frequencies 1 / 10000^(k / (dim/4)) (MAE's table for square grids)."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over hidden patches of the per-patch mean squared error; pred, target (B, N, D),
    mask (B, N) bool. Every image hides the same number of patches, so the mean over
    processes is the loss of the whole batch."""
    per_patch = (pred.float() - target.float()).pow(2).mean(-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum()


# MAE's decoder (8 blocks of 512) over ViT-B's encoder (12 blocks of 768): the per-token compute
# of the paper's smallest pairing, ~0.30 (ViT-L's is 0.083, the paper's "<10%")
DECODER_COMPUTE_RATIO = (8 * 512 ** 2) / (12 * 768 ** 2)
MAX_DECODER_DIM, MAX_DECODER_DEPTH, MIN_HEAD_DIM = 512, 8, 32


def default_decoder_dim(enc_dim: int) -> int:
    """The encoder's width, at most 512 (MAE: 512 is enough, wider is no better), rounded down to a
    multiple of 4 (the sine-cosine table's need)."""
    return max(4, min(enc_dim, MAX_DECODER_DIM) // 4 * 4)


def default_decoder_depth(enc_dim: int, enc_depth: int, dim: int) -> int:
    """Blocks of width ``dim`` whose per-token compute (blocks x width^2) is closest to
    DECODER_COMPUTE_RATIO of the encoder's, between 1 and 8: 8 for ViT-B/L/H as MAE's code,
    2 for a 6-block 192-wide ViT, 4 for ViT-S."""
    blocks = round(DECODER_COMPUTE_RATIO * enc_depth * enc_dim ** 2 / dim ** 2)
    return max(1, min(MAX_DECODER_DEPTH, blocks))


def default_decoder_heads(dim: int) -> int:
    """The most heads that divide ``dim`` with heads of at least 32 channels (MAE: 16 x 32 = 512);
    one head below 64 channels."""
    return max([h for h in range(1, dim // MIN_HEAD_DIM + 1) if dim % h == 0], default=1)


def default_decoder(enc_dim: int, enc_depth: int) -> tuple[int, int, int]:
    """(width, blocks, heads) of the decoder for an encoder of this width and depth."""
    dim = default_decoder_dim(enc_dim)
    return dim, default_decoder_depth(enc_dim, enc_depth, dim), default_decoder_heads(dim)


class MAEDecoder(nn.Module):
    """Encoder tokens of the visible patches -> pixels of every patch, (B, N, p*p*3)."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, patch_pixels: int, num_prefix: int,
                 grid: tuple[int, int]):
        super().__init__()
        self.num_prefix = num_prefix
        self.grid = tuple(grid)
        # fixed, so not saved; other grids compute their own table
        self.register_buffer("pos_embed", sincos_pos_embed(dim, *self.grid), persistent=False)
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, True, 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():  # MAE's init
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, restore: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = self.embed(latent)
        P = self.num_prefix
        prefix, visible = x[:, :P], x[:, P:]
        B, K, D = visible.shape
        N = restore.shape[1]
        x = torch.cat([visible, self.mask_token.to(x.dtype).expand(B, N - K, D)], dim=1)
        x = x.gather(1, restore.unsqueeze(-1).expand(-1, -1, D))  # back to grid order
        pos = self.pos_embed if tuple(hw) == self.grid else sincos_pos_embed(D, *hw).to(x.device)
        x = x + pos.to(x.dtype)
        x = torch.cat([prefix, x], dim=1)  # prefix tokens: position zero, as MAE
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, P:]


@register_method
class MAE(Method):
    name = "mae"
    defaults = dict(mask_ratio=0.75)

    def __init__(self, backbone: nn.Module, cfg: RunConfig):
        super().__init__(backbone, cfg)
        if not isinstance(backbone, VisionTransformer):
            raise ValueError(f"MAE needs a ViT backbone (vit_* / deit_*), not {type(backbone).__name__}; "
                             f"use method.name=simmim for hierarchical backbones")
        if backbone.cfg.window_size or backbone.cfg.rel_pos:
            raise ValueError("MAE encodes a random subset of the patches: it needs a ViT without windowed "
                             "attention (window_size=0) and without rel_pos")
        m = cfg.method
        self.mask_ratio = float(self.opt("mask_ratio"))
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"method.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        self.norm_pix_loss = m.norm_pix_loss
        self.patch_size = backbone.cfg.patch_size
        enc_dim, enc_depth = backbone.num_features, len(backbone.blocks)
        # an explicit value wins; the others follow from the encoder and from it
        dim = int(self.opt("decoder_dim", default_decoder_dim(enc_dim)))
        depth = int(self.opt("decoder_depth", default_decoder_depth(enc_dim, enc_depth, dim)))
        heads = int(self.opt("decoder_heads", default_decoder_heads(dim)))
        if depth < 1 or heads < 1 or dim % 4 or dim % heads:
            raise ValueError(f"MAE decoder: width {dim} must be divisible by 4 and by the heads ({heads}), "
                             f"depth ({depth}) and heads at least 1")
        self.decoder = MAEDecoder(enc_dim, dim, depth, heads, self.patch_size ** 2 * 3,
                                  backbone.num_prefix_tokens, (backbone.grid, backbone.grid))
        self.augment = BatchAugment(replace(view_config(cfg), jitter_p=0.0, gray_p=0.0, blur_p=0.0))

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"MAE: images {H}x{W} are not a multiple of the patch size {self.patch_size}")
        return H // self.patch_size, W // self.patch_size

    def _noise(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        h, w = self._grid(x)
        device = generator.device if generator is not None else "cpu"
        return torch.rand(len(x), h * w, generator=generator, device=device).to(x.device)

    def make_views(self, images, generator, sizes=None):
        x = self.augment(images, generator, sizes)
        return x, self._noise(x, generator)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The pixels each patch is asked for, (B, N, p*p*3), float32."""
        patches = patchify(x.float(), self.patch_size)
        return normalize_patches(patches)[0] if self.norm_pix_loss else patches

    def predict(self, x: torch.Tensor, noise: torch.Tensor):
        """-> (predicted pixels (B, N, p*p*3), mask (B, N) bool, True = hidden)."""
        hw = self._grid(x)
        kept, restore, mask = random_masking(noise, num_kept(hw[0] * hw[1], self.mask_ratio))
        latent = self.backbone.forward_visible(x, kept)
        return self.decoder(latent, restore, hw), mask

    def training_step(self, views) -> dict:
        x, noise = views
        pred, mask = self.predict(x, noise)
        return {"loss": masked_mse(pred, self.target(x), mask)}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None) -> dict:
        """Pictures of what the decoder draws: uint8 (B, 3, H, W) images (resized to
        data.img_size, no augmentation), masked with noise from ``generator`` -> dict of float
        (B, 3, H, W) in [0, 1]: ``original``, ``masked`` (hidden patches grey) and
        ``reconstruction`` (hidden patches predicted, un-normalized with the true patch's own
        mean and variance under norm_pix_loss; visible patches pasted from the original).
        Runs in the method's current mode: call ``.eval()`` first for drop-path-free pictures."""
        vc = self.augment.cfg
        device = next(self.parameters()).device
        x = eval_transform(images.to(device), self.cfg.data.img_size, vc.mean, vc.std)
        hw = self._grid(x)
        pred, mask = self.predict(x, self._noise(x, generator))
        pred = pred.float()
        if self.norm_pix_loss:
            _, mean, var = normalize_patches(patchify(x.float(), self.patch_size))
            pred = pred * (var + 1e-6).sqrt() + mean
        mean = torch.tensor(vc.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(vc.std, device=device).view(1, 3, 1, 1)
        original = (x.float() * std + mean).clamp(0.0, 1.0)
        drawn = (unpatchify(pred, self.patch_size, hw) * std + mean).clamp(0.0, 1.0)
        hidden = unpatchify(mask.unsqueeze(-1).expand(-1, -1, self.patch_size ** 2 * 3).float(),
                            self.patch_size, hw).bool()
        return {"original": original,
                "masked": torch.where(hidden, torch.full_like(original, 0.5), original),
                "reconstruction": torch.where(hidden, drawn, original)}

"""The text side of image-text pretraining: a BPE tokenizer trained on the user's own captions,
and CLIP's text tower (Radford et al. 2021), built by name.

* :class:`CaptionTokenizer` wraps a Hugging Face ``tokenizers`` byte-level BPE, trained offline on
  the captions at hand (no vocabulary is downloaded) and saved as one JSON file in the run
  directory (``tokenizer.json``: plain data, loading it runs no code). A caption becomes
  ``<sot> tokens <eot>``, cut to ``context_length`` (the end-of-text token is kept) and padded with
  ``<pad>`` (id 0).
* :class:`TextTransformer` is CLIP's tower: token + learned position embedding, pre-norm blocks
  with a causal mask, a final LayerNorm, the feature at the end-of-text token, a linear projection
  (no bias) to the joint embedding. Because of the causal mask, the padding after ``<eot>`` never
  reaches the pooled feature.

Sizes (``create_text_model(name, vocab_size=..., embed_dim=...)``): ``text_tiny`` (CPU tests),
``text_small``, ``text_base`` (CLIP ViT-B's text tower: width 512, 12 layers, 8 heads, 77 tokens).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, SOT, EOT = "<pad>", "<sot>", "<eot>"


# ---------------------------------------------------------------------------------- tokenizer
class CaptionTokenizer:
    """Byte-level BPE over lower-cased captions (``tokenizers``); ids of ``<pad>``, ``<sot>``,
    ``<eot>`` are 0, 1, 2."""

    def __init__(self, tok, context_length: int = 77):
        self.tok = tok
        self.context_length = int(context_length)
        self.pad_id, self.sot_id, self.eot_id = (tok.token_to_id(t) for t in (PAD, SOT, EOT))
        if None in (self.pad_id, self.sot_id, self.eot_id):
            raise ValueError("the tokenizer has no <pad>, <sot> and <eot> tokens: not a keel caption tokenizer")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, context_length: int = 77,
              min_frequency: int = 2) -> "CaptionTokenizer":
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=[PAD, SOT, EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, context_length)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N, context_length) int64: <sot> ids <eot> <pad>..., ids cut so <eot> always fits."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.int64)
        for i, enc in enumerate(self.tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self.sot_id, *enc.ids[: self.context_length - 2], self.eot_id]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def decode(self, ids: torch.Tensor) -> str:
        keep = [int(i) for i in ids if int(i) not in (self.pad_id, self.sot_id, self.eot_id)]
        return self.tok.decode(keep).strip()

    def save(self, path: str | Path) -> None:
        data = json.loads(self.tok.to_str())
        data["keel"] = {"context_length": self.context_length}
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> "CaptionTokenizer":
        from tokenizers import Tokenizer
        data = json.loads(Path(path).read_text())
        ctx = int(data.pop("keel", {}).get("context_length", 77))
        return cls(Tokenizer.from_str(json.dumps(data)), ctx)


# ---------------------------------------------------------------------------------- text tower
@dataclass
class TextConfig:
    vocab_size: int = 8192
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    embed_dim: int = 512         # joint image-text embedding


class _Block(nn.Module):
    """Pre-norm Transformer block with causal self-attention (CLIP's ResidualAttentionBlock)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """``forward(tokens (B, L) int64) -> (B, embed_dim)``: the projected feature at each row's
    end-of-text token (the last non-pad position)."""

    def __init__(self, cfg: TextConfig, pad_id: int = 0):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"text width {cfg.width} is not divisible by {cfg.heads} heads")
        self.cfg, self.pad_id = cfg, pad_id
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(_Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self._init()

    def _init(self) -> None:
        # CLIP's initialisation: residual projections scaled down with depth
        w, n = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = (w ** -0.5) * ((2 * n) ** -0.5), w ** -0.5, (2 * w) ** -0.5
        for blk in self.blocks:
            nn.init.normal_(blk.qkv.weight, std=attn_std)
            nn.init.zeros_(blk.qkv.bias)
            nn.init.normal_(blk.proj.weight, std=proj_std)
            nn.init.zeros_(blk.proj.bias)
            nn.init.normal_(blk.mlp[0].weight, std=fc_std)
            nn.init.normal_(blk.mlp[2].weight, std=proj_std)
        nn.init.normal_(self.text_projection.weight, std=w ** -0.5)

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.cfg.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens, the text tower takes at most {self.cfg.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_final(x)
        last = (tokens != self.pad_id).sum(1).clamp(min=1) - 1     # the <eot> of each row
        return self.text_projection(x[torch.arange(len(x), device=x.device), last])


# ---------------------------------------------------------------------------------- by name
_TEXT_MODELS: dict[str, Callable[..., TextTransformer]] = {}


def register_text_model(fn: Callable[..., TextTransformer]) -> Callable[..., TextTransformer]:
    if fn.__name__ in _TEXT_MODELS:
        raise ValueError(f"text model '{fn.__name__}' is registered twice")
    _TEXT_MODELS[fn.__name__] = fn
    return fn


def list_text_models() -> list[str]:
    return sorted(_TEXT_MODELS)


def create_text_model(name: str, **kwargs) -> TextTransformer:
    """A text tower by name; keywords override :class:`TextConfig` fields (vocab_size, embed_dim...)."""
    if name not in _TEXT_MODELS:
        raise ValueError(f"unknown text model '{name}'; choose one of {', '.join(list_text_models())}")
    return _TEXT_MODELS[name](**kwargs)


def _build(defaults: dict, kwargs: dict) -> TextTransformer:
    pad_id = kwargs.pop("pad_id", 0)
    unknown = set(kwargs) - set(asdict(TextConfig()))
    if unknown:
        raise ValueError(f"unknown text model option(s) {sorted(unknown)}")
    return TextTransformer(TextConfig(**{**defaults, **kwargs}), pad_id)


@register_text_model
def text_tiny(**kwargs) -> TextTransformer:
    return _build(dict(width=64, layers=2, heads=2, context_length=32, embed_dim=64), kwargs)


@register_text_model
def text_small(**kwargs) -> TextTransformer:
    return _build(dict(width=256, layers=6, heads=4, context_length=64, embed_dim=256), kwargs)


@register_text_model
def text_base(**kwargs) -> TextTransformer:
    """CLIP ViT-B/16's text tower (63M parameters at its 49408-token vocabulary)."""
    return _build(dict(width=512, layers=12, heads=8, context_length=77, embed_dim=512), kwargs)

"""``keel clip train``'s typed config, sectioned like the others (keel.config): data, model, train
(the shared :class:`~keel.config.TrainConfig`).

Defaults follow open_clip's recipe where it carries over to a team's own few thousand pairs: AdamW
with weight decay 0.2, a cosine schedule with warm-up; the lr is 5e-4 per 256 pairs (keel scales it
linearly with the batch; open_clip's 5e-4 at 32k pairs would leave a small run where it started); light random crops
over the whole image (scale 0.9-1: captions describe the whole picture). The tokenizer is trained on the run's own
captions (data.vocab_size), never downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from keel.config import TrainConfig


@dataclass
class ClipDataConfig:
    source: str = ""                # a folder (image + .txt), a .csv (image, text columns) or shards:PATH
    image_column: str = ""          # CSV: the image path column ("" = image/filepath/path/...)
    text_column: str = ""           # CSV: the caption column ("" = text/caption/title)
    img_size: int = 0               # 0 = the image tower's own size (a run's trained size)
    vocab_size: int = 8192          # BPE vocabulary trained on the captions
    context_length: int = 0         # tokens per caption; 0 = the text tower's
    crop_scale_min: float = 0.9     # random resized crops of this area fraction up to 1
    crop_from: str = "whole"        # crops drawn over the "whole" image (aspect kept) or the "center" square
    shuffle_buffer: int = 4096      # shards only
    num_workers: int = 2


@dataclass
class ClipModelConfig:
    image: str = ""                 # the image tower: a keel run directory, .safetensors,
                                    # timm:<model>:<file> or random:<model>
    text: str = "text_small"        # text_tiny | text_small | text_base (CLIP's)
    embed_dim: int = 256            # the joint embedding
    loss: str = "clip"              # clip (softmax InfoNCE) | siglip (pairwise sigmoid)
    local_loss: bool = False        # clip: score only this process's rows against the gathered batch
    lock_image: bool = False        # LiT: the image tower stays as given (eval mode, no gradient)


def _clip_train() -> TrainConfig:
    return TrainConfig(epochs=10, batch_size=256, lr=5e-4, weight_decay=0.2, warmup_epochs=1.0,
                       knn_every=0, drop_last=True, log_every=10)


@dataclass
class ClipConfig:
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    train: TrainConfig = field(default_factory=_clip_train)

"""Detection records as the trainer's data: items and batches in the form
:func:`keel.data.batches.load_batches` moves to the device, undecodable images skipped with
their reason, and the ground truth as a COCO dict for evaluation.

An item is ``(uint8 image (3, H, W), target, index)`` with plain tensors in the target (``boxes``
XYXY float, ``labels``, ``image_id``, ``masks`` when asked); a batch is ``{"images": [...],
"targets": [...], "index", "skipped", "reasons"}``, images at their own sizes (the task jitters
them to the training square on the device).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from keel.data.errors import BadImageError
from keel.detection.annotations import Record
from keel.detection.dataset import DetectionDataset, to_coco


class DetectionData(torch.utils.data.Dataset):
    def __init__(self, records: Sequence[Record], classes: Sequence[str], with_masks: bool = False):
        self.records, self.classes = list(records), list(classes)
        self.dataset = DetectionDataset(self.records, with_masks=with_masks)
        # skipped.txt names the file (and the tile, for a tiled record)
        self.paths = [r.image_path + (f" (tile {r.crop})" if r.crop is not None else "") for r in self.records]
        self._coco: dict | None = None

    def __len__(self) -> int:
        return len(self.records)

    def item(self, i: int) -> tuple[torch.Tensor, dict]:
        """Image and target of record ``i``; raises :class:`BadImageError` for a bad file."""
        image, target = self.dataset[i]
        target = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
        return image.as_subclass(torch.Tensor), target

    def __getitem__(self, i: int):
        try:
            image, target = self.item(i)
        except BadImageError as e:      # the reason travels in the image's place, as in keel.data
            return f"{type(e).__name__}: {e}", None, int(i)
        return image, target, int(i)

    @staticmethod
    def collate_fn(batch) -> dict:
        good = [b for b in batch if isinstance(b[0], torch.Tensor)]
        bad = [b for b in batch if not isinstance(b[0], torch.Tensor)]
        return {"images": [b[0] for b in good], "targets": [b[1] for b in good],
                "index": torch.tensor([b[2] for b in good], dtype=torch.int64),
                "skipped": torch.tensor([b[2] for b in bad], dtype=torch.int64),
                "reasons": [b[0] for b in bad]}

    def coco(self) -> dict:
        """The ground truth as a COCO dict (category id = label), made once."""
        if self._coco is None:
            self._coco = to_coco(self.records, self.classes)
        return self._coco

    def subset(self, indices: Sequence[int]) -> "DetectionData":
        return DetectionData([self.records[int(i)] for i in indices], self.classes, self.dataset.with_masks)

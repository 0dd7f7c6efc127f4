"""Weight initialisation shared by the Transformer families."""
import torch.nn as nn


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """Every nn.Linear below ``module``: truncated-normal weights, zero bias (ViT / Swin / CSWin
    convention); other layers keep PyTorch's defaults."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

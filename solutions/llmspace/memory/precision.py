"""Mixed precision: fp16 dynamic loss scaling. Part of :mod:`llmspace.memory`, which re-exports it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["DynamicLossScaler"]


# --------------------------------------------------------------------------------------------------
# Mixed precision: fp16 loss scaling
# --------------------------------------------------------------------------------------------------

@dataclass
class DynamicLossScaler:
    """fp16 loss scaling (the algorithm of ``torch.amp.GradScaler``): multiply the loss by ``scale``
    before backward so small gradients do not flush to zero in fp16 (smallest subnormal 6e-8); unscale
    before the step; on inf/NaN skip the step and halve the scale; after ``growth_interval`` clean steps
    double it. bf16 has fp32's exponent range and needs none of this."""
    scale: float = 2.0 ** 16
    growth_interval: int = 2000
    clean_steps: int = 0
    skipped: int = field(default=0)

    def unscale_and_check(self, grads) -> bool:
        """Divide ``grads`` in place by the scale; True when all are finite (the step may proceed)."""
        finite = True
        for g in grads:
            if g is None:
                continue
            g.div_(self.scale)
            finite &= bool(torch.isfinite(g).all())
        if not finite:
            self.scale /= 2
            self.clean_steps, self.skipped = 0, self.skipped + 1
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale, self.clean_steps = self.scale * 2, 0
        return finite

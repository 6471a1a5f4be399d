"""Dense float matrices (fp32, bf16, fp16): the format of unquantised models and of ``--keep``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgellm.dtypes import FLOAT_DTYPES
from edgellm.quant.base import Weight, list_shape
from edgellm.quant.registry import register


class DenseWeight(Weight):
    """A plain float matrix (fp32, bf16 or fp16); computes in the weight's own dtype."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.contiguous()
        self.shape = tuple(tensor.shape)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.tensor.dtype), self.tensor).to(x.dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.tensor.index_select(0, index).float()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def format(self) -> str:
        return str(self.tensor.dtype).removeprefix("torch.")

    def parts(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"format": self.format, "shape": list_shape(self)}, {"weight": self.tensor}

    @classmethod
    def concat(cls, weights: list[Weight]) -> Weight | None:
        if any(w.tensor.dtype != weights[0].tensor.dtype for w in weights):
            return None
        return DenseWeight(torch.cat([w.tensor for w in weights]))


def _convert(w: Weight, fmt, segments=None) -> Weight:
    if isinstance(w, DenseWeight) and w.tensor.dtype == fmt.dtype:
        return w
    return DenseWeight(w.dequantize().to(fmt.dtype))


def _load(params: dict, parts: dict[str, torch.Tensor]) -> Weight:
    return DenseWeight(parts["weight"].to(FLOAT_DTYPES[params["format"]]))


register("dense", _convert, _load)

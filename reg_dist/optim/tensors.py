"""Plain tensors behind DTensors: element-wise kernels run on the shard a rank holds."""

from torch import Tensor
from torch.distributed.tensor import DTensor


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view sharing its storage); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t

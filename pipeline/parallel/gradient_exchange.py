"""Average the output layer's gradients across its data-parallel replicas through Horovod.

The backbone is DeepSpeed's business; the output layer lives outside ZeRO, and its replicas (ranks
holding the same label range, i.e. one data-parallel group of the grid) exchange gradients here, in
the Horovod process set of that group. The random-projection head is the case this is built for:
its slim classifier is small enough that compression, not bandwidth, decides the cost.

Compression modes:
- `none`: allreduce-average in float32.
- `fp16`: Horovod's fp16 Compression (cast for the wire, average, cast back).
- `bf16`: bfloat16 payloads. Horovod 0.28.1 cannot reduce bfloat16 tensors on CPU (its Gloo and MPI
  ops reject them), so the 16-bit payloads are allgathered and averaged in float32 on arrival.
- `topk`: each rank sends the `topk_fraction` largest-magnitude entries of (gradient + residual) as
  (int32 index, float32 value) pairs through Horovod allgather; what it did not send stays in a
  per-parameter residual and is added to the next step's gradient (error feedback), so
  sent + residual == accumulated gradient exactly and nothing is lost, only delayed.
With `sync_every > 1` no gradients are exchanged; instead the parameters are averaged every
`sync_every` steps (local SGD).

Bytes are counted as the payload each rank puts into the collectives (not the transport's own
traffic, which depends on the algorithm: a ring allreduce moves about 2(n-1)/n of it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

Compression = Literal["none", "fp16", "bf16", "topk"]


class GradientExchange:
    """Exchange for a fixed list of parameters; call `after_backward` then `after_step` every step."""

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, nn.Parameter]],
        process_set,
        compression: Compression = "none",
        topk_fraction: float = 0.01,
        sync_every: int = 1,
    ) -> None:
        import horovod.torch as hvd

        self.hvd = hvd
        self.params = [(name, p) for name, p in named_parameters if p.requires_grad]
        self.process_set = process_set
        self.replicas = process_set.size()
        self.compression = compression
        self.topk_fraction = topk_fraction
        self.sync_every = sync_every
        self.residuals = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self.params}
        self.bytes_sent = 0  # cumulative, this rank
        self.step_bytes = 0  # during the last exchange, this rank

    def after_backward(self) -> None:
        """Replace each gradient by its average over the replicas (unless doing local SGD)."""
        self.step_bytes = 0
        if self.replicas == 1 or self.sync_every > 1:
            return
        for name, p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(self.average(name, p.grad))
        self.bytes_sent += self.step_bytes

    def after_step(self, step: int) -> None:
        """Local SGD: average the parameters themselves every `sync_every` steps (step counts from 1)."""
        if self.sync_every == 1 or self.replicas == 1 or step % self.sync_every:
            return
        self.step_bytes = 0
        with torch.no_grad():
            for name, p in self.params:
                p.copy_(self._allreduce(name + ".param", p.data, self.hvd.Compression.none))
        self.bytes_sent += self.step_bytes

    def average(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        if self.compression == "none":
            return self._allreduce(name, grad, self.hvd.Compression.none)
        if self.compression == "fp16":
            return self._allreduce(name, grad, self.hvd.Compression.fp16)
        if self.compression == "bf16":
            return self._bf16_average(name, grad)
        return self._topk_average(name, grad)

    def _allreduce(self, name: str, tensor: torch.Tensor, compressor) -> torch.Tensor:
        wire_bytes = 2 if compressor is self.hvd.Compression.fp16 else tensor.element_size()
        self.step_bytes += tensor.numel() * wire_bytes
        return self._collective(
            self.hvd.allreduce,
            tensor,
            name=f"xchg.{name}",
            op=self.hvd.Average,
            compression=compressor,
            process_set=self.process_set,
        )

    def _collective(self, collective, tensor: torch.Tensor, /, **kwargs) -> torch.Tensor:
        """A Horovod collective. GPU tensors go through host memory when Horovod was built without CUDA
        (as setup.sh builds it), which would reject them; a CUDA build takes them as they are."""
        if tensor.is_cuda and not self.hvd.cuda_built():
            return collective(tensor.cpu(), **kwargs).to(tensor.device)
        return collective(tensor, **kwargs)

    def _bf16_average(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        bits = grad.detach().to(torch.bfloat16).reshape(1, -1).view(torch.int16)
        self.step_bytes += bits.numel() * 2
        gathered = self._collective(
            self.hvd.allgather, bits, name=f"xchg.{name}", process_set=self.process_set
        )
        return gathered.view(torch.bfloat16).float().mean(dim=0).view_as(grad).to(grad.dtype)

    def _topk_average(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        accumulated = grad.detach().float().reshape(-1) + self.residuals[name].reshape(-1)
        k = max(1, math.ceil(self.topk_fraction * accumulated.numel()))
        index = accumulated.abs().topk(k, sorted=False).indices
        values = accumulated[index]
        residual = accumulated.clone()
        residual[index] = 0.0
        self.residuals[name].copy_(residual.view_as(self.residuals[name]))
        self.step_bytes += k * (4 + 4)
        gather = self.hvd.allgather
        all_index = self._collective(
            gather, index.to(torch.int32), name=f"xchg.{name}.i", process_set=self.process_set
        )
        all_values = self._collective(gather, values, name=f"xchg.{name}.v", process_set=self.process_set)
        dense = torch.zeros_like(accumulated).index_add_(0, all_index.long(), all_values)
        return (dense / self.replicas).view_as(grad).to(grad.dtype)

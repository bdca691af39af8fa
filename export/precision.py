"""fp16 export of the vision graphs: the encoder's matmuls in fp16, every LayerNorm and the pruning subgraph in fp32.

Done in PyTorch before tracing (not by rewriting the ONNX afterwards) because the graph then carries exactly the
casts the model needs; the generic ONNX fp16 converters mis-handle the graph's own Cast nodes. The pruning
functions already compute in fp32 (they call ``.float()`` on what they read), so only LayerNorm needs hooks.
"""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def fp16_vision(adapter):
    """Within the block the adapter's vision tower and projector run in fp16 with fp32 LayerNorms; the exact fp32
    weights are restored afterwards (a round trip through fp16 would lose precision)."""
    tower = adapter._tower
    projector = getattr(adapter.model.model, "multi_modal_projector", None) or adapter.model.multi_modal_projector
    saved = {id(m): {k: v.detach().clone() for k, v in m.state_dict().items()} for m in (tower, projector)}
    hooks = []
    try:
        for m in (tower, projector):
            m.half()
        for module in tower.modules():
            if isinstance(module, nn.LayerNorm):
                module.float()
                hooks.append(module.register_forward_pre_hook(lambda mod, args: (args[0].float(),)))
                hooks.append(module.register_forward_hook(lambda mod, args, out: out.half()))
        yield
    finally:
        for h in hooks:
            h.remove()
        for m in (tower, projector):
            m.float()
            m.load_state_dict(saved[id(m)])

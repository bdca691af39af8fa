"""Qwen3-VL at run time: Qwen2.5-VL's preprocessing (at patch 16, from the manifest), auxiliary-CLIP view and M-RoPE
stitch (``models/qwen2_5_vl``), plus DeepStack: the graph's ``deepstack_embeds [levels, K, D]`` rows of the kept
tokens go to the decoder's prefill with ``deepstack_positions [K]``, the sequence positions where the kept tokens
were stitched (``Stitched.decoder_inputs``, bound by kind; empty at every generated token). Torch-free."""

from __future__ import annotations

import numpy as np

from vlmprune import graph_io
from vlmprune.errors import VlmpruneError
from vlmprune.models.qwen2_5_vl.runtime import QwenRuntime
from vlmprune.runtime.family import Stitched


class Qwen3Runtime(QwenRuntime):
    def __init__(self, bundle, table):
        super().__init__(bundle, table)
        decoder_inputs = self.manifest["decoder"]["inputs"]
        missing = [k for k in graph_io.PREFILL_INPUTS if not graph_io.has(decoder_inputs, k)]
        if missing:
            raise VlmpruneError(f"bundle {bundle.folder}: its decoder takes no {missing[0]} input, which Qwen3-VL's "
                                "DeepStack needs", "re-export the bundle")

    @classmethod
    def claims(cls, manifest: dict) -> bool:
        return False  # every Qwen3-VL manifest names its family (schema version 4 and later)

    def check_bucket(self, bucket: dict, image) -> None:
        if not graph_io.has(bucket["outputs"], "deepstack_embeds"):
            raise VlmpruneError(f"bucket {bucket['name']} returns no deepstack_embeds", "re-export the bundle")

    def stitch(self, ids, image_token_id, outputs, view, positions) -> Stitched:
        st = super().stitch(ids, image_token_id, outputs, view, positions)
        rows = np.asarray(outputs["deepstack_embeds"])
        k = len(st.kept)
        if rows.ndim != 3 or rows.shape[1] != k:
            raise VlmpruneError(f"the vision graph returned DeepStack rows {list(rows.shape)} for {k} kept tokens",
                                "re-export the bundle")
        where = ids.index(image_token_id)  # the kept tokens fill [where, where + K) of the stitched prompt
        st.decoder_inputs = {"deepstack_embeds": rows,
                             "deepstack_positions": np.arange(where, where + k, dtype=np.int64)}
        return st

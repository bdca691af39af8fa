"""Weight-only int8/int4 decoders: ONNX Runtime's block-wise quantizer (MatMulNBits), applied one MatMul at a time.

ONNX Runtime's ``MatMulNBitsQuantizer`` wants the whole float model in memory (13.5 GB for LLaVA-1.5-7B in fp16 on
top of its quantized copy). We drive its per-node quantizer (``DefaultWeightOnlyQuantizer.quantize_matmul``, the
same C++ kernels and the same MatMulNBits nodes) ourselves instead: each weight is read from the file torch wrote,
quantized, and its packed blocks and scales go straight to the bundle's weights file, so at most one weight is in
memory at a time. Activations stay float (the graph's dtype); MatMulNBits runs on ONNX Runtime CPU and CUDA.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from .onnx_io import WeightsFile

BITS = {"int8": 8, "int4": 4}
# ONNX Runtime GenAI's defaults for its int4 models: 32-element blocks, symmetric, int8 compute on CPU.
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4


def quantize_decoder(model: onnx.ModelProto, source_dir: Path, weights: WeightsFile, precision: str,
                     progress=None) -> dict:
    """Replace every MatMul with a 2-D constant weight by MatMulNBits, writing its blocks to ``weights``.

    ``model`` is modified in place (external data not loaded; tensors torch wrote live in ``source_dir``). Returns
    the quantization record for the manifest."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    bits = BITS[precision]
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                          bits=bits)
    quantizer = DefaultWeightOnlyQuantizer(config)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    targets = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits
               and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].dims[0] >= BLOCK_SIZE]
    target_outputs = {n.output[0] for n in targets}
    new_nodes, replaced, done = [], {}, 0
    for node in list(graph.node):
        if node.output[0] not in target_outputs:
            new_nodes.append(node)
            continue
        weight = inits[node.input[1]]
        if weight.data_location == onnx.TensorProto.EXTERNAL:  # let the quantizer read torch's file directly
            for entry in weight.external_data:
                if entry.key == "location":
                    entry.value = str((Path(source_dir) / entry.value).resolve())
        before = len(graph.initializer)
        nodes = quantizer.quantize_matmul(node, [graph])
        for tensor in graph.initializer[before:]:  # packed blocks and scales: to the weights file now
            weights.add_tensor(tensor)
        new_nodes.extend(nodes)
        uses[weight.name] -= 1
        if uses[weight.name] == 0:
            replaced[weight.name] = weight
        done += 1
        if progress is not None and (done % 16 == 0 or done == len(targets)):
            progress(f"  quantized {done}/{len(targets)} weights to int{bits}")
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return {"method": "onnxruntime MatMulNBits (weight-only, block-wise, symmetric)", "bits": bits,
            "block_size": BLOCK_SIZE, "accuracy_level": ACCURACY_LEVEL, "matmuls": done}

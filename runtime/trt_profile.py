"""TensorRT optimisation profiles from the manifest: one definition that ``prune-build`` builds with (as trtexec
``--minShapes/--optShapes/--maxShapes`` strings or API profiles), the TensorRT decoder checks its engine against,
and ONNX Runtime's TensorRT provider takes (``trt_profile_*_shapes``, same string format as trtexec).

Decoder: S new tokens after P cached ones, C the model's context. One profile covers prefill (S up to C, P = 0) and
decode (S = 1, P up to C - 1); min and opt are decode shapes (opt at P = min(C - 1, 1024), where a decode step spends
its time), max is the maximum of both.
"""

from __future__ import annotations

from vlmprune.graph_io import DecoderNames, name_of

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def decoder_profile(spec: dict) -> Profile:
    c, h, dh, hid = spec["max_context"], spec["num_kv_heads"], spec["head_dim"], spec["hidden_size"]
    opt_p = min(c - 1, 1024)
    io = DecoderNames.of(spec)  # the names from the manifest

    def shapes(s: int, p: int, total: int, past: int) -> dict[str, Shape]:
        out = {io.inputs_embeds: (1, s, hid), io.attention_mask: (1, total)}
        if io.position_ids is not None:
            out[io.position_ids] = (3, 1, s) if io.position_rank == 3 else (1, s)
        out.update({name: (1, h, past, dh) for name in io.past})
        return out

    lo, opt, hi = shapes(1, 0, 1, 0), shapes(1, opt_p, opt_p + 1, opt_p), shapes(c, c - 1, c, c - 1)
    return {name: (lo[name], opt[name], hi[name]) for name in lo}


def text_encoder_profile(spec: dict) -> Profile:
    return {name_of(spec["inputs"], "input_ids", "text_encoder inputs"): ((1, 1), (1, 16), (1, spec["max_length"]))}


def shape_strings(profile: Profile) -> dict[str, str]:
    """``{"min": "name:1x2x3,...", "opt": ..., "max": ...}``: trtexec's and ONNX Runtime's TensorRT provider's format."""
    return {key: ",".join(f"{name}:{'x'.join(map(str, shapes[i]))}" for name, shapes in profile.items())
            for i, key in enumerate(("min", "opt", "max"))}


def covers(engine: Profile, needed: Profile) -> list[str]:
    """What ``needed`` asks of ``engine`` that it does not allow: one phrase per input (empty: covered)."""
    problems = []
    for name, (lo, _, hi) in needed.items():
        if name not in engine:
            problems.append(f"{name} is not an input of the engine")
            continue
        elo, _, ehi = engine[name]
        if len(elo) != len(lo) or any(a > b for a, b in zip(elo, lo)) or any(a < b for a, b in zip(ehi, hi)):
            problems.append(f"{name} allows {'x'.join(map(str, elo))}..{'x'.join(map(str, ehi))}, the manifest needs "
                            f"{'x'.join(map(str, lo))}..{'x'.join(map(str, hi))}")
    return problems

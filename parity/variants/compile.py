"""torch.compile (inductor) of the decoder layers, with ``epilogue_fusion`` on/off and
``emulate_precision_casts`` (vllm-omni PR #2277: epilogue fusion folded fp32->bf16 casts after
norms and RoPE; its fix was ``epilogue_fusion=False``).

``compile`` compiles each selected decoder layer's forward with inductor defaults; the argument
adds options joined by ``+``: ``no_epilogue`` (``epilogue_fusion=False``) and ``emulate``
(``emulate_precision_casts=True``, inductor rounds intermediates as eager would). Works on CPU
(inductor generates C++; needs a C++ compiler) and CUDA. Compiling is slow (seconds per layer on
CPU): keep runs short. Signature: small errors after norms/RoPE inside compiled regions.
"""

from __future__ import annotations


from parity.errors import BadInput
from parity.variants.base import Applied, Spec, Target, Variant

OPTIONS = {"no_epilogue": ("epilogue_fusion", False), "emulate": ("emulate_precision_casts", True), "default": None}


def inductor_options(arg: str | None) -> dict:
    """``no_epilogue+emulate`` -> {"epilogue_fusion": False, "emulate_precision_casts": True}."""
    options = {}
    for token in (arg or "default").split("+"):
        if token not in OPTIONS:
            raise BadInput(f"compile option '{token}' is not one of {', '.join(OPTIONS)} (join several with +)")
        if OPTIONS[token]:
            key, value = OPTIONS[token]
            options[key] = value
    return options


class Compile(Variant):
    name = "compile"
    summary = "torch.compile (inductor) of decoder layers; options no_epilogue, emulate (joined by +)"
    default_arg = "default"

    def check(self, spec: Spec, engine: str | None = None) -> Spec:
        inductor_options(spec.arg)
        return super().check(spec, engine)

    def apply(self, target: Target, spec: Spec, applied: Applied) -> None:
        import torch._dynamo

        options = inductor_options(spec.arg)
        # Every layer shares one code object: give dynamo room for a graph per layer and shape.
        config = torch._dynamo.config
        for key, value in (("cache_size_limit", 256), ("accumulated_cache_size_limit", 4096)):
            old = getattr(config, key)
            setattr(config, key, max(old, value))
            applied.add(lambda _k=key, _o=old: setattr(config, _k, _o))
        for _, _, layer in target.layers(spec.scope):
            compiled = torch.compile(layer.forward, backend="inductor", dynamic=True, options=options or None)
            applied.set_attr(layer, "forward", compiled)

"""Make tests/fixtures/rmt_official/: what the official RMT code computes, for the converter's tests.

The official code (https://github.com/qhfan/RMT at 32ea214, ``classfication_release/RMT.py``, the June 2024 code) is
run once, outside this repository, and is not copied into it. It imports timm, fvcore and einops only for helpers
the forward pass does not need, or for ``DropPath`` / ``trunc_normal_``: this script registers small stand-ins for
them in ``sys.modules`` (``DropPath`` is the identity, as in evaluation; ``trunc_normal_`` is torch's), so that it
runs without timm (whose torchvision import fails against the CPU torch of these machines).

    python scripts/make_rmt_fixture.py /path/to/qhfan-RMT/classfication_release/RMT.py

Writes ``tiny.safetensors`` (a reduced config's random state dict under ``state.``, an input ``pixel_values`` and
the official model's ``logits``, all float32) and ``keys.json`` (every state-dict key and shape of the full
RMT_T3, RMT_S, RMT_M2 and RMT_L6).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "rmt_official"
# the reduced config: RMT-T's layout (MaSAD in stages 1-2, MaSA in 3-4) with layer scale in stages 3-4 as in B/L
TINY = dict(
    embed_dims=[16, 32, 48, 64],
    depths=[1, 2, 2, 1],
    num_heads=[2, 2, 4, 4],
    init_values=[2, 2, 2, 2],
    heads_ranges=[4, 4, 6, 6],
    mlp_ratios=[3, 3, 3, 3],
    chunkwise_recurrents=[True, True, False, False],
    layerscales=[False, False, True, True],
    projection=96,
    num_classes=10,
    drop_path_rate=0.0,
)


def _stub_modules() -> None:
    """Stand-ins for the few names the official module imports from timm, fvcore and einops."""

    class DropPath(nn.Identity):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__()

    def module(name: str, **attrs) -> None:
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__dict__.update(attrs)

    module("timm")
    module("timm.models")
    module(
        "timm.models.layers",
        DropPath=DropPath,
        to_2tuple=lambda x: (x, x),
        trunc_normal_=lambda t, std=1.0: nn.init.trunc_normal_(t, std=std),
    )
    module("timm.models.vision_transformer", VisionTransformer=object, _cfg=lambda **kw: kw)
    module("timm.models.registry", register_model=lambda f: f)
    module("fvcore")
    module("fvcore.nn", FlopCountAnalysis=None, flop_count_table=None)
    module("einops", einsum=None)


def main(official: str) -> None:
    _stub_modules()
    spec = importlib.util.spec_from_file_location("rmt_official", official)
    rmt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rmt)

    torch.manual_seed(0)
    model = rmt.VisRetNet(**TINY)
    # random values everywhere (LayerNorm, BatchNorm statistics, layer scales), so no mapping error hides behind 0 or 1
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not name.endswith(("angle", "decay")):
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t) * 0.2)
    model.eval()
    pixel_values = torch.randn(2, 3, 72, 88)  # not square: 18 x 22, 9 x 11, 5 x 6, 3 x 3 grids
    with torch.no_grad():
        logits = model(pixel_values)
    tensors = {f"state.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors | {"pixel_values": pixel_values, "logits": logits}, OUT / "tiny.safetensors")

    keys = {}
    for name in ("RMT_T3", "RMT_S", "RMT_M2", "RMT_L6"):
        full = getattr(rmt, name)(None)  # on the CPU: the official code calls .item() while building
        keys[name] = {k: list(v.shape) for k, v in full.state_dict().items()}
    (OUT / "keys.json").write_text(json.dumps(keys, indent=0) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])

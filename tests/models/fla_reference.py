"""Run flash-linear-attention's own RetNet on the CPU (Triton's interpreter): what tests/models/test_convert.py
compares the converted model with. Run as a script, in its own process, because TRITON_INTERPRET must be set
before triton compiles fla's kernels:

    TRITON_INTERPRET=1 python tests/models/fla_reference.py OUT_DIR '{"fuse_norm": true}'

Writes OUT_DIR/model (save_pretrained of a randomly initialized fla RetNetForCausalLM) and OUT_DIR/reference.pt:
the prompts, fla's logits for each and its greedy continuation. fla runs its fused recurrent kernel for prompts of
up to 64 tokens and its parallel kernel beyond.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton.runtime.autotuner as autotuner

# the interpreter has no device to time configurations on: take the first one
autotuner.Autotuner._bench = lambda self, *args, config=None, **kwargs: [0.0, 0.0, 0.0]

from fla.models import RetNetConfig, RetNetForCausalLM  # noqa: E402

LENGTHS = (1, 9, 40, 80)
VOCAB = 101


def main(out: Path, options: dict) -> None:
    torch.manual_seed(0)
    fields = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, vocab_size=VOCAB, attn_mode="parallel")
    config = RetNetConfig(**fields, fuse_cross_entropy=False, **options)
    model = RetNetForCausalLM(config).float().eval()
    with torch.no_grad():  # weights of a trained model's scale, and head-norm weights other than 1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out / "model")
    prompts = [torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(n)) for n in LENGTHS]
    with torch.no_grad():
        logits = [model(p, use_cache=False).logits for p in prompts]
        tokens = prompts[1]
        for _ in range(8):  # greedy, each step a full forward of the prefix
            nxt = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
    torch.save({"prompts": prompts, "logits": logits, "greedy": tokens}, out / "reference.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))

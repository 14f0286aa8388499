"""Sample generations of a model for fixed prompts and seeds, as markdown (for docs/MODEL.md).

    python scripts/generate_samples.py                       # the default model of `mcserve serve`
    python scripts/generate_samples.py --model runs/ssc/model --max-tokens 120

Runs the offline engine (`mcserve.server.engine.llm.LLM`, CPU by default): the same scheduler, prefill,
decode and sampler as the server.
"""

from __future__ import annotations

import argparse
import sys

from mcserve.server.engine.llm import LLM
from mcserve.server.engine.sampling_params import SamplingParams

PROMPTS = (
    "It is a truth universally acknowledged that",
    "The history of the city begins",
    "She opened the letter and read",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: the shipped default model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    args = ap.parse_args(argv)
    model_dir = args.model
    if model_dir is None:
        from mcserve.server.model.default import default_model_dir

        model_dir = default_model_dir()
    llm = LLM(model_dir, device=args.device)
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed + i, repetition_penalty=1.1)
        text = llm.generate([prompt], params)[0].outputs[0].text
        quoted = "\n".join("> " + line for line in (prompt + text).splitlines())
        print(f"**Prompt {i + 1}** (seed {args.seed + i}): *{prompt}*\n\n{quoted}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

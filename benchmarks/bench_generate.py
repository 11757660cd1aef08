"""Generation throughput on CPU: ``streamssm.generate`` vs transformers' ``generate``, same weights.

    python benchmarks/bench_generate.py [--samples 1,64] [--new 64] [--d-model 256] [--layers 4]

A random transformers ``MambaForCausalLM`` (vocab 256) is saved to a temporary folder and
imported with ``streamssm.hf_import``; both then sample ``--new`` tokens after a 32-token prompt
(temperature 1, top-k 50) for each sample count. Tokens/s = samples * new tokens / wall time
(best of 3, one warm-up). Ratio > 1 means we are faster.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
import transformers

from streamssm.generate import SamplingConfig, generate
from streamssm.hf_import import import_pretrained

PROMPT_LEN, VOCAB, TOP_K = 32, 256, 50


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="1,64")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=args.d_model, num_hidden_layers=args.layers, state_size=16)).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = import_pretrained(folder).model
    prompt = torch.randint(0, VOCAB, (PROMPT_LEN,))
    sampling = SamplingConfig(temperature=1.0, top_k=TOP_K)
    print(f"CPU threads {torch.get_num_threads()}, d_model {args.d_model}, layers {args.layers}, "
          f"prompt {PROMPT_LEN}, new tokens {args.new}, transformers {transformers.__version__}")
    print(f"{'samples':>8} {'ours tok/s':>12} {'transformers tok/s':>19} {'ratio':>7}")
    for n in (int(s) for s in args.samples.split(",")):
        t_ours = best_seconds(lambda n=n: generate(ours, prompt, args.new, samples=n, sampling=sampling, seed=0))

        def hf_run(n=n):
            with torch.no_grad():
                return hf.generate(prompt[None].expand(n, -1), do_sample=True, top_k=TOP_K, temperature=1.0,
                                   max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0)

        t_hf = best_seconds(hf_run)
        tokens = n * args.new
        print(f"{n:>8} {tokens / t_ours:>12.0f} {tokens / t_hf:>19.0f} {t_hf / t_ours:>7.2f}")


if __name__ == "__main__":
    main()

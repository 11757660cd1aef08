"""Generation throughput: ``streamssm.generate`` (model level), ``generate_streams`` (through a
Streamer) and transformers' ``generate``, same weights, same device.

    python benchmarks/bench_generate.py [--samples 1,64] [--new 64] [--d-model 256] [--layers 4] [--device cpu|cuda] [--threads N]

A random transformers ``MambaForCausalLM`` (vocab 256) is saved to a temporary folder and
imported with ``streamssm.hf_import``; all three then sample ``--new`` tokens after a 32-token
prompt (temperature 1, top-k 50) for each sample count. Tokens/s = samples * new tokens / wall
time (best of 3, one warm-up; CUDA synchronized). Ratio = transformers time / model-level time
(> 1: we are faster). Without mamba-ssm's kernels transformers runs its PyTorch path.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
import transformers

from streamssm.generate import SamplingConfig, generate, generate_streams
from streamssm.hf_import import import_pretrained
from streamssm.inference import Streamer

PROMPT_LEN, VOCAB, TOP_K = 32, 256, 50


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="1,64")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU intra-op threads (0: torch's default); 1 is steadier on a shared machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    counts = [int(s) for s in args.samples.split(",")]
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=args.d_model, num_hidden_layers=args.layers, state_size=16)).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = import_pretrained(folder).model.to(device)
    hf.to(device)
    streamer = Streamer(ours, capacity=max(counts), device=device)
    prompt = torch.randint(0, VOCAB, (PROMPT_LEN,), device=device)
    sampling = SamplingConfig(temperature=1.0, top_k=TOP_K)
    threads = f"CPU threads {torch.get_num_threads()}" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{threads}, d_model {args.d_model}, layers {args.layers}, prompt {PROMPT_LEN}, new tokens {args.new}, "
          f"transformers {transformers.__version__}")
    print(f"{'samples':>8} {'ours tok/s':>12} {'Streamer tok/s':>15} {'transformers tok/s':>19} {'ratio':>7}")
    for n in counts:
        t_ours = best_seconds(lambda n=n: generate(ours, prompt, args.new, samples=n, sampling=sampling, seed=0), device)
        t_streams = best_seconds(lambda n=n: generate_streams(streamer, [prompt] * n, args.new, sampling, seed=0), device)

        def hf_run(n=n):
            with torch.no_grad():
                return hf.generate(prompt[None].expand(n, -1), do_sample=True, top_k=TOP_K, temperature=1.0,
                                   max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0,
                                   attention_mask=torch.ones(n, PROMPT_LEN, dtype=torch.long, device=device))

        t_hf = best_seconds(hf_run, device)
        tokens = n * args.new
        print(f"{n:>8} {tokens / t_ours:>12.0f} {tokens / t_streams:>15.0f} {tokens / t_hf:>19.0f} {t_hf / t_ours:>7.2f}")

if __name__ == "__main__":
    main()

"""The embedding figures of a GPU in one prepared run: under 5 minutes, nothing downloaded.

    .venv/bin/python bench/gpu.py                        # a machine with a CUDA GPU (bf16)
    .venv/bin/python bench/gpu.py --device cpu --quick   # the same code on CPU, small (a test runs it)

Prints one line per figure, then a markdown table for docs/benchmarks.md:

  peak    the best matmul FLOP/s of the device, measured here (bf16 on a GPU, float32 on CPU)
  mfu     BERT-base's shape (bert-base-uncased's config; random weights, which MFU does not depend on),
          forward passes over batches of 256-token texts: model FLOP/s ÷ the peak (goal on an H200: >= 0.35;
          published: eager PyTorch 0.33 on an A100, TensorRT 0.57)
  stream  the embedding step as userlens runs it (Encoder.encode_stream: a pool of tokenizer threads a few
          batches ahead of the model, length-sorted token-budgeted micro-batches, bf16 on a GPU) with MiniLM
          on synthetic user texts: texts/s, tokens/s, padding waste (goal < 10% of the tokens computed) and
          the share of the wall time the device spent in the model (goal >= 0.9)
  st      sentence-transformers' encode on the same texts, device and dtype (its length sort, batch 128):
          userlens texts/s ÷ sentence-transformers texts/s (goal >= 1.0)

Exit status 0 when every figure was measured (the goals are printed, not enforced: a CPU cannot meet a
GPU's goals).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from userlens.models.encoder import EncodeStats, forward_flops, load_encoder  # noqa: E402

WORDS = (
    "trail runner tent waterproof jacket dog food puppy bed gift dad headphones noise cancelling tablet webcam "
    "robot kit plush bear grain free stainless bottle yoga mat espresso grinder novel thriller cookbook lamp "
    "desk chair monitor keyboard lipstick serum moisturizer shampoo sneakers backpack lantern stove"
).split()
CATEGORIES = ("outdoor", "pets", "electronics", "toys", "books", "beauty", "home", "grocery")


def user_texts(n: int, seed: int = 7) -> list[str]:
    """``n`` texts shaped like userlens' user texts (a header, then dated event lines), 20 to 300+ tokens."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        events = rng.choice((1, 2, 4, 8, 15, 25, 40, 60))
        lines = []
        for day in range(max(1, events // 3)):
            parts = []
            for _ in range(rng.randint(1, 3)):
                title = " ".join(rng.choice(WORDS).title() for _ in range(rng.randint(2, 4)))
                kind = rng.choice(("viewed", "clicked", "added to cart", "bought 1"))
                parts.append(f"{kind} '{title}' ({rng.choice(CATEGORIES)}, {rng.uniform(3, 300):.2f})")
            lines.append(f"2026-10-{28 - day:02d}: " + "; ".join(parts))
        header = (
            f"{events} events on {len(lines)} active days, 2026-10-{29 - len(lines):02d} to 2026-10-28. "
            f"views {events}, purchases {events // 5}. Top categories: {', '.join(rng.sample(CATEGORIES, 2))}."
        )
        texts.append("\n".join([header, *lines]))
    return texts


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def matmul_peak(device: str, dtype, seconds: float) -> float:
    """The best matmul FLOP/s over ``seconds`` of repeated square products."""
    import torch

    n = 8192 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        best = max(best, 2 * n**3 / timed(lambda: torch.mm(a, b), device))
    return best


def bert_base_mfu(device: str, dtype, peak: float, batch: int, seconds: float) -> tuple[float, float]:
    """(model FLOP/s, MFU) of BERT-base forward passes over ``batch`` x 256 tokens."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig()  # bert-base-uncased: 12 layers, 768 wide, 12 heads, 3072 feed-forward
    if not device.startswith("cuda") and batch <= 2:  # --quick on CPU: the code path, not the figure
        config.num_hidden_layers = 2
    model = BertModel(config, add_pooling_layer=False).to(device=device, dtype=dtype).eval()
    ids = torch.randint(1000, config.vocab_size, (batch, 256), device=device)
    mask = torch.ones_like(ids)
    flops = forward_flops([256] * batch, config.num_hidden_layers, config.hidden_size, config.intermediate_size)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)  # warm-up (kernels, allocator)
        best, deadline, runs = 0.0, time.perf_counter() + seconds, 0
        while runs < 2 or time.perf_counter() < deadline:
            best = max(best, flops / timed(lambda: model(input_ids=ids, attention_mask=mask), device))
            runs += 1
    return best, best / peak


def stream_figures(texts: list[str], device: str, batch_rows: int, threads: int) -> tuple[EncodeStats, object]:
    """userlens' embedding step over ``texts`` in Arrow-sized batches; (its stats, the vectors)."""
    import numpy as np

    encoder = load_encoder("builtin:minilm", device=device)
    warm = [(0, texts[:batch_rows])]
    list(encoder.encode_stream(iter(warm)))  # kernels, allocator and the tokenizer warmed up
    batches = [(i, texts[i : i + batch_rows]) for i in range(0, len(texts), batch_rows)]
    stats = EncodeStats()
    vectors = np.concatenate(
        [v for _, v in encoder.encode_stream(iter(batches), prefetch=4, threads=threads, stats=stats)]
    )
    return stats, vectors


def sentence_transformers_rate(texts: list[str], device: str, dtype) -> tuple[float, object]:
    """(texts/s, vectors) of sentence-transformers' encode on the same model, device and dtype."""
    import torch
    from sentence_transformers import SentenceTransformer

    from userlens.models.encoder import describe_model

    path = str(describe_model("builtin:minilm").path)
    model = SentenceTransformer(path, device=device, model_kwargs={"torch_dtype": dtype})
    model.encode(texts[:128], batch_size=128, normalize_embeddings=True)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        vectors = model.encode(texts, batch_size=128, normalize_embeddings=True)
    synchronize(device)
    return len(texts) / (time.perf_counter() - start), vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes: a check that the script works")
    parser.add_argument("--texts", type=int, default=None, help="texts for the stream figures (default 50,000)")
    args = parser.parse_args()

    import numpy as np
    import torch

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here; run it with --device cpu --quick to check the script")
    gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    n_texts = args.texts or (200 if args.quick else 50_000)
    seconds = 0.5 if args.quick else 3.0
    name = (
        torch.cuda.get_device_name(device)
        if gpu
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    started = time.perf_counter()
    print(f"device: {name}; dtype {str(dtype).removeprefix('torch.')}; torch {torch.__version__}", flush=True)

    peak = matmul_peak(device, dtype, seconds)
    print(f"peak: {peak / 1e12:.2f} TFLOP/s ({str(dtype).removeprefix('torch.')} matmul)", flush=True)

    achieved, mfu = bert_base_mfu(device, dtype, peak, 2 if args.quick else 128, seconds)
    print(
        f"mfu: BERT-base at 256 tokens {achieved / 1e12:.2f} TFLOP/s = {mfu:.3f} of the peak (goal >= 0.35 on an H200)"
    )

    texts = user_texts(n_texts)
    threads = max(1, (os.cpu_count() or 2) - 1) if gpu else 1
    stats, ours = stream_figures(texts, device, 32 if args.quick else 1024, threads)
    print(
        f"stream: MiniLM {stats.texts:,d} texts, {stats.texts / stats.wall_seconds:,.0f} texts/s, "
        f"{stats.tokens / stats.wall_seconds:,.0f} tokens/s; padding {stats.padding_waste:.1%} of the tokens "
        f"computed (goal < 10%); device busy {stats.busy:.2f} of the wall time (goal >= 0.9); {threads} tokenizer "
        f"thread(s)",
        flush=True,
    )

    st_rate, reference = sentence_transformers_rate(texts, device, dtype)
    ratio = (stats.texts / stats.wall_seconds) / st_rate
    cosine = float(np.min(np.sum(np.asarray(ours) * np.asarray(reference), axis=1)))
    print(
        f"st: sentence-transformers {st_rate:,.0f} texts/s; userlens ÷ sentence-transformers {ratio:.2f} "
        f"(goal >= 1.0); min cosine {cosine:.5f}"
    )

    print(f"\n{name}, {n_texts:,d} texts, {time.perf_counter() - started:.0f} s in all\n")
    print("| figure | value | goal |")
    print("|---|---:|---|")
    print(f"| matmul peak ({str(dtype).removeprefix('torch.')}) | {peak / 1e12:.2f} TFLOP/s | |")
    print(f"| BERT-base MFU at 256 tokens | {mfu:.3f} | >= 0.35 on an H200 |")
    print(f"| MiniLM texts/s (userlens) | {stats.texts / stats.wall_seconds:,.0f} | |")
    print(f"| MiniLM tokens/s (userlens) | {stats.tokens / stats.wall_seconds:,.0f} | |")
    print(f"| padding waste | {stats.padding_waste:.1%} | < 10% |")
    print(f"| device busy | {stats.busy:.2f} | >= 0.9 |")
    print(f"| userlens ÷ sentence-transformers texts/s | {ratio:.2f} | >= 1.0 |")


if __name__ == "__main__":
    main()

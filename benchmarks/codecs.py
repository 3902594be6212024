"""What the payload codecs cost and save: bytes, error against block size, encode time vs exchange.

    python benchmarks/codecs.py                       # 100M parameters, 2 gloo ranks
    python benchmarks/codecs.py --millions 10 --repeats 3

1. Bytes per worker per round against ``native`` fp32 (a sparse round's message
   to one peer, fp64 header included).
2. Relative error ``||D(Q(v)) - v|| / ||v||`` of each codec, and of ``int8``
   against its block size, on real tensors: the tiny LLaMA's weights (what the
   ``proposal`` form encodes) and its pseudo-gradient over 30 AdamW steps on
   pydocs (what the ``pseudo_gradient`` form encodes).
3. Encode + decode time for ``--millions`` parameters, against the time the
   smaller message saves: measured between 2 gloo ranks on this machine, and
   computed for 1 Gbit/s and 100 Mbit/s links.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from common import command, machine, median_ms, spawn, table, timed
from hf_gasloc.wire.codec import BlockInt8Codec, make_codec
from training import DATA_HELP, ROOT, TINY_LLAMA, DataOrder, new_model, prepare_data

CODECS = ("bf16", "fp16", "int8")


def _real_tensors(source: str) -> dict[str, torch.Tensor]:
    """The tiny LLaMA's weights after 60 steps, and its pseudo-gradient over the next 30."""
    data = torch.load(prepare_data(ROOT / "outputs" / "codecs", 64, source), weights_only=True)
    order = DataOrder(data["train"], 8, 0, 1)
    model = new_model(TINY_LLAMA, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)

    def flat() -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    for step in range(90):
        if step == 60:
            anchor = flat()
        batch = order.batch(step)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"weights (proposal)": anchor, "pseudo-gradient over 30 steps": anchor - flat()}


def _error(codec, values: torch.Tensor) -> float:
    wire = torch.empty(codec.wire_bytes(values.numel()), dtype=torch.uint8)
    codec.encode_(values, wire)
    decoded = torch.empty_like(values)
    codec.decode_(wire, decoded)
    return float((decoded - values).norm() / values.norm())


def _exchange(rank, world_size, sizes, repeats):
    results = {}
    for name, size in sizes.items():
        sent = torch.zeros(size, dtype=torch.uint8)
        received = torch.empty_like(sent)

        def swap() -> None:
            ops = [dist.P2POp(dist.isend, sent, 1 - rank), dist.P2POp(dist.irecv, received, 1 - rank)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

        swap()
        results[name] = median_ms(timed(swap, repeats)) / 1000
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--millions", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", default="embedded", help=DATA_HELP)
    args = parser.parse_args()
    numel = args.millions * 1_000_000
    header = (4 + 4) * 8  # round, health, layout (2), lost flags of 4 workers
    native = 4 * numel + header
    print(f"Command: `{command()}`\nMachine: {machine()}\n")

    rows = [["native (fp32)", f"{native / 1e6:.1f}", "1.000x"]]
    for name in CODECS:
        size = make_codec(name).wire_bytes(numel) + header
        rows.append([name, f"{size / 1e6:.1f}", f"{size / native:.3f}x"])
    print(f"1. Bytes per worker per round and peer, {args.millions}M parameters:\n")
    print(table(["payload", "MB", "vs native fp32"], rows))

    weights, pseudo = _real_tensors(args.data).values()
    ratio = float(weights.norm() / pseudo.norm())

    def errors(codec) -> list[str]:
        on_weights, on_pseudo = _error(codec, weights), _error(codec, pseudo)
        return [f"{on_weights:.2e}", f"{on_pseudo:.2e}", f"{on_weights * ratio:.2e}"]

    rows = [[name] + errors(make_codec(name)) for name in CODECS]
    for block in (16, 32, 64, 128, 256, 1024):
        codec = BlockInt8Codec(block)
        rows.append([f"int8, block {block} ({codec.bytes_per_parameter / 4:.3f}x)"]
                    + errors(codec))
    print("\n2. Relative error ||D(Q(v)) - v|| / ||v|| on the tiny LLaMA "
          f"({weights.numel() / 1e6:.2f}M parameters, pydocs); the last column is the error "
          "of encoding the weights measured against the round's progress (the pseudo-gradient, "
          f"{ratio:.0f}x smaller than the weights):\n")
    print(table(["codec", "weights (proposal)", "pseudo-gradient over 30 steps",
                 "weights' error / ||pseudo-gradient||"], rows))

    values = torch.randn(numel) * 0.02
    sizes = {"native (fp32)": 4 * numel}
    rows = []
    for name in CODECS:
        codec = make_codec(name)
        wire = torch.empty(codec.wire_bytes(numel), dtype=torch.uint8)
        decoded = torch.empty_like(values)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            codec.encode_(values, wire)
            codec.decode_(wire, decoded)
            times.append(time.perf_counter() - start)
        sizes[name] = wire.numel()
        rows.append([name, statistics.median(times)])
    exchange = spawn(_exchange, 2, sizes, args.repeats)[0]
    table_rows = []
    for name, seconds in rows:
        saved_bytes = sizes["native (fp32)"] - sizes[name]
        table_rows.append([
            name, f"{seconds * 1000:.0f}",
            f"{exchange['native (fp32)'] * 1000:.0f} -> {exchange[name] * 1000:.0f}",
            f"{saved_bytes * 8 / 1e9 * 1000:.0f}", f"{saved_bytes * 8 / 1e8:.1f} s"])
    print(f"\n3. Codec time against the exchange time it saves, {args.millions}M parameters "
          f"(torch threads: {torch.get_num_threads()}), medians of {args.repeats}:\n")
    print(table(["codec", "encode + decode ms", "exchange ms here, fp32 -> codec",
                 "saved at 1 Gbit/s, ms", "saved at 100 Mbit/s"], table_rows))


if __name__ == "__main__":
    main()

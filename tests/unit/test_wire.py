"""What travels and how it mixes: headers, the two mixing steps, codecs with error feedback,
and the bytes each exchange counts."""

import torch

from hf_gasloc import GASLoC
from hf_gasloc.state.flat import FlatModel
from hf_gasloc.wire import Header, NativeWire
from hf_gasloc.wire.header import layout_of
from hf_gasloc.wire.codec import make_codec
from hf_gasloc.wire.encoded import CodecWire

from ..fake_fabric import run_workers
from ..workers import TinyNet, flat, local_step


def test_a_header_round_trips_through_its_tensor_and_a_forged_one_is_malformed():
    nan = float("nan")  # links, step times (nan: not measured), the rounds they were measured in
    table = torch.tensor([0.5, nan, 3.0, 4.0, 2.0, -1.0], dtype=torch.float64)
    layout = layout_of([torch.zeros(10), torch.zeros(3, dtype=torch.bfloat16)], "native")
    header = Header(12, False, layout, [False, True], table)
    back = Header.from_tensor(header.to_tensor(), world_size=2)
    assert (back.round_index, back.healthy, back.layout, back.lost) == (12, False, layout,
                                                                         [False, True])
    assert layout[0] == 46 and torch.equal(back.table.nan_to_num(), table.nan_to_num())
    assert Header.from_tensor(Header(3, True, layout, [False] * 3).to_tensor(), 3).table.numel() == 0
    assert Header.malformed(header.to_tensor(), 2) is None
    forged = header.to_tensor()
    forged[5] = 0.5
    assert "flags are not 0 or 1" in Header.malformed(forged, 2)
    for position, value, why in ((0, float("inf"), "round or size"),
                                 (2, float("nan"), "round or size"),
                                 (6, float("inf"), "times are negative or infinite"),
                                 (7, -2.0, "times are negative or infinite"),
                                 (10, 1.5, "stamps are not whole numbers")):
        forged = header.to_tensor()
        forged[position] = value
        assert why in Header.malformed(forged, 2), (position, value)
    short = Header(12, False, layout, [False, True], table[:4]).to_tensor()
    assert "table has 4 values, not 6" in Header.malformed(short, 2)
    assert layout != layout_of([torch.zeros(10), torch.zeros(3)], "native")
    assert layout != layout_of([torch.zeros(10), torch.zeros(3, dtype=torch.bfloat16)], "int8")


def _wire_of(values: torch.Tensor):
    param = torch.nn.Parameter(values.clone())
    flat = FlatModel([param], anchor_on_cpu=False)
    flat.load_live()
    return flat


def test_mixing_adds_the_weighted_differences_and_averages_the_values():
    flat = _wire_of(torch.tensor([1.0, 2.0, 3.0]))
    wire = NativeWire(flat, torch.device("cpu"))
    messages = {4: [torch.tensor([3.0, 2.0, 1.0])], 6: [torch.tensor([1.0, 1.0, 1.0])]}
    distances = wire.differences(lambda peer: [m.clone() for m in messages[peer]], [4, 6])
    assert distances == {4: 8.0, 6: 5.0}
    wire.mix({4: 0.25, 6: 0.5})  # z + 1/4 (z_4 - z) + 1/2 (z_6 - z)
    assert torch.allclose(flat.works[0], torch.tensor([1.5, 1.5, 1.5]))
    norms = wire.values(lambda peer: [m.clone() for m in messages[peer]], [4, 6])
    assert norms == {4: 14.0, 6: 3.0}
    wire.average({4: 1.0, 6: 3.0})  # (1 z_4 + 3 z_6) / 4
    assert torch.allclose(flat.works[0], torch.tensor([1.5, 1.25, 1.0]))


def test_error_feedback_sends_later_what_encoding_lost():
    flat = _wire_of(torch.zeros(64))
    wire = CodecWire(flat, torch.device("cpu"), make_codec("int8"), "proposal")
    values = torch.linspace(-1, 1, 64) ** 3
    total_sent = torch.zeros(64, dtype=torch.float64)
    for rounds in range(1, 51):
        flat.works[0].copy_(values)
        wire.encode(healthy=True, eta=1.0)
        sent = torch.empty(64)
        wire.codec.decode_(wire.messages[0], sent)
        total_sent += sent
        # r = v + r - D(q) each round, so what is owed is what was not sent yet
        owed = rounds * values.double() - total_sent
        assert torch.allclose(wire.residuals[0].double(), owed, atol=1e-5)
    assert (total_sent / 50 - values).abs().max() < 1e-3
    wire.encode(healthy=False, eta=1.0)  # a non-finite proposal never leaves: zeros, r kept
    assert not wire.messages[0].any()


def _codec_round(rank, comm, payload, topology):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GASLoC(model, None, comm=comm, topology=topology, payload=payload,
                    outer_optimizer="sgd", outer_lr=1.0)
    local_step(model, inner, rank, 0)
    live = flat(model)
    engine.outer_step()
    return live, flat(model), engine.last_round.bytes_sent, engine


def test_codec_mixing_on_a_sparse_graph_keeps_the_workers_mean_exact():
    """Both ends of an edge use the decoded payloads ``D(q_j) - D(q_i)``: the terms cancel in
    the sum, so the mean of the new anchors is the mean of the proposals, whatever int8 loses."""
    results = run_workers(_codec_round, 4, "int8", "2peer")
    proposals = torch.stack([live for live, _, _, _ in results])
    anchors = torch.stack([new for _, new, _, _ in results])
    assert torch.allclose(anchors.mean(0), proposals.mean(0), atol=1e-6)
    assert not torch.allclose(anchors[0], anchors[1])  # the graph is sparse: workers differ


def test_bytes_are_counted_as_they_travel():
    numel = sum(p.numel() for p in TinyNet().parameters())
    header = (4 + 4) * 8  # fp64: round, health, layout (2), the lost flags of 4 ranks
    for payload, per_message in (("native", 4 * numel), ("int8", make_codec("int8").wire_bytes(numel))):
        for _, _, sent, _ in run_workers(_codec_round, 4, payload, "2peer"):
            assert sent == 2 * (header + per_message)  # two peers on a random ring
    n = 4
    for _, _, sent, _ in run_workers(_codec_round, n, "native", "complete"):
        assert sent == 2 * (n - 1) * 4 * numel // n  # a ring All-Reduce
    for _, _, sent, _ in run_workers(_codec_round, n, "bf16", "complete"):
        assert sent == (n - 1) * 2 * numel  # an all-gather of bf16 payloads

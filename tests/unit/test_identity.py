"""Every rank must be launched alike: differences are one error, before any step."""

import pytest

from hf_gasloc import GASLoC
from hf_gasloc.errors import RunMismatchError
from hf_gasloc.identity import check_resumable

from ..fake_fabric import run_workers
from ..workers import TinyNet


def _launch(rank, comm, settings_per_rank):
    try:
        GASLoC(TinyNet(), None, comm=comm, **settings_per_rank[rank])
    except RunMismatchError as error:
        return str(error)
    return None


@pytest.mark.parametrize("settings_per_rank,message", [
    ([{"outer_lr": 0.7}, {"outer_lr": 0.5}], r"outer_lr differs \(rank 0: 0.7, rank 1: 0.5\)"),
    ([{"seed": 1}, {"seed": 2}], "seed differs"),
    ([{"local_steps": [2, 3]}, {"local_steps": [3, 2]}], r"local_steps \(all ranks\) differs"),
    ([{"topology": "1peer"}, {"topology": "2peer"}], "topology differs"),
    ([{"payload": "int8", "fragments": 2}, {}], "payload differs .*\n.*fragments differs"),
])
def test_ranks_with_different_settings_fail_together_naming_each_difference(settings_per_rank,
                                                                            message):
    for error in run_workers(_launch, 2, settings_per_rank):
        assert error is not None and __import__("re").search(message, error), error


def test_a_checkpoint_must_match_the_run_it_resumes():
    ours = {"topology": "2peer", "seed": 0, "payload": "native", "fragments": 1,
            "parameters": [["torch.float32", 10]], "rank": 1, "world_size": 4}
    check_resumable(dict(ours, rank=0, world_size=3), ours, "ckpt", resized=True)
    with pytest.raises(RunMismatchError, match="ckpt was saved with world_size=3 but this run "
                                               "has world_size=4"):
        check_resumable(dict(ours, world_size=3), ours, "ckpt", resized=False)
    with pytest.raises(RunMismatchError, match="seed=5 .* it is a checkpoint of another run"):
        check_resumable(dict(ours, seed=5), ours, "ckpt", resized=True)

import re

import pytest
import torch

from vimbench.errors import InputError
from vimbench.commands.options import gpu_slots, local_target, parse_resolutions
from vimbench.measure.launchers import Plain


def test_ranges_lists_and_mixes():
    assert parse_resolutions("224..1248") == list(range(224, 1249, 64))
    assert parse_resolutions("224..1248")[-1] == 1248 and len(parse_resolutions("224..1248")) == 17
    assert parse_resolutions("512,640,738,1024,1248") == [512, 640, 738, 1024, 1248]
    assert parse_resolutions("224..480:128, 738,224") == [224, 352, 480, 738]
    assert parse_resolutions("300..310") == [300]


@pytest.mark.parametrize("spec,msg", [("1248..224", "runs backwards"), ("abc", "cannot read"),
                                      ("8", "smaller than the patch size"), ("0", "smaller"),
                                      ("224..448:0", "step"), ("", "empty"), ("224..", "cannot read")])
def test_bad_specs(spec, msg):
    with pytest.raises(InputError, match=msg):
        parse_resolutions(spec)


@pytest.fixture
def three_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)


def test_gpu_lists_become_slots_seen_as_cuda_0(three_gpus):
    assert local_target("cuda:all") == (torch.device("cuda:0"), Plain(("0", "1", "2")))
    assert local_target("cuda:2,cuda:0") == (torch.device("cuda:0"), Plain(("2", "0")))
    assert local_target("cuda:1") == (torch.device("cuda:1"), Plain())  # one GPU: as before, no pinning
    assert gpu_slots("cuda") == () and gpu_slots("cpu") == ()


@pytest.mark.parametrize("spec,msg", [("cuda:0,cuda:3", "no GPU cuda:3 (3 GPU(s) present)"),
                                      ("cuda:1,cuda:1", "named twice"), ("cuda:0,cpu", "'cpu' is not cuda:N")])
def test_bad_gpu_lists(three_gpus, spec, msg):
    with pytest.raises(InputError, match=re.escape(msg)):
        gpu_slots(spec)

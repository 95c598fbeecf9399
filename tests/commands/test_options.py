import pytest

from vimbench.errors import InputError
from vimbench.commands.options import parse_resolutions


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

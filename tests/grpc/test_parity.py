"""Property: any mix of TRAIN/EVAL calls over gRPC matches torch.nn.BatchNorm{1,2,3}d."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normserve.client import Client

MODULES = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    dims = draw(st.sampled_from([1, 2, 3]))
    rank = draw(st.sampled_from([2, 3])) if dims == 1 else dims + 2
    return {
        "dims": dims,
        "rank": rank,
        "channels": draw(st.integers(1, 6)),
        "momentum": draw(st.one_of(st.none(), st.floats(0.01, 1.0))),
        "affine": draw(st.booleans()),
        "track": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "modes": draw(st.lists(st.sampled_from(["train", "eval"]), min_size=200, max_size=200)),
    }


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sc=scenarios())
def test_200_mixed_calls_match_torch(client: Client, sc: dict) -> None:
    g = torch.Generator().manual_seed(sc["seed"])
    c = sc["channels"]
    ref = MODULES[sc["dims"]](
        c, momentum=sc["momentum"], affine=sc["affine"], track_running_stats=sc["track"]
    )
    kw = {}
    if sc["affine"]:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(c, generator=g) + 0.5)
            ref.bias.copy_(torch.randn(c, generator=g))
        kw = {"weight": ref.weight.detach(), "bias": ref.bias.detach()}
    sid = client.create_session(
        c, momentum=sc["momentum"], affine=sc["affine"], track_running_stats=sc["track"], **kw
    ).session_id
    for mode in sc["modes"]:
        spatial = torch.randint(1, 4, (sc["rank"] - 2,), generator=g).tolist()
        # Well-conditioned draws: at least 8 values per channel, so no channel's variance is tiny
        # next to eps (there float32 rounding, torch's included, exceeds 1e-5 for anyone).
        n = max(int(torch.randint(2, 6, (1,), generator=g)), -(-8 // math.prod(spatial)))
        x = torch.randn([n, c, *spatial], generator=g) * 2 + float(torch.randn(1, generator=g)) * 3
        ref.train(mode == "train")
        with torch.no_grad():
            expected = ref(x)
        got = client.normalize(sid, x, mode=mode).output
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if sc["track"]:
        info = client.get_session(sid)
        torch.testing.assert_close(info.running_mean, ref.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(info.running_var, ref.running_var, atol=1e-5, rtol=1e-5)
        assert info.num_batches_tracked == int(ref.num_batches_tracked)
    client.delete_session(sid)

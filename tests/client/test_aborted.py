"""ABORTED reaches the client as AbortedError with the server's reason, also when the client's
retries of it run into the call's deadline (a synchronized step a participant never reached)."""

from __future__ import annotations

import pytest
import torch

from normserve.client import AbortedError, Client, NormserveError


def test_a_missed_synchronized_step_is_aborted_with_its_reason(client: Client) -> None:
    sid = client.create_session(3, sync_participants=2, sync_timeout=0.5).session_id
    with pytest.raises(AbortedError) as err:
        # rank 1 never comes: every try is aborted after 0.5 s, and the retries end at the
        # call's deadline; what the user sees is the server's reason, not "deadline exceeded"
        client.normalize(sid, torch.randn(4, 3), sync=(0, 0), timeout=2.0)
    assert isinstance(err.value, NormserveError)
    assert "did not arrive within 0.5 seconds" in err.value.message, err.value.message
    with Client(client.target, retry=0) as once, pytest.raises(AbortedError) as err:
        once.normalize(sid, torch.randn(4, 3), sync=(0, 1), timeout=5.0)
    assert "did not arrive" in err.value.message

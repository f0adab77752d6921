"""Eight clients training one session at once: every call applied once, in version order."""

from __future__ import annotations

import threading

import torch

from normserve.client import Client
from normserve.server import Server


def test_eight_clients_one_session(server: Server) -> None:
    with Client(server.address) as admin:
        sid = admin.create_session(5, momentum=0.2).session_id
    applied: list[tuple[int, torch.Tensor]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        try:
            with Client(server.address) as client:
                for _ in range(20):
                    x = torch.randn(8, 5, 3, generator=g) * (1 + seed) + seed
                    r = client.normalize(sid, x)
                    with lock:
                        applied.append((r.version, x))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    versions = sorted(v for v, _ in applied)
    assert versions == list(range(2, 2 + 160))
    bn = torch.nn.BatchNorm1d(5, momentum=0.2)
    for _, x in sorted(applied, key=lambda a: a[0]):
        bn(x)
    with Client(server.address) as admin:
        info = admin.get_session(sid)
    assert info.num_batches_tracked == 160
    torch.testing.assert_close(info.running_mean, bn.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(info.running_var, bn.running_var, atol=1e-5, rtol=1e-5)

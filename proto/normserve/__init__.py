"""normserve: normalization as a service (batch-norm sessions over gRPC).

Public entry points: ``normserve.client`` (Python API, torch modules, CLI), ``normserve.server``
(``serve()``), ``normserve.v1`` (the generated gRPC contract).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]

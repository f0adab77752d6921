"""The README's Python example runs as written (against a test server)."""

from __future__ import annotations

from pathlib import Path

from normserve.server import Server

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example_runs(server: Server) -> None:
    section = README.read_text().split("## Ten lines of Python", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    exec(compile(code.replace("127.0.0.1:50051", server.address), "README.md", "exec"), {})

"""What the image weighs, and what each way of slimming it takes off: the figures in the README.

    python -m tests.container.size_report [--image normserve:ci]

Builds the image (from the cache when it is there), then prints its size and layers, and measures
in throwaway containers: (1) a plain install of torch and the dependencies on the base image, as
pip leaves it, and what each slimming option removes from it; (2) what the image keeps, and the
start-up cost of dropping all bytecode. Needs podman or docker and the network access the build
itself needs (pip, apt); pass PIP_INDEX_URL through the environment for a CPU torch from
PyTorch's CPU index.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib

from ._engine import IMAGE, ROOT, Engine, find_engine

# Each candidate: a name, then a shell expression printing the bytes it holds in a venv at $V
# whose site-packages is $S. The adopted ones are applied by the Dockerfile.
PLAIN_INSTALL_CANDIDATES = [
    (
        "bytecode (__pycache__), all of it",
        "find $V -name __pycache__ -prune -exec du -sbc {} + | tail -1",
    ),
    ("torch/include (C++ headers)", "du -sb $S/torch/include"),
    ("torch/test (C++ test programs)", "du -sb $S/torch/test"),
    (
        "torch/bin test programs and protoc",
        "du -sbc $S/torch/bin/test_* $S/torch/bin/*Test $S/torch/bin/protoc* | tail -1",
    ),
    (
        "tests/ folders of the other packages",
        "find $S \\( -path $S/torch -o -name '*.dist-info' \\) -prune -o -type d -name tests -prune -exec du -sbc {} + | tail -1",
    ),
    (
        "symbol tables of libtorch_cpu, libtorch_python, libc10 (strip)",
        "$V/bin/python /tmp/symtab.py $S/torch/lib/libtorch_cpu.so $S/torch/lib/libtorch_python.so $S/torch/lib/libc10.so",
    ),
    (
        "torch/lib test libraries (lib*test*.so, aoti/backend test ops)",
        "du -sbc $S/torch/lib/*test*.so $S/torch/lib/libaoti_custom_ops.so $S/torch/lib/libbackend_with_compiler.so | tail -1",
    ),
    ("pip itself", "du -sbc $S/pip $S/pip-*.dist-info | tail -1"),
    (
        "sympy, mpmath, networkx (torch's own dependencies)",
        "du -sbc $S/sympy $S/mpmath $S/networkx | tail -1",
    ),
    (
        "apt's package caches (*.bin) after apt-get update",
        "apt-get update -qq >/dev/null 2>&1 && du -sbc /var/cache/apt/*.bin | tail -1",
    ),
]

# Sizes of the ELF sections `strip --strip-unneeded` drops (.symtab, .strtab), read without binutils.
SYMTAB_PY = r"""
import struct, sys
total = 0
for path in sys.argv[1:]:
    b = open(path, 'rb').read()
    shoff, = struct.unpack_from('<Q', b, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', b, 0x3A)
    secs = [struct.unpack_from('<IIQQQQ', b, shoff + i * shentsize) for i in range(shnum)]
    names = secs[shstrndx][4]
    for name, _t, _f, _a, _o, size in secs:
        n = b[names + name: b.index(b'\0', names + name)]
        if n in (b'.symtab', b'.strtab'):
            total += size
print(total)
"""

IMAGE_PARTS = [
    (
        "image: bytecode in /opt/venv (what the server and client import, and pip's)",
        "find /opt/venv -name __pycache__ -prune -exec du -sbc {} + | tail -1",
    ),
    ("image: pip itself", "du -sbc $S/pip $S/pip-*.dist-info | tail -1"),
    ("image: torch", "du -sb $S/torch"),
    ("image: /opt/venv", "du -sb /opt/venv"),
]


def _run_sh(engine: Engine, image: str, script: str, timeout: float = 1200) -> str:
    env = (
        ["-e", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
        if "PIP_INDEX_URL" in os.environ
        else []
    )
    args = ["run", "--rm", "--no-healthcheck", "--user", "0", *env, "--entrypoint", "sh", image]
    return engine(*args, "-c", script, timeout=timeout).stdout


def _measure(candidates: list[tuple[str, str]]) -> str:
    lines = [f'echo "@@ {name} @@ $({expr} 2>/dev/null | cut -f1)"' for name, expr in candidates]
    return "\n".join(lines)


def _parse(out: str) -> list[tuple[str, int]]:
    found = re.findall(r"^@@ (.*) @@ (\d*)$", out, re.M)
    return [(name, int(n or 0)) for name, n in found]


def _mb(n: int) -> str:
    return f"{n / 1e6:8.1f} MB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default=IMAGE)
    ap.add_argument("--base", default="docker.io/library/python:3.11-slim")
    ap.add_argument("--torch", default="torch==2.13.0")
    args = ap.parse_args(argv)
    engine = find_engine()
    if engine is None:
        print("no container engine: install podman or docker", file=sys.stderr)
        return 1
    engine.build(ROOT, args.image)
    size, base = engine.size(args.image), engine.size(args.base)
    print(
        f"{args.image}: {_mb(size)}; {args.base}: {_mb(base)}; added by normserve: {_mb(size - base)}"
    )
    history = engine("history", "--format", "{{.Size}}\t{{.CreatedBy}}", args.image).stdout
    for line in history.splitlines():
        layer_size, _, created_by = line.partition("\t")
        if layer_size.strip() not in ("0 B", "0B"):
            print(f"  layer {layer_size:>10}  {created_by[:80]}")

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    quoted = " ".join(f"'{d}'" for d in [args.torch, *deps])
    plain = (
        f"cat > /tmp/symtab.py <<'EOF'\n{SYMTAB_PY}\nEOF\n"
        "V=/opt/plain; python3 -m venv $V >/dev/null\n"
        f"$V/bin/pip install -q --disable-pip-version-check {quoted} >/dev/null 2>&1 || exit 3\n"
        "S=$($V/bin/python -c \"import sysconfig; print(sysconfig.get_path('purelib'))\")\n"
        'echo "@@ plain install of torch and the dependencies @@ $(du -sb $V | cut -f1)"\n'
        + _measure(PLAIN_INSTALL_CANDIDATES)
    )
    print("\na plain install (pip's defaults) on the base image, and what each option removes:")
    for name, n in _parse(_run_sh(engine, args.base, plain)):
        print(f"  {_mb(n)}  {name}")

    in_image = (
        "S=$(python -c \"import sysconfig; print(sysconfig.get_path('purelib'))\")\n"
        + _measure(IMAGE_PARTS)
        + "\nt() { s=$(date +%s%N); python -c 'import normserve.server'; e=$(date +%s%N);"
        ' echo "@@ $1 @@ $(( (e - s) / 1000000 ))"; }\n'
        "t 'import normserve.server, ms (with the bytecode)'; t 'import normserve.server, ms (again)'\n"
        "find / -xdev -name __pycache__ -prune -exec rm -rf {} +\n"
        "t 'import normserve.server, ms (no bytecode at all)'; t 'import normserve.server, ms (again)'\n"
    )
    print(f"\nin {args.image}:")
    for name, n in _parse(_run_sh(engine, args.image, in_image)):
        print(f"  {n:11d}  {name}" if " ms " in name else f"  {_mb(n)}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

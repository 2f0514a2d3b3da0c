"""Generate the Python stubs from the .proto files: the one documented command.

    python -m protos.build          # (re)write protos/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py
    python -m protos.build --check  # exit 1 when the checked-in stubs differ from a fresh build

It runs grpc_tools.protoc with the repository root as the include path, so the generated code
imports its siblings as `from protos import worker_pb2`. The generated files are checked in (the
package works without grpcio-tools installed) and never edited by hand; the check needs the same
grpcio-tools version as the one that wrote them (pinned in pyproject.toml), since its version is
stamped into the output.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ("specdec.proto", "worker.proto")


def generated_names() -> list[str]:
    names = []
    for proto in PROTOS:
        stem = proto.removesuffix(".proto")
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return names


def generate(out_root: Path) -> None:
    """Write the stubs under out_root/protos/."""
    from grpc_tools import protoc  # only needed to build, not to run

    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(ROOT / "protos" / p) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def check() -> list[str]:
    """Names of the checked-in stubs that are missing or differ from a fresh build."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "protos"
        return [
            name
            for name in generated_names()
            if not (ROOT / "protos" / name).is_file()
            or not filecmp.cmp(fresh / name, ROOT / "protos" / name, shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protos.build", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with a fresh build instead of writing"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = check()
        if stale:
            print(
                "protos: generated stubs are out of date: "
                + ", ".join(stale)
                + " (run `python -m protos.build`)",
                file=sys.stderr,
            )
            return 1
        print("protos: generated stubs are up to date")
        return 0
    generate(ROOT)
    print("protos: wrote " + ", ".join(f"protos/{n}" for n in generated_names()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

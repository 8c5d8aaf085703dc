"""Chain a bare venv to the project's `.venv`, with an unpacked library in front (`make test-mcore019`).

    python scripts/chain_venv.py .venv/mcore019 .venv

Writes one `.pth` file into the bare venv's site-packages: it puts `<bare>/site` (the unpacked wheel) first on
`sys.path`, then adds `.venv`'s site-packages as a site directory (so its own `.pth` files, the editable
install of opsd_megatron among them, are processed). Everything else, pytest and torchrun included, comes
from `.venv`; subprocesses started with `sys.executable` inherit the chain.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path


def site_packages(venv: Path) -> Path:
    """`<venv>/lib/pythonX.Y/site-packages` of the running interpreter's version."""

    rel = Path(sysconfig.get_path("purelib", vars={"base": "", "platbase": ""}).lstrip("/"))
    return venv / rel


def main(bare: str, base: str) -> None:
    bare_dir, base_dir = Path(bare).resolve(), Path(base).resolve()
    front, chained = bare_dir / "site", site_packages(base_dir)
    for path in (front, chained):
        if not path.is_dir():
            raise SystemExit(f"error: {path} is not a directory")
    target = site_packages(bare_dir)
    target.mkdir(parents=True, exist_ok=True)
    line = f"import sys, site; sys.path.insert(0, {str(front)!r}); site.addsitedir({str(chained)!r})\n"
    (target / "00-chain.pth").write_text(line)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: chain_venv.py BARE_VENV BASE_VENV")
    main(sys.argv[1], sys.argv[2])

"""Prints the shell commands of a walkthrough in the docs, so that CI runs exactly what a user
is told to run: the first ```sh block after the marker `<!-- walkthrough:NAME -->`.

    python3 hack/walkthrough.py docs/install.md kind | bash -euxo pipefail
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def commands(path: Path, name: str) -> str:
    text = path.read_text()
    marker = f"<!-- walkthrough:{name} -->"
    if marker not in text:
        raise SystemExit(f"{path}: no {marker}")
    block = re.search(r"```sh\n(.*?)```", text[text.index(marker) :], re.DOTALL)
    if block is None:
        raise SystemExit(f"{path}: no ```sh block after {marker}")
    return block.group(1)


if __name__ == "__main__":
    sys.stdout.write(commands(Path(sys.argv[1]), sys.argv[2]))

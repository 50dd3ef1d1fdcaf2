"""Print one of the two commands at the top of README.md, exactly as written, so CI runs what a newcomer runs.

    python .ci/readme_command.py pipeline    # the first line of the README's first ```bash block
    python .ci/readme_command.py tests       # the second

Fails (exit 2, one line) when the README no longer opens with such a block of exactly two commands, the first
ending in `pretrain` and the second in `python -m pytest`: CI must not quietly run something else.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
WHICH = {"pipeline": 0, "tests": 1}


def readme_commands(text: str) -> list[str]:
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    if block is None:
        raise ValueError("README.md has no ```bash block")
    lines = [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]
    # the trailing comment is the README's, not the command's
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in lines]
    if len(commands) != 2:
        raise ValueError(f"README.md's first ```bash block holds {len(commands)} commands; CI expects 2")
    if not commands[0].endswith("pretrain"):
        raise ValueError(f"README.md's first command does not end by running `pretrain`: {commands[0]!r}")
    if not commands[1].endswith("python -m pytest"):
        raise ValueError(f"README.md's second command does not end by running `python -m pytest`: {commands[1]!r}")
    return commands


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in WHICH:
        print(f"usage: python .ci/readme_command.py {{{'|'.join(WHICH)}}}", file=sys.stderr)
        return 2
    try:
        print(readme_commands(README.read_text())[WHICH[argv[0]]])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The std_ext command: Sparse-to-Dense decoding, vanilla vs StD, from the command line.

* ``demo``: SmolLM2-135M-Instruct answers a question about a long real document, with
  vanilla decoding and with Sparse-to-Dense; ``demo --video`` runs a small Qwen2-VL-shaped
  model on a synthetic video (see :mod:`std_ext.demo`).
* ``generate``: a local ``transformers`` video LLM checkpoint answers a question about a
  video given as frames (see :mod:`std_ext.cli_generate`).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import cli_generate, demo
    from ._cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="python -m std_ext", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,generate}")
    for name, module in (("demo", demo), ("generate", cli_generate)):
        sub = commands.add_parser(name, help=module.__doc__.strip().splitlines()[0], description=module.__doc__,
                                  formatter_class=HelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Run a document's Python blocks in order, in one namespace, like notebook cells.

argv: a JSON file holding [[label, source], ...]. A block with a top-level
``await`` runs as a coroutine inside a running asyncio loop (as IPython runs
a cell); any other block runs as plain statements. Exits non-zero on the
first block that raises.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import sys
import types


def main() -> None:
    blocks = json.loads(open(sys.argv[1]).read())
    ns: dict[str, object] = {"__name__": "__main__"}
    for label, source in blocks:
        print(f"--- {label}", flush=True)
        code = compile(source, label, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        if code.co_flags & inspect.CO_COROUTINE:
            result = types.FunctionType(code, ns)()

            async def cell(aw: object = result) -> None:
                await aw  # type: ignore[misc]

            asyncio.run(cell())
        else:
            exec(code, ns)


if __name__ == "__main__":
    main()

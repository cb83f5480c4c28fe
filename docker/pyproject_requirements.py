"""Print the requirements of fuseserve with the given extras, one per line, from pyproject.toml.

Used by the Dockerfiles to install the dependencies in a layer of their own, before the source is
copied, so that editing the code rebuilds only the last layer. Extras that name fuseserve itself
(``fuseserve[aligner]``) are followed; the project is not installed here.

    python pyproject_requirements.py /src/pyproject.toml aligner teacher
"""

import re
import sys
import tomllib


def requirements(project: dict, extras: list[str]) -> list[str]:
    name = project["name"]
    optional = project.get("optional-dependencies", {})
    out, seen, todo = list(project.get("dependencies", [])), set(), list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject.toml: no extra {extra!r} (have: {', '.join(optional)})")
        seen.add(extra)
        for req in optional[extra]:
            own = re.fullmatch(rf"{re.escape(name)}\[([\w,\s-]+)\]", req.strip())
            if own:
                todo.extend(e.strip() for e in own.group(1).split(","))
            else:
                out.append(req)
    return sorted(set(out))


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        project = tomllib.load(f)["project"]
    print("\n".join(requirements(project, sys.argv[2:])))

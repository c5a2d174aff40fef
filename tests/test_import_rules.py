"""The house's floors (docs/layout.md): every import in metaagent_ray goes down, never sideways or up."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "metaagent_ray"
LAYOUT = PACKAGE.parent / "docs" / "layout.md"


def floors() -> dict[str, int]:
    """Room -> floor, from the layout's table."""
    rooms = {}
    for number, modules in re.findall(r"^\| (\d+) \| ((?:`[\w.]+`(?:, )?)+) \|", LAYOUT.read_text(), flags=re.MULTILINE):
        for module in re.findall(r"`([\w.]+)`", modules):
            rooms[module] = int(number)
    return rooms


def exceptions() -> set[tuple[str, str]]:
    return set(re.findall(r"^- `([\w.]+)` → `([\w.]+)`:", LAYOUT.read_text(), flags=re.MULTILINE))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports(path: Path) -> set[str]:
    """The package's modules `path` imports, anywhere in it (functions too), as dotted names under the package."""
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            if node.module:
                found.add(".".join([*base, node.module]))
            else:
                found.update(".".join([*base, alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("metaagent_ray."):
            found.add(node.module.removeprefix("metaagent_ray."))  # type: ignore[union-attr]
    return {name for name in found if name}


def room(module: str, rooms: dict[str, int]) -> str | None:
    """The room a module belongs to: itself, or the package that holds it."""
    parts = module.split(".")
    return next((".".join(parts[:end]) for end in range(len(parts), 0, -1) if ".".join(parts[:end]) in rooms), None)


def test_every_module_stands_on_a_floor():
    rooms = floors()
    homeless = [module_name(path) for path in PACKAGE.rglob("*.py") if room(module_name(path), rooms) is None]
    assert not homeless, f"add these modules to the floors table in docs/layout.md: {homeless}"


def test_every_import_goes_down():
    rooms, allowed = floors(), exceptions()
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        home = room(module, rooms)
        for target in sorted(imports(path)):
            target_room = room(target, rooms)
            if target_room is None or target_room == home or (module, target_room) in allowed:
                continue
            if rooms[target_room] >= rooms[home]:  # type: ignore[index]
                broken.append(f"{module} (floor {rooms[home]}) imports {target} (floor {rooms[target_room]})")  # type: ignore[index]
    assert not broken, "imports that go sideways or up (docs/layout.md, 'Floors'):\n" + "\n".join(broken)


def test_the_reader_resolves_relative_imports():
    """What the rules are checked against: `from ...resources` three levels down, `from .executors` at the top."""
    assert "resources" in imports(PACKAGE / "llm" / "local" / "node.py")
    assert {"executors", "agents"} <= imports(PACKAGE / "hub.py")
    assert "llm.base" in imports(PACKAGE / "llm" / "__init__.py")

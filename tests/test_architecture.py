"""Protects the boundaries between the packages, by walking their imports (no code runs):

- the engine's core knows no model family: nothing it imports, directly or through other engine
  modules, is under engine/models/<family>/ (only the registry names families, by string);
- the harness uses only the engine's public API (`from engine import <name in engine.__all__>`), and
  only modeltest/backends/ uses the inference path (LLM, LLMEngine, SamplingParams, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import engine

REPO = Path(__file__).resolve().parent.parent
CORE = ["llm", "llm_engine", "config", "sampling", "sequence", "scheduler", "block_manager", "kv_sizing",
        "model_runner", "detokenizer", "loader", "device", "image_cache", "errors", "attention", "cuda_graphs"]  # fmt: skip
FAMILIES = [p.name for p in (REPO / "engine" / "models").iterdir() if p.is_dir() and (p / "__init__.py").exists()]
# what the harness may use outside its backends: nothing that runs a model
NOT_INFERENCE = {"EngineError", "DeviceError", "resolve_device", "write_random_checkpoint", "tiny_config", "to_rgb"}


def module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def imports(name: str) -> set[str]:
    """The modules a module imports (absolute names), read from its source."""
    path = module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.add(mod)
            found |= {f"{mod}.{alias.name}" for alias in node.names if module_file(f"{mod}.{alias.name}")}
    return found


def reachable(start: str) -> dict[str, str]:
    """Every engine module `start` imports, directly or not: {module: the module that imports it}."""
    seen, todo = {start: ""}, [start]
    while todo:
        current = todo.pop()
        for mod in imports(current):
            if mod.startswith("engine") and mod not in seen and module_file(mod):
                seen[mod] = current
                todo.append(mod)
    return seen


def core_modules() -> list[str]:
    out = []
    for name in CORE:
        path = REPO / "engine" / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
        for f in files:
            parts = f.relative_to(REPO).with_suffix("").parts
            out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_the_core_imports_no_model_family():
    assert "qwen_vl" in FAMILIES
    for module in core_modules():
        for mod, via in reachable(module).items():
            family = [f for f in FAMILIES if mod.startswith(f"engine.models.{f}")]
            assert not family, f"{module} reaches {mod} (imported by {via}): the core must not know a model family"


def test_the_walk_sees_a_family_import():
    """The walk itself: the family's own modules and engine.testing do reach engine.models.qwen_vl."""
    assert any(m.startswith("engine.models.qwen_vl.") for m in reachable("engine.testing"))
    assert "engine.models.qwen_vl.tokenizer" in reachable("engine.models.qwen_vl")


def test_the_harness_uses_only_the_engines_public_api():
    for path in sorted((REPO / "modeltest").rglob("*.py")):
        in_backends = "backends" in path.relative_to(REPO / "modeltest").parts
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name.startswith("engine")]
                assert not bad, f"{path}:{node.lineno}: import {bad[0]}: use `from engine import ...`"
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("engine"):
                assert node.module == "engine", f"{path}:{node.lineno}: {node.module} is the engine's inside"
                names = [a.name for a in node.names]
            for name in names:
                assert name in engine.__all__, f"{path}:{node.lineno}: {name} is not in engine.__all__"
                assert in_backends or name in NOT_INFERENCE, (
                    f"{path}:{node.lineno}: {name}: only modeltest/backends/ runs the engine"
                )

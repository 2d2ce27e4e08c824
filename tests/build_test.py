"""The root BUILD file lists every module and test, with its real internal deps."""

import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_build():
    """Evaluates BUILD (Starlark, a Python subset) with recording stubs."""
    targets = {}

    def rule(kind):
        def record(name, **kwargs):
            assert name not in targets, f"duplicate BUILD target {name}"
            targets[name] = dict(kwargs, kind=kind)

        return record

    with open(os.path.join(REPO, "BUILD")) as f:
        source = f.read()
    exec(
        compile(source, "BUILD", "exec"),  # noqa: S102 (trusted file of this repo)
        {
            "py_library": rule("py_library"),
            "py_test": rule("py_test"),
            "py_binary": rule("py_binary"),
            "load": lambda *a: None,
            "glob": lambda patterns: sorted(
                p for pattern in patterns for p in glob.glob(pattern, root_dir=REPO)
            ),
        },
    )
    return targets


def _internal_imports(path):
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("invp_tf", "tests.conftest"):
            if node.module == "invp_tf":
                found |= {alias.name for alias in node.names}
            else:
                found.add("conftest")
        elif isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
            found |= {f"benchmarks_{alias.name}" for alias in node.names}
    return found


def test_every_module_is_a_library_with_its_deps():
    targets = _load_build()
    modules = sorted(
        os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "invp_tf", "*.py"))
    )
    for module in modules:
        name = "invp_tf" if module == "__init__" else module
        assert name in targets, f"invp_tf/{module}.py has no py_library in BUILD"
        target = targets[name]
        assert target["kind"] == "py_library"
        assert target["srcs"] == [f"invp_tf/{module}.py"]
        internal = {d[1:] for d in target.get("deps", []) if d.startswith(":") and d[1:] in modules}
        assert internal == _internal_imports(os.path.join(REPO, "invp_tf", f"{module}.py")), (
            f"deps of :{name} in BUILD differ from its imports"
        )


def test_every_test_file_is_a_py_test():
    targets = _load_build()
    for path in glob.glob(os.path.join(REPO, "tests", "*_test.py")):
        name = os.path.basename(path)[:-3]
        assert name in targets, f"tests/{name}.py has no py_test in BUILD"
        assert targets[name]["kind"] == "py_test"
        assert targets[name]["srcs"] == [f"tests/{name}.py"]
        internal = {d[1:] for d in targets[name].get("deps", []) if not d.startswith(":pip_")}
        assert internal == _internal_imports(path), f"deps of py_test {name} differ from imports"


def test_every_target_points_at_an_existing_file():
    for name, target in _load_build().items():
        for src in target.get("srcs", []):
            assert os.path.exists(os.path.join(REPO, src)), f"{name}: {src} does not exist"

"""Regenerates BUILD from the imports of invp_tf/*.py and tests/*_test.py.

    python3 scripts/gen_build.py

tests/build_test.py fails when BUILD drifts from the imports; this script is how to fix it.
"""

import ast
import glob
import os

# Import name -> pip package, for the third-party modules the code imports.
PIP = {
    "PIL": "pillow",
    "absl": "absl-py",
    "keras": "keras",
    "matplotlib": "matplotlib",
    "numpy": "numpy",
    "pytest": "pytest",
    "scann": "scann",
    "scipy": "scipy",
    "tensorflow": "tensorflow",
    "tensorflow_datasets": "tensorflow-datasets",
    "tensorflow_hub": "tensorflow-hub",
    "tf_keras": "tf-keras",
}
# Tests that train, export or start processes: Bazel's "large" timeout.
LARGE_TESTS = (
    "analyze_test",
    "distribute_test",
    "embed_test",
    "evaluate_test",
    "export_test",
    "train_test",
)
# Files a library reads at run time: kernels.py compiles the C++ source next to it.
LIBRARY_DATA = {"kernels": '["invp_tf/top_mask.cc", "invp_tf/views.cc"]'}
TEST_DATA = {
    "configs_test": '["pytest.ini"] + glob(["configs/*.flags"])',
    "export_test": '["pytest.ini"] + glob(["export/*.json"])',
    "losses_test": '["pytest.ini", "tests/data/golden/authors_reference_case.npz"]',
    "memory_bank_test": '["pytest.ini", "tests/data/golden/authors_reference_case.npz"]',
}
# Imported only inside a subprocess (TF_USE_LEGACY_KERAS=1), so not seen by `imports`.
EXTRA_PIP = {"export_test": {"tensorflow_hub", "tf_keras"}}

HEADER = [
    "# Bazel build graph of invp-tf: one py_library per module, one py_test per test file.",
    "# tests/build_test.py keeps it honest (every file listed, internal deps equal to imports).",
    "# The pip packages at the bottom are placeholders for the external repository",
    "# (e.g. rules_python pip_parse) a Bazel user would wire in; setup.py declares them.",
    "",
]


def imports(path):
    """(internal module names, third-party top-level modules) imported by `path`."""
    with open(path) as f:
        tree = ast.parse(f.read())
    internal, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            if node.module == "invp_tf":
                internal |= {alias.name for alias in node.names}
            elif node.module == "tests.conftest":
                internal.add("conftest")
            elif node.module == "benchmarks":  # benchmark modules that tests import
                internal |= {f"benchmarks_{alias.name}" for alias in node.names}
            elif top in PIP:
                external.add(top)
        elif isinstance(node, ast.Import):
            external |= {a.name.split(".")[0] for a in node.names if a.name.split(".")[0] in PIP}
    return internal, external


def pip_target(module):
    return f":pip_{PIP[module].replace('-', '_')}"


def deps(internal, external):
    labels = [f":{name}" for name in sorted(internal)] + [pip_target(m) for m in sorted(external)]
    return ", ".join(f'"{label}"' for label in labels)


def rule(kind, **attributes):
    """A Bazel rule, one attribute per line; values are written as given."""
    lines = [f"{kind}("] + [f"    {key} = {value}," for key, value in attributes.items()]
    return "\n".join(lines + [")", ""])


def _tested_benchmarks():
    """The benchmark modules the tests import, and the benchmark modules those import."""
    found, todo = set(), sorted(glob.glob("tests/*_test.py"))
    while todo:
        internal, _ = imports(todo.pop())
        for name in internal:
            if name.startswith("benchmarks_") and name[len("benchmarks_") :] not in found:
                found.add(name[len("benchmarks_") :])
                todo.append(f"benchmarks/{name[len('benchmarks_') :]}.py")
    return found | {"report"}


def build_file():
    out = list(HEADER)
    out.append(
        rule(
            "py_library",
            name='"invp_tf"',
            srcs='["invp_tf/__init__.py"]',
            visibility='["//visibility:public"]',
        )
    )
    for path in sorted(glob.glob("invp_tf/*.py")):
        name = os.path.basename(path)[:-3]
        if name != "__init__":
            extra = {"data": LIBRARY_DATA[name]} if name in LIBRARY_DATA else {}
            out.append(
                rule(
                    "py_library",
                    name=f'"{name}"',
                    srcs=f'["{path}"]',
                    **extra,
                    deps=f"[{deps(*imports(path))}]",
                )
            )
    for name in sorted(_tested_benchmarks()):
        path = f"benchmarks/{name}.py"
        srcs = f'["benchmarks/__init__.py", "{path}"]' if name == "report" else f'["{path}"]'
        out.append(
            rule(
                "py_library",
                name=f'"benchmarks_{name}"',
                srcs=srcs,
                deps=f"[{deps(*imports(path))}]",
            )
        )
    out.append(
        rule(
            "py_library",
            name='"conftest"',
            testonly="True",
            srcs='["tests/__init__.py", "tests/conftest.py"]',
            deps=f"[{deps(*imports('tests/conftest.py'))}]",
        )
    )
    for path in sorted(glob.glob("tests/*_test.py")):
        name = os.path.basename(path)[:-3]
        internal, external = imports(path)
        out.append(
            rule(
                "py_test",
                name=f'"{name}"',
                size='"large"' if name in LARGE_TESTS else '"medium"',
                srcs=f'["{path}"]',
                data=TEST_DATA.get(name, '["pytest.ini"]'),
                deps=f"[{deps(internal, external | EXTRA_PIP.get(name, set()))}]",
            )
        )
    for package in sorted(set(PIP.values())):
        target = package.replace("-", "_")
        out.append(f'py_library(name = "pip_{target}")  # placeholder: pip package {package}')
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    with open("BUILD", "w") as f:
        f.write(build_file())

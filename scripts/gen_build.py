"""Regenerates BUILD from the imports of invp_tf/*.py and tests/*_test.py (run: python3 scripts/gen_build.py).

tests/build_test.py fails when BUILD drifts from the imports; this script is how to fix it.
"""
import ast, glob, os
os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
PIP = {"tensorflow":"tensorflow","keras":"keras","numpy":"numpy","absl":"absl-py","scann":"scann","tensorflow_datasets":"tensorflow-datasets","pytest":"pytest","scipy":"scipy","PIL":"pillow","matplotlib":"matplotlib","tensorflow_hub":"tensorflow-hub","tf_keras":"tf-keras"}
def imports(path):
    t=ast.parse(open(path).read()); internal=set(); ext=set()
    for n in ast.walk(t):
        if isinstance(n, ast.ImportFrom) and n.module:
            if n.module=="invp_tf": internal|={a.name for a in n.names}
            elif n.module=="tests.conftest": internal.add("conftest")
            elif n.module.split('.')[0] in PIP: ext.add(n.module.split('.')[0])
        if isinstance(n, ast.Import):
            for a in n.names:
                if a.name.split('.')[0] in PIP: ext.add(a.name.split('.')[0])
    return internal, ext
def deps(i,e):
    return ", ".join([f'":{d}"' for d in sorted(i)]+[f'":pip_{PIP[x].replace("-","_")}"' for x in sorted(e)])
out=['# Bazel build graph of invp-tf: one py_library per module, one py_test per test file.',
'# tests/build_test.py keeps it honest (every file listed, internal deps equal to imports).',
'# The pip packages at the bottom are placeholders for the external repository',
'# (e.g. rules_python pip_parse) a Bazel user would wire in; setup.py declares them.','']
out.append('py_library(\n    name = "invp_tf",\n    srcs = ["invp_tf/__init__.py"],\n    visibility = ["//visibility:public"],\n)\n')
for p in sorted(glob.glob('invp_tf/*.py')):
    m=os.path.basename(p)[:-3]
    if m=='__init__': continue
    i,e=imports(p)
    out.append(f'py_library(\n    name = "{m}",\n    srcs = ["{p}"],\n    deps = [{deps(i,e)}],\n)\n')
out.append(f'py_library(\n    name = "conftest",\n    testonly = True,\n    srcs = ["tests/__init__.py", "tests/conftest.py"],\n    deps = [{deps(*imports("tests/conftest.py"))}],\n)\n')
for p in sorted(glob.glob('tests/*_test.py')):
    m=os.path.basename(p)[:-3]
    i,e=imports(p)
    if m=="export_test": e|={"tensorflow_hub","tf_keras"}  # used in a TF_USE_LEGACY_KERAS subprocess
    size = "large" if m in ("train_test","analyze_test","evaluate_test","export_test","embed_test") else "medium"
    data = {"configs_test": '["pytest.ini"] + glob(["configs/*.flags"])', "export_test": '["pytest.ini"] + glob(["export/*.json"])'}.get(m, '["pytest.ini"]')
    out.append(f'py_test(\n    name = "{m}",\n    size = "{size}",\n    srcs = ["{p}"],\n    data = {data},\n    deps = [{deps(i,e)}],\n)\n')
for v in sorted(set(PIP.values())):
    out.append(f'py_library(name = "pip_{v.replace("-","_")}")  # placeholder: pip package {v}')
open('BUILD','w').write("\n".join(out)+"\n")

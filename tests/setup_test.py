"""setup.py: every console command resolves to a `run()` that parses its flags and reaches main."""

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A flag each command defines (bool flags are listed as --[no]NAME): --helpfull lists it
# only if run() defined the flags.
FLAG_OF = {
    "invp-train": "rampup_epochs",
    "invp-evaluate": "protocol",
    "invp-export": "export_dir",
    "invp-embed": "with_knn_index",
    "invp-analyze": "num_anchors",
    "invp-import": "num_examples",
}


def _console_scripts():
    """{"invp-train": ("invp_tf.train", "run"), ...} read from setup.py without running it."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    entries = [ast.literal_eval(e) for e in value.elts]
                    return {
                        name.strip(): tuple(target.strip().split(":"))
                        for name, target in (entry.split("=") for entry in entries)
                    }
    raise AssertionError("setup.py has no console_scripts")


def test_every_console_command_runs_its_main():
    scripts = _console_scripts()
    assert set(scripts) == set(FLAG_OF)
    processes = {}
    for name, (module, function) in scripts.items():
        # What the installed wrapper does: import the module, call the function with argv.
        code = f"import sys; from {module} import {function}; sys.argv[0] = {name!r}; {function}()"
        processes[name] = subprocess.Popen(
            [sys.executable, "-c", code, "--helpfull"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    for name, process in processes.items():
        output, _ = process.communicate(timeout=180)
        assert "Traceback" not in output, output[-2000:]
        assert FLAG_OF[name] in output, f"{name} --helpfull does not list {FLAG_OF[name]}"

"""Native CPU kernels, compiled from the package's C++ sources on first use.

invp_tf/top_mask.cc holds three ops, which the TopM searches of `topm` run on
machines without a GPU or TPU, outside XLA:

- `InvpTopMask`: the exact TopM set of every row of [B, N] similarities in one pass
  per row (`topm._exact_top_mask`; faster than its TensorFlow-op search, BENCHMARKS.md);
- `InvpListAbove`: one chunk's similarities above each row's threshold as flat lists
  (`topm._list_entries`, the chunked listing of large banks);
- `InvpListedTop`: the exact TopM set of each row's listed entries, as flat lists
  (`topm._exact_compact`).

invp_tf/views.cc holds the input pipeline's view kernels: `InvpResizeAntialiased`, the
antialiased bilinear resize of uint8 crops (`augment._random_resized_crop_encoded`), and
`InvpGaussianBlur`, moco_v2's per-image blur (`augment._blur_rows`): the TensorFlow ops'
values to float round-off, in a fraction of their CPU time.

TensorFlow's pip package ships the headers and library a custom op builds against
(`tf.sysconfig`), so the kernels are compiled with the machine's C++ compiler the
first time they are needed (about 15 s), and the library is cached, keyed by the
source, the TensorFlow version and the flags:

    $INVP_TF_CACHE, else $XDG_CACHE_HOME/invp_tf, else ~/.cache/invp_tf

Where they cannot be built (no compiler, a failed build), a warning says why and
TensorFlow ops run instead: the same sets and lists (for rows without NaN), slower.
INVP_TF_NATIVE=0 turns the kernels off; CXX names the compiler (default c++).
"""

import functools
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile

import tensorflow as tf
from absl import logging

SOURCES = tuple(pathlib.Path(__file__).with_name(name) for name in ("top_mask.cc", "views.cc"))
_BUILD_SECONDS = 600
# The library's ops: registered names, and the Python wrappers tf.load_op_library makes.
OPS = {
    "InvpTopMask": "invp_top_mask",
    "InvpListAbove": "invp_list_above",
    "InvpListedTop": "invp_listed_top",
    "InvpResizeAntialiased": "invp_resize_antialiased",
    "InvpGaussianBlur": "invp_gaussian_blur",
}
for _op in OPS:
    try:  # masks and listings of stopped similarities (the losses attach their gradient)
        tf.no_gradient(_op)
    except KeyError:  # registered already (the module reloaded)
        pass
# The module of the first library loaded: TensorFlow registers an op once per process,
# and a second library with the same op (another cache directory) yields no wrapper.
_LOADED = []


def cache_dir():
    """Where built kernels are kept (created on first build)."""
    if os.environ.get("INVP_TF_CACHE"):
        return pathlib.Path(os.environ["INVP_TF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "invp_tf"


def _command(compiler, output):
    flags = tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags()
    return [
        *shlex.split(compiler),  # CXX may carry arguments, e.g. "ccache g++"
        "-shared",
        "-fPIC",
        "-O3",
        "-ffp-contract=off",  # the same sums whichever vector ISA a kernel runs on
        "-Wno-deprecated-declarations",
        *map(str, SOURCES),
        "-o",
        str(output),
        *flags,
    ]


def library_path(compiler="c++"):
    """The cached library's path for this source, TensorFlow and compiler flags."""
    key = hashlib.sha256()
    parts = [source.read_bytes() for source in SOURCES]
    for part in (*parts, tf.__version__.encode(), platform.machine().encode()):
        key.update(part)
    key.update(" ".join(_command(compiler, "")).encode())
    return cache_dir() / f"top_mask-{key.hexdigest()[:16]}.so"


def build(compiler=None):
    """Compiles the kernels unless cached; returns the library's path.

    Written to a temporary file in the cache directory and renamed into place, so
    concurrent builds (parallel test workers, several trainings) never load a half
    written library.

    Raises:
      RuntimeError: naming the compiler and the end of its output, when the build fails
        or no compiler is found.
    """
    compiler = compiler or os.environ.get("CXX", "c++")
    path = library_path(compiler)
    if path.exists():
        return path
    if not compiler.strip() or shutil.which(shlex.split(compiler)[0]) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX to name one)")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=path.stem, suffix=".so.partial", dir=path.parent)
    os.close(handle)
    try:
        logging.warning("Compiling the native kernels (once, cached in %s) ...", path.parent)
        done = subprocess.run(
            _command(compiler, partial), capture_output=True, text=True, timeout=_BUILD_SECONDS
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{compiler} failed to build {' + '.join(x.name for x in SOURCES)} "
                f"(exit {done.returncode}): "
                f"{done.stderr.strip()[-2000:]}"
            )
        os.chmod(partial, 0o755)  # mkstemp's 0600 would hide a shared cache from others
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


@functools.cache
def native_ops():
    """The loaded library's ops (`.invp_top_mask`, `.invp_list_above`,
    `.invp_listed_top`, `.invp_resize_antialiased`, `.invp_gaussian_blur`), or None where
    unavailable.

    None when INVP_TF_NATIVE is 0 (or false, off, no) or the kernels cannot be built or
    loaded; the latter logs a warning once per process with the reason. Both are
    decided once per process (the first call).
    """
    if os.environ.get("INVP_TF_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    try:
        path = build()
        if not _LOADED:
            _LOADED.append(tf.load_op_library(str(path)))
        module = _LOADED[0]
        for name in OPS.values():
            getattr(module, name)
        return module
    except AttributeError:  # this process registered the ops from another library
        logging.warning(
            "The native kernels were registered by another copy of invp_tf in this "
            "process, so the TopM searches and the views' resize and blur run as "
            "TensorFlow ops (the same sets, the same views to float round-off)."
        )
        return None
    except (RuntimeError, OSError, subprocess.SubprocessError, tf.errors.OpError) as error:
        logging.warning(
            "The native kernels are unavailable, so the TopM searches and the views' resize "
            "and blur run as TensorFlow ops (the same sets, the exact search about 3x slower "
            "on a CPU; the same views to float round-off, about 1.4x slower): %s",
            error,
        )
        return None

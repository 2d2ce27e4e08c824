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
antialiased bilinear resize of uint8 crops (`augment._random_resized_crop_encoded`),
`InvpColour`, the colour recipes' jitter (each image's random order), grayscale and flip
over a batch (`batch_views`), and `InvpGaussianBlur`, moco_v2's per-image blur of the
images drawn for it (`batch_views`): the TensorFlow ops' values to float round-off, in a
fraction of their CPU time.

TensorFlow's pip package ships the headers and library a custom op builds against
(`tf.sysconfig`), so the kernels are compiled with the machine's C++ compiler the
first time they are needed (about 15 s), and the library is cached, keyed by the
source, the TensorFlow version and the flags:

    $INVP_TF_CACHE, else $XDG_CACHE_HOME/invp_tf, else ~/.cache/invp_tf

The library is loaded into the process, so the cache must be private (`kernel_dir`): a
folder of this user (created 0700) that no group or other user can write. A folder that is
group- or world-writable or owned by someone else is not used: a warning names it and the
kernels go to ~/.cache/invp_tf, else to a private temporary folder. Each build records the
library's SHA-256 beside it (`top_mask-KEY.so.sha256`); a library whose hash differs, or
that has none, is not loaded: a warning says so and it is rebuilt.

Where they cannot be built (no compiler, a failed build), a warning says why and
TensorFlow ops run instead: the same sets and lists (for rows without NaN), slower.
INVP_TF_NATIVE=0 turns the kernels off; CXX names the compiler (default c++).
"""

import contextlib
import fcntl
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile

import tensorflow as tf
from absl import logging

from invp_tf import digests

SOURCES = tuple(pathlib.Path(__file__).with_name(name) for name in ("top_mask.cc", "views.cc"))
_BUILD_SECONDS = 600
# The library's ops: registered names, and the Python wrappers tf.load_op_library makes.
OPS = {
    "InvpTopMask": "invp_top_mask",
    "InvpListAbove": "invp_list_above",
    "InvpListedTop": "invp_listed_top",
    "InvpResizeAntialiased": "invp_resize_antialiased",
    "InvpGaussianBlur": "invp_gaussian_blur",
    "InvpColour": "invp_colour",
}
for _op in OPS:
    try:  # masks and listings of stopped similarities (the losses attach their gradient)
        tf.no_gradient(_op)
    except KeyError:  # registered already (the module reloaded)
        pass
# The module of the first library loaded: TensorFlow registers an op once per process,
# and a second library with the same op (another cache directory) yields no wrapper.
_LOADED = []
# The private temporary folder of this process, where no cache folder could be used.
_TEMPORARY = []


def cache_dir():
    """The configured cache folder: $INVP_TF_CACHE, else $XDG_CACHE_HOME/invp_tf, else
    ~/.cache/invp_tf (kernels go to `kernel_dir`, which checks it)."""
    if os.environ.get("INVP_TF_CACHE"):
        return pathlib.Path(os.environ["INVP_TF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "invp_tf"


def unsafe_folder(folder):
    """Why `folder` cannot hold a library this process loads; None when it can.

    Creates it (mode 0700) when it is missing. Only its owner may write in it: anyone else
    could replace the library (or its recorded hash) by their own. The baseline cache
    (`baselines.Cache`) holds itself to the same rule.
    """
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError as e:
        return f"it cannot be created ({e.strerror or e})"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a folder"
    if info.st_uid != os.geteuid():
        return f"it is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
    if info.st_mode & 0o022:
        return f"it is writable by its group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def kernel_dir():
    """The private folder built kernels are kept in and loaded from.

    `cache_dir()` when it is safe (`unsafe_folder`); else, with a warning naming it,
    ~/.cache/invp_tf when that one is, else a private temporary folder of this process.
    """
    configured = cache_dir()
    problem = unsafe_folder(configured)
    if problem is None:
        return configured
    fallback = pathlib.Path(os.path.expanduser("~"), ".cache", "invp_tf")
    if fallback == configured or unsafe_folder(fallback) is not None:
        if not _TEMPORARY:
            _TEMPORARY.append(pathlib.Path(tempfile.mkdtemp(prefix="invp_tf-kernels-")))
        fallback = _TEMPORARY[0]
    logging.warning(
        "Not using the kernel cache %s: %s; using the private folder %s instead "
        "(see INVP_TF_CACHE in README.md).",
        configured,
        problem,
        fallback,
    )
    return fallback


def _command(compiler, output):
    flags = tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags()
    return [
        *shlex.split(compiler),  # CXX may carry arguments, e.g. "ccache g++"
        "-shared",
        "-fPIC",
        "-O3",
        "-ffp-contract=off",  # the same sums whichever vector ISA a kernel runs on
        "-fno-trapping-math",  # selects of computed values vectorise (no value changes)
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
    return kernel_dir() / f"top_mask-{key.hexdigest()[:16]}.so"


def hash_path(path):
    """The file beside library `path` holding its SHA-256, recorded when it was built."""
    return path.with_name(path.name + ".sha256")


def _unverified(path):
    """Why the library at `path` must not be loaded; None when it is the one built here, ""
    when there is none."""
    if not path.exists():
        return ""
    try:
        recorded = hash_path(path).read_text().split()[0]
    except (OSError, IndexError):
        return "no SHA-256 was recorded for it when it was built"
    info = path.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        return "it is not a private file of this user"
    if digests.file_sha256(path) != recorded:
        return "its SHA-256 differs from the one recorded when it was built"
    return None


@contextlib.contextmanager
def _locked(folder):
    """Holds an exclusive lock on `folder`: one build (and hash check) at a time."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # no locks (some network filesystems): still atomic
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _record_hash(path, library):
    """Writes the SHA-256 of `library` to `path` (mode 0600, through a rename)."""
    handle, partial = tempfile.mkstemp(prefix=path.name, suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(digests.file_sha256(library) + "\n")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def build(compiler=None):
    """Compiles the kernels unless cached and verified; returns the library's path.

    The library is written to a temporary file in the private cache folder (`kernel_dir`),
    its SHA-256 recorded beside it, and renamed into place, under a lock of the folder: a
    concurrent build (parallel test workers, several trainings) waits, and never loads a half
    written library. A cached library whose hash does not match its record is not loaded: a
    warning names it, and it is rebuilt.

    Raises:
      RuntimeError: naming the compiler and the end of its output, when the build fails
        or no compiler is found.
    """
    compiler = compiler or os.environ.get("CXX", "c++")
    path = library_path(compiler)
    with _locked(path.parent):
        problem = _unverified(path)
        if problem is None:
            return path
        if problem:
            logging.warning("Not loading %s: %s; rebuilding it.", path, problem)
            path.unlink()
        if not compiler.strip() or shutil.which(shlex.split(compiler)[0]) is None:
            raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX to name one)")
        _compile(compiler, path)
    return path


def _compile(compiler, path):
    """Builds the library into `path` and records its hash (`build`, under the lock)."""
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
        os.chmod(partial, 0o700)  # this user's alone, like its folder
        _record_hash(hash_path(path), partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@functools.cache
def native_ops():
    """The loaded library's ops (`.invp_top_mask`, `.invp_list_above`,
    `.invp_listed_top`, `.invp_resize_antialiased`, `.invp_gaussian_blur`, `.invp_colour`),
    or None where unavailable.

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
            "process, so the TopM searches and the views' resize, colour and blur run as "
            "TensorFlow ops (the same sets, the same views to float round-off)."
        )
        return None
    except (RuntimeError, OSError, subprocess.SubprocessError, tf.errors.OpError) as error:
        logging.warning(
            "The native kernels are unavailable, so the TopM searches and the views' resize, "
            "colour and blur run as TensorFlow ops (the same sets, the exact search about 3x "
            "slower on a CPU; the same views to float round-off, the colour recipes' about 2x "
            "slower): %s",
            error,
        )
        return None

"""invp-tf: Invariance Propagation (NeurIPS 2020) in TensorFlow/Keras.

This file is the one place dependencies are declared; every pin says why.
Not used on purpose: keras-cv and tensorflow-addons are unmaintained and break
on Keras 3 (tensorflow-addons 0.23 fails to import with Keras 3; keras-cv 0.9 is
frozen, pulls keras-core and was the slowest augmentation pipeline measured).
Augmentations use tf.image stateless ops instead, optimizers Keras 3 core.
"""

import setuptools

setuptools.setup(
    name="invp-tf",
    version="0.1.0",
    description="Invariance Propagation self-supervised learning in TensorFlow/Keras",
    license="Apache-2.0",
    packages=["invp_tf"],
    # The exact TopM kernel's C++ source: invp_tf/kernels.py compiles it on first use
    # against the installed TensorFlow (a C++ compiler is needed for that, not to install;
    # without one the exact search runs as TensorFlow ops, the same set, slower).
    package_data={"invp_tf": ["top_mask.cc", "views.cc"]},
    # Lower bound: the code uses Python 3.10 syntax (zip(strict=True)). Upper bound: TF 2.20
    # and scann 1.4.2 publish wheels for CPython 3.9 to 3.13 only (none for 3.14).
    python_requires=">=3.10,<3.14",
    install_requires=[
        # scann 1.4.2's ops are built against TF 2.20's abseil: with TF 2.21,
        # `import scann` dies with an undefined symbol.
        "tensorflow~=2.20.0",
        # The fast kNN graph builder; 1.4.2 is the release built for TF 2.20. Its wheels are
        # Linux x86_64 / aarch64 only: elsewhere --knn_method=scann falls back to the exact
        # brute-force search with a warning (invp_tf/neighbors.py).
        "scann==1.4.2; platform_system == 'Linux' and "
        "(platform_machine == 'x86_64' or platform_machine == 'aarch64')",
        # Keras 3 ships with TF 2.20; the code uses the Keras 3 API.
        "keras>=3.10",
        "tensorflow-datasets>=4.9",
        "absl-py>=2.0",
        # No longer pulled in by TF; keras TensorBoard callbacks and
        # tf.summary need it.
        "tensorboard~=2.20.0",
        "numpy>=1.26",
        # The converged logistic-regression probe and baselines of invp_tf.evaluate
        # (full-batch L-BFGS); its scipy gives the study's t-intervals.
        "scikit-learn>=1.3",
        # invp_tf.analyze draws its figures on the Agg canvas (no display needed).
        "matplotlib>=3.8",
    ],
    extras_require={
        # hub.KerasLayer is a Keras 2 layer: it needs tf-keras matching TF.
        "hub": ["tensorflow-hub>=0.16", "tf-keras~=2.20.0"],
        # pillow: tests decode the written figures independently of TF.
        # ruff pinned: scripts/test.sh runs it before any test, and a new release can add rules
        # or change formatting, which would fail the command on unchanged code.
        "test": ["pytest>=8", "ruff==0.17.6", "pillow>=10.0"],
    },
    entry_points={
        "console_scripts": [
            "invp-train=invp_tf.train:run",
            "invp-evaluate=invp_tf.evaluate:run",
            "invp-export=invp_tf.export:run",
            "invp-embed=invp_tf.embed:run",
            "invp-analyze=invp_tf.analyze:run",
            "invp-import=invp_tf.import_checkpoint:run",
        ],
    },
)

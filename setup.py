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
    packages=["invp_tf"],
    python_requires=">=3.10,<3.13",
    install_requires=[
        # scann 1.4.2's ops are built against TF 2.20's abseil: with TF 2.21,
        # `import scann` dies with an undefined symbol.
        "tensorflow~=2.20.0",
        # The kNN graph builder; 1.4.2 is the release built for TF 2.20.
        "scann==1.4.2",
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
        "test": ["pytest>=8", "ruff>=0.6", "pillow>=10.0"],
    },
)

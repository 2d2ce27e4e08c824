"""Encoders: torchvision-style ResNets and the projection heads of Invariance Propagation.

The layers follow torchvision (and the authors' PyTorch code) closely so that parameter counts,
padding and initialisation match: convolutions without bias, BatchNorm with torch's momentum 0.1
(Keras momentum 0.9) and epsilon 1e-5, He-normal (fan_out) conv init, stride on the 3x3 conv of
the bottleneck (ResNet v1.5), and explicit symmetric zero padding for strided convs (Keras
"same" padding would pad only on the right/bottom for even inputs).

For speed, not semantics: BatchNorm of 4-D inputs runs as TensorFlow's fused kernel (one pass,
the statistics Keras's layer would compute) and stride-1 convolutions pad inside the kernel;
`FUSED_BATCH_NORM` and `SAME_PADDING` switch both off for comparison.

Weight decay is deliberately absent from the layers: the optimizer applies decoupled weight
decay, so no layer carries a kernel_regularizer.

The encoder takes float images in [0, 1] and normalises them itself (ImageNet mean/std by
default; `normalization` picks another mean/std, e.g. CIFAR's for the authors' CIFAR models), so
an exported model needs no separate preprocessing.
"""

import collections

import keras
import tensorflow as tf

BACKBONES = ("resnet50", "resnet18", "resnet18_cifar")
HEADS = ("linear", "mlp", "mlp_bn")

# ImageNet statistics, as used by torchvision's transforms.Normalize.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The input normalisations an encoder applies to images in [0, 1]: name -> (mean, std). "cifar"
# is the authors' CIFAR-10 statistics (their datasets/cifar.py, for models/resnet_cifar.py).
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}

# name -> (block type, blocks per stage, stem).
_ARCHITECTURES = {
    "resnet50": ("bottleneck", (3, 4, 6, 3), "imagenet"),
    "resnet18": ("basic", (2, 2, 2, 2), "imagenet"),
    "resnet18_cifar": ("basic", (2, 2, 2, 2), "cifar"),
}
_STAGE_STRIDES = (1, 2, 2, 2)
_BOTTLENECK_EXPANSION = 4
# BatchNorm of 4-D inputs as one fused kernel (TensorFlow's FusedBatchNormV3) instead of
# Keras 3's moments + normalisation (several passes over the activations, and as many
# in the gradient); the same statistics and moving averages. Read when a layer is
# traced; benchmarks and tests switch it to compare the two.
FUSED_BATCH_NORM = True
# Stride-1 convolutions pad inside the kernel ("same") rather than with a separate pad;
# read when a layer is built, for the same comparisons.
SAME_PADDING = True


def _conv_initializer():
    # torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"): untruncated normal,
    # variance 2 / fan_out.
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


def _dense_initializer():
    # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1/(3 fan_in).
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
    )


@keras.saving.register_keras_serializable(package="invp_tf")
class BatchNorm(keras.layers.BatchNormalization):
    """Keras BatchNormalization whose `synchronized` statistics are two-pass.

    Keras's synchronized moments take E[x^2] - E[x]^2 in float32, which cancels
    for channels whose variance is small next to their mean, while one device
    (tf.nn.moments) subtracts the mean first. Here the global mean is
    all-reduced first, then the squared deviations from it: N replicas get the
    statistics of one device with the global batch, up to summation order. With
    one replica, synchronized or not is the same computation.
    """

    def call(self, inputs, training=None, mask=None):
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        fusable = (
            FUSED_BATCH_NORM
            and mask is None
            and isinstance(training, bool | type(None))
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and self.scale
            and self.center
            and not self.renorm
            and not (self.synchronized and replicas > 1)
        )
        if not fusable:
            return super().call(inputs, training=training, mask=mask)
        return self._fused(inputs, bool(training) and self.trainable)

    def _fused(self, inputs, training):
        """Keras's BatchNormalization.call for NHWC inputs, as one FusedBatchNormV3.

        Statistics in float32 whatever the input dtype (the kernel's U), biased batch
        variance for the moving average, as Keras: the kernel returns the unbiased one.
        """
        x = inputs if inputs.dtype in (tf.float32, tf.bfloat16) else tf.cast(inputs, tf.float32)
        empty = tf.zeros([0], tf.float32)
        y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=tf.cast(self.gamma, tf.float32),
            offset=tf.cast(self.beta, tf.float32),
            mean=empty if training else tf.cast(self.moving_mean, tf.float32),
            variance=empty if training else tf.cast(self.moving_variance, tf.float32),
            epsilon=self.epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=training,
        )
        if training:
            shape = tf.shape(x)
            count = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
            variance *= (count - 1.0) / tf.maximum(count, 1.0)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1 - self.momentum)
            )
        return tf.cast(y, self.compute_dtype)

    def _moments(self, inputs, mask):
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        if not self.synchronized or mask is not None or replicas == 1:
            if mask is None:
                return keras.ops.moments(inputs, axes=self._reduction_axes)
            return super()._moments(inputs, mask)
        x = tf.cast(inputs, tf.float32)
        axes = self._reduction_axes
        total = tf.distribute.ReduceOp.SUM
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)
        count = context.all_reduce(total, count)
        mean = context.all_reduce(total, tf.reduce_sum(x, axes, keepdims=True)) / count
        deviations = tf.reduce_sum(tf.square(x - mean), axes, keepdims=True)
        variance = context.all_reduce(total, deviations) / count
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
        if inputs.dtype != tf.float32:  # float16 statistics would overflow: clip, as Keras does
            limit = inputs.dtype.max
            mean = tf.cast(tf.clip_by_value(mean, -limit, limit), inputs.dtype)
            variance = tf.cast(tf.clip_by_value(variance, 0.0, limit), inputs.dtype)
        return mean, variance


def _batch_norm(name, zero_gamma=False):
    # Keras momentum is the weight of the old statistics: torch's momentum 0.1 == Keras 0.9.
    return BatchNorm(
        momentum=0.9,
        epsilon=1e-5,
        gamma_initializer="zeros" if zero_gamma else "ones",
        name=name,
    )


class _Conv(keras.layers.Layer):
    """Conv2D without bias and with torch's symmetric padding of kernel_size // 2."""

    def __init__(self, filters, kernel_size, stride=1, **kwargs):
        super().__init__(**kwargs)
        # Stride 1 and an odd kernel: "same" pads k // 2 on every side, as torch does,
        # inside the convolution kernel instead of as a copy of the input.
        same = stride == 1 and kernel_size % 2 == 1 and SAME_PADDING
        self.pad = 0 if same else kernel_size // 2
        self.conv = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=stride,
            padding="same" if same else "valid",
            use_bias=False,
            kernel_initializer=_conv_initializer(),
            name="conv",
        )

    def call(self, x):
        if self.pad:
            # [B,H,W,C] -> [B,H+2p,W+2p,C]; symmetric like torch's padding=k//2.
            p = self.pad
            x = keras.ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
        return self.conv(x)


class _ResidualBlock(keras.layers.Layer):
    """What both blocks share: the optional 1x1 conv + BN projection shortcut."""

    def _add_shortcut(self, filters, stride, project):
        self.shortcut_conv = _Conv(filters, 1, stride, name="downsample_conv") if project else None
        self.shortcut_bn = _batch_norm("downsample_bn") if project else None

    def _shortcut(self, x, training):
        if self.shortcut_conv is None:
            return x
        return self.shortcut_bn(self.shortcut_conv(x), training=training)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut, as torchvision's BasicBlock.

    Args:
        filters: output channels of both convs.
        stride: stride of the first conv (and of the projection shortcut).
        project: whether the shortcut is a 1x1 conv + BN (when shape changes).
        zero_init_residual: start the last BN's gamma at zero so the block begins as identity.
    """

    def __init__(self, filters, stride=1, project=False, zero_init_residual=False, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = _Conv(filters, 3, stride, name="conv1")
        self.bn1 = _batch_norm("bn1")
        self.conv2 = _Conv(filters, 3, 1, name="conv2")
        self.bn2 = _batch_norm("bn2", zero_gamma=zero_init_residual)
        self._add_shortcut(filters, stride, project)

    def call(self, x, training=False):
        shortcut = self._shortcut(x, training)  # first: the layers build in this order
        y = keras.ops.relu(self.bn1(self.conv1(x), training=training))
        y = self.bn2(self.conv2(y), training=training)
        return keras.ops.relu(y + shortcut)


class Bottleneck(_ResidualBlock):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 (x4 channels), as torchvision's Bottleneck.

    Args:
        filters: channels of the inner 1x1 and 3x3 convs; the block outputs 4 * filters.
        stride: stride of the 3x3 conv (and of the projection shortcut).
        project: whether the shortcut is a 1x1 conv + BN (when shape changes).
        zero_init_residual: start the last BN's gamma at zero so the block begins as identity.
    """

    def __init__(self, filters, stride=1, project=False, zero_init_residual=False, **kwargs):
        super().__init__(**kwargs)
        out = filters * _BOTTLENECK_EXPANSION
        self.conv1 = _Conv(filters, 1, 1, name="conv1")
        self.bn1 = _batch_norm("bn1")
        self.conv2 = _Conv(filters, 3, stride, name="conv2")
        self.bn2 = _batch_norm("bn2")
        self.conv3 = _Conv(out, 1, 1, name="conv3")
        self.bn3 = _batch_norm("bn3", zero_gamma=zero_init_residual)
        self._add_shortcut(out, stride, project)

    def call(self, x, training=False):
        shortcut = self._shortcut(x, training)  # first: the layers build in this order
        y = keras.ops.relu(self.bn1(self.conv1(x), training=training))
        y = keras.ops.relu(self.bn2(self.conv2(y), training=training))
        y = self.bn3(self.conv3(y), training=training)
        return keras.ops.relu(y + shortcut)


def _scaled(channels, width_multiplier):
    return max(1, round(channels * width_multiplier))


class Backbone(keras.layers.Layer):
    """A torchvision-style ResNet without its classifier; call() returns pooled features.

    Expects already-normalised images [B,H,W,3] (Encoder does the normalisation). Any H,W works
    as long as stage4 keeps at least one pixel: >= 8 for the CIFAR stem, >= 32 for ImageNet.

    Args:
        architecture: one of BACKBONES.
        width_multiplier: scales every stage's channels (rounded, at least 1).
        zero_init_residual: zero-init the last BN gamma of every residual block.
        stem_width: channels of the stem conv; 0: 64 scaled by width_multiplier. The authors'
            `width` scales the stages only (their stem keeps 64).
        **kwargs: passed to keras.layers.Layer (name, dtype, ...).
    """

    def __init__(
        self,
        architecture="resnet50",
        width_multiplier=1.0,
        zero_init_residual=False,
        stem_width=0,
        **kwargs,
    ):
        if architecture not in _ARCHITECTURES:
            raise ValueError(f"Unknown backbone {architecture!r}; valid backbones: {BACKBONES}.")
        kwargs.setdefault("name", "backbone")
        super().__init__(**kwargs)
        self.architecture = architecture
        self.width_multiplier = float(width_multiplier)
        block_type, depths, stem = _ARCHITECTURES[architecture]
        self.stem_type = stem
        stem_width = int(stem_width) or _scaled(64, width_multiplier)
        if stem == "imagenet":
            # 7x7/2 conv, BN, ReLU, 3x3/2 maxpool: /4 spatially.
            self.stem_conv = _Conv(stem_width, 7, 2, name="stem_conv")
        else:
            # CIFAR stem: 3x3/1 conv, no maxpool, keeps full resolution.
            self.stem_conv = _Conv(stem_width, 3, 1, name="stem_conv")
        self.stem_bn = _batch_norm("stem_bn")

        block_cls = Bottleneck if block_type == "bottleneck" else BasicBlock
        expansion = _BOTTLENECK_EXPANSION if block_type == "bottleneck" else 1
        in_channels = stem_width
        # Blocks are plain attributes (stage1_block1, ...) because tf.train.Checkpoint does not
        # see layers held in Keras 3 lists; stages keeps only their names, in order.
        stages = []
        for stage_index, (depth, stride) in enumerate(zip(depths, _STAGE_STRIDES, strict=True)):
            filters = _scaled(64 * 2**stage_index, width_multiplier)
            names = []
            for block_index in range(depth):
                block_stride = stride if block_index == 0 else 1
                project = block_stride != 1 or in_channels != filters * expansion
                block_name = f"stage{stage_index + 1}_block{block_index + 1}"
                block = block_cls(
                    filters, block_stride, project, zero_init_residual, name=block_name
                )
                setattr(self, block_name, block)
                names.append(block_name)
                in_channels = filters * expansion
            stages.append(tuple(names))
        self.stage_block_names = tuple(stages)
        self.feature_dim = in_channels

    def stage_outputs(self, images, training=False):
        """Runs the network once and returns every stage's feature map.

        Args:
            images: normalised float images [B,H,W,3].
            training: whether BatchNorm uses (and updates) batch statistics.

        Returns:
            OrderedDict stem, stage1..stage4 -> [B,h,w,C] feature maps (compute dtype). For the
            ImageNet stem "stem" is after the maxpool (H/4); for CIFAR it is full resolution.
        """
        outputs = collections.OrderedDict()
        x = keras.ops.relu(self.stem_bn(self.stem_conv(images), training=training))
        if self.stem_type == "imagenet":
            # Zero padding equals torch's -inf padding here because x >= 0 after the ReLU.
            x = keras.ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
            x = keras.ops.max_pool(x, pool_size=3, strides=2, padding="valid")
        outputs["stem"] = x
        for stage_index, block_names in enumerate(self.stage_block_names):
            for block_name in block_names:
                x = getattr(self, block_name)(x, training=training)
            outputs[f"stage{stage_index + 1}"] = x
        return outputs

    def call(self, images, training=False):
        """Returns global-average-pooled stage4 features [B,F] in float32."""
        x = self.stage_outputs(images, training=training)["stage4"]
        # Pool in float32: under mixed_float16 the pooled features feed the head and probes.
        return keras.ops.mean(keras.ops.cast(x, "float32"), axis=(1, 2))


class ProjectionHead(keras.layers.Layer):
    """Maps pooled features [B,F] to the (unnormalised) embedding [B,D].

    Args:
        head: "linear" (Dense(D)), "mlp" (the authors' CIFAR head: Linear(F,F) ReLU Linear(F,D))
            or "mlp_bn" (Dense(F) BN ReLU Dense(D), as SimCLR v2 / MoCo v3: the batch
            normalisation centres the embeddings, so they start spread out instead of
            all pointing the same way, which speeds up short runs).
        feature_dim: F, the input size (the width of the hidden layer of "mlp").
        embedding_dim: D.
        hidden_dim: width of the hidden layer of "mlp" and "mlp_bn"; 0: F. The authors' ImageNet
            MLP head is 2048 wide whatever F.
        **kwargs: passed to keras.layers.Layer.
    """

    def __init__(self, head, feature_dim, embedding_dim, hidden_dim=0, **kwargs):
        if head not in HEADS:
            raise ValueError(f"Unknown head {head!r}; valid heads: {HEADS}.")
        kwargs.setdefault("name", "head")
        super().__init__(**kwargs)
        self.hidden = self.hidden_norm = None
        hidden_dim = int(hidden_dim) or feature_dim
        if head == "mlp":
            self.hidden = keras.layers.Dense(
                hidden_dim, activation="relu", kernel_initializer=_dense_initializer(), name="fc1"
            )
        elif head == "mlp_bn":
            self.hidden = keras.layers.Dense(
                hidden_dim, use_bias=False, kernel_initializer=_dense_initializer(), name="fc1"
            )
            self.hidden_norm = _batch_norm("fc1_bn")
        self.out = keras.layers.Dense(
            embedding_dim, kernel_initializer=_dense_initializer(), name="fc"
        )

    def call(self, features, training=False):
        if self.hidden is not None:
            features = self.hidden(features)  # [B,F]
        if self.hidden_norm is not None:
            features = tf.nn.relu(self.hidden_norm(features, training=training))
        return self.out(features)  # [B,D]


@keras.saving.register_keras_serializable(package="invp_tf")
class Encoder(keras.Model):
    """Normalise -> ResNet backbone -> head -> L2-normalised embedding.

    Args:
        backbone: one of BACKBONES.
        head: one of HEADS ("linear": Dense(D); "mlp": Dense(F) ReLU Dense(D)).
        embedding_dim: D, the size of the embedding stored in the memory bank.
        width_multiplier: scales every backbone stage's channels.
        zero_init_residual: zero-init the last BN gamma of every residual block.
        sync_batchnorm: in training, every BatchNormalization normalises with the
            statistics of the global batch (an all-reduce over the replicas of a
            tf.distribute strategy; the same as False on one device).
        stem_width: channels of the stem conv; 0: 64 scaled by width_multiplier.
        head_hidden_dim: width of the hidden layer of the mlp heads; 0: F.
        normalization: the mean/std of NORMALIZATIONS applied to the [0, 1] images.
        **kwargs: passed to keras.Model (name, dtype, ...).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        head: str = "linear",
        embedding_dim: int = 128,
        width_multiplier: float = 1.0,
        zero_init_residual: bool = False,
        sync_batchnorm: bool = False,
        stem_width: int = 0,
        head_hidden_dim: int = 0,
        normalization: str = "imagenet",
        **kwargs,
    ):
        if backbone not in BACKBONES:
            raise ValueError(f"Unknown backbone {backbone!r}; valid backbones: {BACKBONES}.")
        if head not in HEADS:
            raise ValueError(f"Unknown head {head!r}; valid heads: {HEADS}.")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"Unknown normalization {normalization!r}; valid: {tuple(NORMALIZATIONS)}."
            )
        kwargs.setdefault("name", "encoder")
        super().__init__(**kwargs)
        self.backbone_name = backbone
        self.head_name = head
        self.embedding_dim = int(embedding_dim)
        self.width_multiplier = float(width_multiplier)
        self.zero_init_residual = bool(zero_init_residual)
        self.stem_width = int(stem_width)
        self.head_hidden_dim = int(head_hidden_dim)
        self.normalization = normalization
        self.backbone = Backbone(backbone, width_multiplier, zero_init_residual, self.stem_width)
        self.head = ProjectionHead(
            head, self.backbone.feature_dim, self.embedding_dim, self.head_hidden_dim
        )
        self.sync_batchnorm = bool(sync_batchnorm)
        # Set on the built layers rather than threaded through every block: the
        # flag only changes how training-mode statistics are reduced.
        for layer in self._flatten_layers(include_self=False):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = self.sync_batchnorm

    @property
    def feature_dim(self):
        """F, the size of the pooled backbone features."""
        return self.backbone.feature_dim

    def _normalise(self, images):
        # [B,H,W,3] in [0,1] -> standardised (ImageNet's mean/std by default), float32 (layers
        # cast to compute dtype).
        images = keras.ops.cast(images, "float32")
        mean, std = NORMALIZATIONS[self.normalization]
        mean = keras.ops.convert_to_tensor(mean, "float32")
        std = keras.ops.convert_to_tensor(std, "float32")
        return (images - mean) / std

    def stage_outputs(self, images, training=False):
        """Feature maps of every stage, for per-block linear probes.

        Args:
            images: float images [B,H,W,3] in [0,1].
            training: whether BatchNorm uses (and updates) batch statistics.

        Returns:
            OrderedDict "stem", "stage1".."stage4" -> [B,h,w,C] feature maps.
        """
        return self.backbone.stage_outputs(self._normalise(images), training=training)

    def features(self, images, training=False):
        """Pooled backbone features [B,F] float32 of float images [B,H,W,3] in [0,1] (no head)."""
        return self.backbone(self._normalise(images), training=training)

    def call(self, images, training=False):
        """Embeds a batch of images.

        Args:
            images: float images [B,H,W,3] in [0,1].
            training: whether BatchNorm uses (and updates) batch statistics.

        Returns:
            dict "embedding": [B,D] float32, unit L2 norm; "features": [B,F] float32 pooled
            backbone features.
        """
        features = self.features(images, training=training)  # [B,F] float32
        embedding = self.head(features, training=training)  # [B,D], compute dtype
        # Normalise in float32: float16 squares overflow/underflow for large/small norms.
        embedding = tf.math.l2_normalize(tf.cast(embedding, tf.float32), axis=-1, epsilon=1e-12)
        return {"embedding": embedding, "features": features}

    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=self.backbone_name,
            head=self.head_name,
            embedding_dim=self.embedding_dim,
            width_multiplier=self.width_multiplier,
            zero_init_residual=self.zero_init_residual,
            sync_batchnorm=self.sync_batchnorm,
            stem_width=self.stem_width,
            head_hidden_dim=self.head_hidden_dim,
            normalization=self.normalization,
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_encoder(
    name: str,
    *,
    head: str = "linear",
    embedding_dim: int = 128,
    width_multiplier: float = 1.0,
    zero_init_residual: bool = False,
    sync_batchnorm: bool = False,
    image_size: int | None = None,
    stem_width: int = 0,
    head_hidden_dim: int = 0,
    normalization: str = "imagenet",
) -> Encoder:
    """Builds an Encoder, creating its variables when image_size is given.

    Args:
        name: backbone, one of BACKBONES.
        head: one of HEADS.
        embedding_dim: D, the embedding size.
        width_multiplier: scales every backbone stage's channels.
        zero_init_residual: zero-init the last BN gamma of every residual block.
        sync_batchnorm: global-batch BatchNorm statistics across replicas (see Encoder).
        image_size: if set, the encoder is called on zeros [1,image_size,image_size,3] so that
            its variables exist (needed before restoring a checkpoint or counting params).
        stem_width: channels of the stem conv; 0: 64 scaled by width_multiplier.
        head_hidden_dim: width of the hidden layer of the mlp heads; 0: F.
        normalization: the input mean/std, a key of NORMALIZATIONS.

    Returns:
        The Encoder.

    Raises:
        ValueError: for an unknown backbone or head.
    """
    encoder = Encoder(
        backbone=name,
        head=head,
        embedding_dim=embedding_dim,
        width_multiplier=width_multiplier,
        zero_init_residual=zero_init_residual,
        sync_batchnorm=sync_batchnorm,
        stem_width=stem_width,
        head_hidden_dim=head_hidden_dim,
        normalization=normalization,
    )
    if image_size is not None:
        encoder(tf.zeros([1, image_size, image_size, 3]), training=False)
    return encoder

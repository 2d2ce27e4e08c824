"""What decoding an image will allocate, read from its header before it is decoded.

A small file can decode to a huge image: a 291 KB PNG of 10000 x 10000 takes 1.3 GB, a 60 KB
GIF whose logical screen says 1 x 1 can hold a frame of 8000 x 8000. `header_shape` reads
(frames, width, height) as TensorFlow's decoder will allocate them, with TF ops on the encoded
string (no py_function: the checks run inside a SavedModel under TF Serving):

  - JPEG: the SOF marker (`tf.image.extract_jpeg_shape`); PNG: IHDR; BMP: the info header
    (a negative height is a top-down image). One frame each (TF decodes a PNG's first frame).
  - GIF: every image descriptor, found by walking the blocks (extensions and image data are
    chains of length-prefixed sub-blocks). TF's decoder (gif_io.cc, TF 2.20) reads every frame
    (`DGifSlurp`, width x height bytes each) even for a still, and sizes its output by the
    largest frame width and the largest frame height, not by the logical screen; so a GIF
    counts frames x largest width x largest height. Measured: 20 frames of 2000 x 2000 with
    `expand_animations=False` took 93 MB (20 x 4 MB read, one 12 MB RGB frame out), 319 MB
    expanded; a 1 x 1 first frame followed by a 3000 x 10 and a 10 x 3000 one decodes to
    3000 x 3000.

`checks` turns a shape into assertions with one-line messages and `refusal` gives the same line
in Python. `read_file` reads an image file of a folder dataset (`data`) behind those checks,
`check_file` names a file they refuse. `decode_images`,
the decoding of the `serving_bytes` signature (`saved_model`), also holds a request to its
`DecodeLimits` (batch size and bytes) and checks every header before it decodes any image.
"""

import dataclasses

import tensorflow as tf

from invp_tf import augment

# File signatures of the formats tf.io.decode_image reads (JPEG, PNG, GIF87a/89a, BMP).
IMAGE_MAGICS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
# How tf.io.decode_image tells the formats apart (decode_image_op.cc): any "GIF8" is a GIF to
# it (giflib reads any version), and it decodes WebP too, whose header is not read here.
_DECODED_AS = {"jpeg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n", "gif": b"GIF8", "bmp": b"BM"}
# Default largest image decoded (frames x width x height): 50 megapixels, 150 MB as RGB.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# Default largest `serving_bytes` request: 256 images, 64 MiB of encoded bytes. A batch of
# 10,000 tiny PNGs took 4.3 GB: each image is decoded and resized to S x S before the encoder
# sees the batch. Both are set per export (--max_batch_size, --max_request_bytes).
DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
# Steps of the GIF block walk. A step reads one record (a graphic control extension whole),
# or one data sub-block that is not full, with up to _FULL_SKIP full ones before it and the
# chain's end after it: an encoder's GIF takes 3 a frame (Pillow's animation of 20 frames of
# 300 x 200 noise: 63), so this admits some 2,500 frames. A file of tiny sub-blocks built to
# make the walk slow is refused at the limit: 1.2 s on the project's 2-core CPU at a load of 7
# (150 us a step).
MAX_GIF_STEPS = 8_192
# Full (255-byte) data sub-blocks skipped in one step of the walk (256 KB).
_FULL_SKIP = 1024
# The refusals, after the image's name and before where the limit is set; tf.strings.format
# and str.format read the same "{}" templates.
_FRAMES = " has {} frames, above the limit of {}"
_PIXELS = " decodes to {} frame(s) of {}x{} (width x height) = {} pixels, above the limit of {}"
_STEPS = (
    " is a GIF of more than {} blocks (extensions, frames, short data blocks), more than is "
    "read before decoding; re-encode it"
)
_UNKNOWN = " is not a JPEG, PNG, GIF or BMP image"


def _gif_shape(data, is_gif):
    """(frames, largest frame width, largest frame height) of a GIF, int64 [3]; frames is -1
    when the walk takes more than MAX_GIF_STEPS steps. Truncated files count the descriptors
    present (TF decodes the frames read before the end). Not a GIF (`is_gif` False): zeros,
    after no step."""
    raw = tf.io.decode_raw(tf.where(is_gif, data, ""), tf.uint8)  # [n], the GIF's bytes
    n = tf.size(raw, out_type=tf.int64)
    raw = tf.concat([raw, [0]], 0)  # [n + 1]: `byte` reads position 0 of an empty one

    def byte(positions):  # int64 bytes at `positions`, 0 past the end
        inside = positions < n
        values = tf.gather(raw, tf.where(inside, positions, tf.zeros_like(positions)))
        return tf.where(inside, tf.cast(values, tf.int64), tf.zeros_like(positions))

    def table(packed):  # bytes of the colour table a packed field announces
        size = tf.bitwise.left_shift(tf.constant(2, tf.int64), packed % 8)
        return tf.where(packed >= 128, 3 * size, tf.zeros_like(size))

    def step(state):
        # One record ("," an image, "!" an extension, else the end) at `pos`, or in a chain of
        # data sub-blocks (mode 1): the full ones from `pos` skipped, then one more sub-block.
        pos, mode, frames, width, height = tf.unstack(state[:5])
        in_blocks, record = mode > 0, mode <= 0
        full = byte(pos + 256 * tf.range(_FULL_SKIP, dtype=tf.int64))  # [_FULL_SKIP] lengths
        skip = tf.argmax(tf.concat([tf.cast(full != 255, tf.int32), [1]], 0), output_type=tf.int64)
        block = tf.where(in_blocks, pos + 256 * skip, pos)
        head = byte(block + tf.range(10, dtype=tf.int64))  # [10]: a descriptor, or a length
        is_image = record & tf.equal(head[0], 0x2C)
        is_extension = record & tf.equal(head[0], 0x21)
        # An extension: its label, a first sub-block and a chain of more. giflib (DGifSlurp)
        # reads the first sub-block apart and then always a chain, even after a first one of
        # length 0 (the GIF spec's end): so does this walk, or bytes TF reads as a sub-block
        # could hide a frame from it. One that ends inside `head` (a graphic control block)
        # takes one step.
        size = head[2]
        short = is_extension & (size < 7) & tf.equal(tf.gather(head, tf.minimum(size + 3, 9)), 0)
        after_block = block + 1 + head[0]  # a data sub-block; a length of 0 ends the chain
        ends = in_blocks & ((head[0] == 0) | tf.equal(byte(after_block[None])[0], 0))
        next_pos = tf.where(
            is_image,
            block + 11 + table(head[9]),  # descriptor, local colour table, LZW code size
            tf.where(
                is_extension,
                block + 3 + size + tf.cast(short, tf.int64),
                after_block + tf.cast(ends & (head[0] > 0), tf.int64),
            ),
        )
        grow = tf.cast(is_image & (block + 10 <= n), tf.int64)  # 1 for a whole descriptor
        stops = (record & ~is_image & ~is_extension) | (next_pos > n)
        return tf.stack(
            [
                next_pos,
                tf.cast(is_image | (is_extension & ~short) | (in_blocks & ~ends), tf.int64),
                frames + grow,
                tf.maximum(width, grow * (head[5] + 256 * head[6])),
                tf.maximum(height, grow * (head[7] + 256 * head[8])),
                tf.cast(stops, tf.int64),
            ]
        )

    screen = byte(tf.constant([10], tf.int64))[0]  # packed field of the logical screen
    start = tf.stack([13 + table(screen), 0, 0, 0, 0, 1 - tf.cast(is_gif, tf.int64)])
    state = tf.while_loop(
        lambda state: tf.equal(state[5], 0), step, [start], maximum_iterations=MAX_GIF_STEPS
    )[0]
    return tf.stack([tf.where(state[5] > 0, state[2], -1), state[3], state[4]])


def header_shape(data):
    """(frames, width, height) int64 [3] that decoding `data` allocates. Frames -1: a GIF too
    long to walk (MAX_GIF_STEPS); -2: not a JPEG, PNG, GIF or BMP (no header read).

    Args:
      data: string scalar, an encoded image (a file too short for its header gives zeros; a
        JPEG whose header does not parse raises the decoder's InvalidArgumentError).
    """
    head = tf.strings.substr(data, 0, 32) + b"\0" * 32  # short files: zeros, not errors
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(head, 0, 32), tf.uint8), tf.int64)

    def number(offset, size, big_endian):
        digits = [raw[offset + i] for i in range(size)]
        if not big_endian:
            digits.reverse()
        value = tf.constant(0, tf.int64)
        for digit in digits:
            value = value * 256 + digit
        return value

    def signed32(value):  # BMP stores a negative height for top-down rows
        return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

    def still(width, height):
        return tf.stack([tf.constant(1, tf.int64), width, height])

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)  # [height, width, channels]
        return still(shape[1], shape[0])

    prefix = lambda magic: tf.strings.substr(data, 0, len(magic)) == magic  # noqa: E731
    # No tf.case: the header arithmetic of PNG and BMP costs less than a branch (in a tf.data
    # map of PNGs, the case of four branches took 0.6 ms an image, this 0.37 ms).
    png = still(number(16, 4, True), number(20, 4, True))  # IHDR
    bmp = still(signed32(number(18, 4, False)), signed32(number(22, 4, False)))
    is_jpeg, is_gif = prefix(_DECODED_AS["jpeg"]), prefix(_DECODED_AS["gif"])
    shape = tf.constant([-2, 0, 0], tf.int64)
    shape = tf.where(prefix(_DECODED_AS["png"]), png, shape)
    shape = tf.where(prefix(_DECODED_AS["bmp"]), bmp, shape)
    shape = tf.where(is_jpeg, tf.cond(is_jpeg, jpeg, lambda: tf.zeros([3], tf.int64)), shape)
    # The GIF walk (a tf.while_loop) only for GIFs: other files skip its setup too.
    return tf.cond(is_gif, lambda: _gif_shape(data, tf.constant(True)), lambda: shape)


def checks(shape, name, max_pixels, max_frames, limit_text):
    """Assertions that an image of `shape` is within the limits; each message is one line.

    Args:
      shape: int64 [3] (frames, width, height) from `header_shape`.
      name: string scalar naming the image in the messages ("image_bytes[3]", a path).
      max_pixels: the largest frames x width x height.
      max_frames: the most frames; 0: no limit of its own.
      limit_text: {"pixels": ..., "frames": ...}: the words after "above the limit of N",
        naming where that limit is set.

    Returns:
      A list of ops that fail with the first failing check's message: make the decode depend
      on them. Within the limits no message is formatted (a tf.cond).
    """
    frames, width, height = shape[0], shape[1], shape[2]
    pixels = frames * width * height

    def line(template, values, end=""):
        return tf.strings.join([name, tf.strings.format(template, values), end])

    within = [
        tf.not_equal(frames, -2),
        frames >= 0,
        tf.logical_or(max_frames == 0, frames <= max_frames),
        pixels <= max_pixels,
    ]

    def refuse():
        # The messages are formatted here only, for an image that fails: the first failing
        # check's line, as the chain of assertions ran before.
        ops = []
        messages = [
            line(_UNKNOWN, ()),
            line(_STEPS, (MAX_GIF_STEPS,)),
            line(_FRAMES, (frames, max_frames), limit_text["frames"]),
            line(_PIXELS, (frames, width, height, pixels, max_pixels), limit_text["pixels"]),
        ]
        for ok, message in zip(within, messages, strict=True):
            with tf.control_dependencies(ops[-1:]):
                ops.append(tf.debugging.Assert(ok, [message]))
        with tf.control_dependencies(ops[-1:]):
            return tf.constant(False)

    passed = tf.cond(tf.reduce_all(tf.stack(within)), lambda: tf.constant(True), refuse)
    return [passed]


def refusal(shape, name, max_pixels, max_frames, limit_text):
    """The line `checks` fails with for `shape` (three ints), or None within the limits (or
    for a file whose header is not read)."""
    frames, width, height = (int(value) for value in shape)
    pixels = frames * width * height
    if frames == -2:
        return None  # no header read: whether it decodes is for the decoder to say
    if frames < 0:
        return name + _STEPS.format(MAX_GIF_STEPS)
    if max_frames and frames > max_frames:
        return name + _FRAMES.format(frames, max_frames) + limit_text["frames"]
    if pixels > max_pixels:
        values = (frames, width, height, pixels, max_pixels)
        return name + _PIXELS.format(*values) + limit_text["pixels"]
    return None


# Images of folder datasets are refused above DEFAULT_MAX_IMAGE_PIXELS, like serving_bytes'.
_FOLDER_LIMIT = {"pixels": " for folder datasets; downscale the file or remove it", "frames": ""}
_file_shape = tf.function(
    lambda path: header_shape(tf.io.read_file(path)),
    input_signature=[tf.TensorSpec([], tf.string)],
)


def read_file(path):
    """The bytes of the image file `path` of a folder dataset, once its header is read and
    within DEFAULT_MAX_IMAGE_PIXELS: any other file (a larger image, WebP, no image) raises
    InvalidArgumentError naming it when read, and is never decoded.

    Its cost, measured in a tf.data map decoding 64 x 64 PNGs on the project's loaded 2-core
    CPU: 0.36 ms an image against 0.1 ms for tf.io.read_file (half of it the GIF walk's
    tf.while_loop, present even when it takes no step); small next to decoding a photo.
    Eager calls run as one tf.function.
    """
    if tf.executing_eagerly():
        return _read_file(tf.convert_to_tensor(path, tf.string))
    data = tf.io.read_file(path)
    shape = header_shape(data)
    with tf.control_dependencies(checks(shape, path, DEFAULT_MAX_IMAGE_PIXELS, 0, _FOLDER_LIMIT)):
        return tf.identity(data)


_read_file = tf.function(read_file, input_signature=[tf.TensorSpec([], tf.string)])


def check_file(path):
    """Raises ValueError with the line of `read_file`'s refusal of the image file `path` above
    the limit (eager; other files pass: their decoding tells what is wrong)."""
    try:
        shape = _file_shape(path).numpy()
    except tf.errors.OpError:  # a JPEG header that does not parse: its decoding fails anyway
        return
    refused = refusal(shape, path, DEFAULT_MAX_IMAGE_PIXELS, 0, _FOLDER_LIMIT)
    if refused:
        raise ValueError(refused)


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """What one `serving_bytes` request may ask to decode; each is a flag of invp_tf.export.

    Attributes:
      max_image_pixels: largest frames x width x height of one image (`header_shape`).
      max_image_frames: most frames of one image (GIF); 0: no limit but the pixels.
      max_batch_size: most images in one request.
      max_request_bytes: most encoded bytes in one request, all images together.
    """

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_frames: int = 0
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES

    def validate(self):
        """Raises ValueError naming the flag of a limit out of range."""
        for name, value in dataclasses.asdict(self).items():
            lowest = 0 if name == "max_image_frames" else 1
            if value < lowest:
                raise ValueError(f"--{name}={value} must be >= {lowest}")

    def text(self, name):
        """The end of a refusal: where the limit `name` is set."""
        return f" of this export (--{name} of invp_tf.export)"


def _request_checks(image_bytes, limits):
    """Assertions on the whole request, its batch size and then its encoded bytes."""
    count = tf.shape(image_bytes, out_type=tf.int64)[0]
    totals = tf.cumsum(tf.cast(tf.strings.length(image_bytes), tf.int64))  # [B], bytes so far
    total = tf.reduce_sum(totals[-1:])  # 0 for an empty request
    first = tf.argmax(tf.concat([totals > limits.max_request_bytes, [True]], 0))
    batch = tf.debugging.Assert(
        count <= limits.max_batch_size,
        [
            tf.strings.format(
                "image_bytes[{}] is past the batch limit: the request holds {} images, above "
                "the limit of {}" + limits.text("max_batch_size"),
                (limits.max_batch_size, count, limits.max_batch_size),
            )
        ],
    )
    with tf.control_dependencies([batch]):
        size = tf.strings.format(
            "image_bytes[{}] brings the request to {} bytes ({} in all), above the limit of {}"
            + limits.text("max_request_bytes"),
            (first, tf.gather(tf.concat([totals, [0]], 0), first), total, limits.max_request_bytes),
        )
        return tf.debugging.Assert(total <= limits.max_request_bytes, [size])


def decode_images(image_bytes, image_size, limits=None):
    """Encoded images -> the evaluation view of training, [B, S, S, 3] float32 in [0, 1].

    Each element is decoded with `tf.io.decode_image` (first frame of a GIF, grey and RGBA
    converted to RGB), then resized/cropped by `augment.eval_view`, exactly as the eval pipeline
    does for image folders. Nothing is decoded before the request's batch size and bytes and
    every image's header (`header_shape`: frames, width, height) are within
    `limits`; a refusal is one line naming the limit, the value and the image's index.

    Args:
      image_bytes: string [B], encoded JPEG, PNG, GIF or BMP images.
      image_size: S.
      limits: a `DecodeLimits`; None: the defaults.

    Returns:
      float32 [B, S, S, 3].
    """

    def check_one(i):
        data = image_bytes[i]
        is_image = tf.reduce_any(
            [tf.strings.substr(data, 0, len(m)) == m for m in IMAGE_MAGICS], axis=0
        )
        message = tf.strings.format(
            "image_bytes[{}] is not an encoded JPEG, PNG, GIF or BMP image; it starts with {}",
            (i, tf.strings.substr(data, 0, 8)),
        )
        checked = tf.debugging.Assert(is_image, [message])
        with tf.control_dependencies([checked]):
            shape = header_shape(data)
        within = checks(
            shape,
            tf.strings.format("image_bytes[{}]", i),
            limits.max_image_pixels,
            limits.max_image_frames,
            {name: limits.text(f"max_image_{name}") for name in ("pixels", "frames")},
        )
        with tf.control_dependencies(within):
            return tf.identity(i)

    def decode_one(i):
        image = tf.io.decode_image(image_bytes[i], channels=3, expand_animations=False)
        return augment.eval_view(tf.ensure_shape(image, [None, None, 3]), image_size)

    limits = limits or DecodeLimits()
    with tf.control_dependencies([_request_checks(image_bytes, limits)]):
        indices = tf.range(tf.shape(image_bytes)[0])
    # One image after the other: the first image out of bounds is the one named.
    checked = tf.map_fn(check_one, indices, parallel_iterations=1)
    with tf.control_dependencies([checked]):
        indices = tf.identity(indices)
    return tf.map_fn(
        decode_one,
        indices,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
    )

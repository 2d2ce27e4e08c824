// The input pipeline's view kernels (invp_tf/kernels.py builds them with the TopM
// kernels; invp_tf/augment.py runs them where they build, TensorFlow ops elsewhere):
// - InvpResizeAntialiased: the antialiased bilinear resize of the crops;
// - InvpColour: the colour steps of the cifar and moco_v2 recipes (jitter in each image's
//   random order, grayscale, flip) over a batch;
// - InvpGaussianBlur: the per-image Gaussian blur of the moco_v2 recipe.
// One call runs on one thread: the input pipeline runs many in parallel.
//
// InvpResizeAntialiased:
// image uint8 [H, W, C], size int32 [2] = (S_h, S_w) -> float32 [S_h, S_w, C] in [0, 1]:
// tf.image.resize(tf.image.convert_image_dtype(image, tf.float32), size, "bilinear",
// antialias=True), equal to float round-off (the same triangle kernel, the same spans and
// weights as TensorFlow's ScaleAndTranslate; the sums run on 0..255 and are scaled by 1/255
// once at the end).
//
// Per axis, output position x samples the input at (x + 0.5) * in / out; the triangle
// kernel is stretched by max(in / out, 1) (a low-pass filter when downsampling, plain
// interpolation when upsampling), its taps cut at the image border and renormalised to sum
// 1. The height pass runs first over whole rows (contiguous, vectorised), so the gather of
// the width pass touches only S_h rows.
//
// InvpGaussianBlur: images float [n, H, W, C], sigma float [n], apply bool [n], radius int32
// scalar -> float [n, H, W, C]: image i (where apply[i], else unchanged) convolved along H,
// then along W, with the kernel exp(-0.5 (t / sigma[i])^2), t = -radius..radius,
// normalised to sum 1, the borders reflect-padded (tf.pad's REFLECT: the edge pixel is not
// repeated); batch_views._blur_rows' values to float round-off. Each pass sums the taps of
// a block of 32 outputs in registers, the two of equal weight (t and -t) together, in the
// order of a running sum (the same rounding on every vector ISA). The output takes the
// input's buffer where TensorFlow allows, so the images left unblurred cost nothing.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace invp_tf {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace shape_inference = ::tensorflow::shape_inference;

// The kernels' inner loops are compiled for AVX-512, AVX2 and the
// baseline ISA, picked at load time by the CPU (the same sums: no contraction into FMA,
// -ffp-contract=off in kernels.py's build, so every variant rounds alike).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define INVP_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define INVP_VECTOR_CLONES
#endif

// dst[i] = sum_k kernel[k] * (lo[k][i] + hi[k][i]) + kernel[radius] * center[i], k < radius,
// summed in that order: a symmetric kernel's taps, a block of outputs at a time in
// registers (the loads of each tap's rows are the only memory traffic).
// 16 floats: one AVX-512 register, two AVX2 or four SSE ones, as the clone compiles it.
typedef float Float16 __attribute__((vector_size(64)));

INVP_VECTOR_CLONES void SymmetricTaps(float* dst, const float* const* lo, const float* const* hi,
                                      const float* center, const float* kernel,
                                      int64_t radius, int64_t n) {
  constexpr int64_t kBlock = 16;
  int64_t i = 0;
  for (; i + 2 * kBlock <= n; i += 2 * kBlock) {  // two accumulators: more loads in flight
    Float16 acc0 = {}, acc1 = {};
    for (int64_t k = 0; k < radius; ++k) {
      Float16 a0, b0, a1, b1;
      std::memcpy(&a0, lo[k] + i, sizeof(a0));
      std::memcpy(&b0, hi[k] + i, sizeof(b0));
      std::memcpy(&a1, lo[k] + i + kBlock, sizeof(a1));
      std::memcpy(&b1, hi[k] + i + kBlock, sizeof(b1));
      acc0 += kernel[k] * (a0 + b0);
      acc1 += kernel[k] * (a1 + b1);
    }
    Float16 c0, c1;
    std::memcpy(&c0, center + i, sizeof(c0));
    std::memcpy(&c1, center + i + kBlock, sizeof(c1));
    acc0 += kernel[radius] * c0;
    acc1 += kernel[radius] * c1;
    std::memcpy(dst + i, &acc0, sizeof(acc0));
    std::memcpy(dst + i + kBlock, &acc1, sizeof(acc1));
  }
  for (; i < n; ++i) {  // the tail, one output at a time (the same sums)
    float acc = 0.0f;
    for (int64_t k = 0; k < radius; ++k) acc += kernel[k] * (lo[k][i] + hi[k][i]);
    dst[i] = acc + kernel[radius] * center[i];
  }
}

INVP_VECTOR_CLONES void AddScaledU8(float* dst, const uint8_t* src, float w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += w * static_cast<float>(src[i]);
}

// The taps of one axis: output i reads inputs start[i] .. start[i] + count[i] - 1 with
// weights weight[offset[i] ...].
struct Taps {
  std::vector<int64_t> start, count, offset;
  std::vector<float> weight;
};

// ScaleAndTranslate's spans for the triangle kernel (radius 1), antialiased, translation 0.
Taps ComputeTaps(int64_t out_size, int64_t in_size) {
  Taps taps;
  const float scale = static_cast<float>(out_size) / static_cast<float>(in_size);
  const float inv_scale = 1.0f / scale;
  const float kernel_scale = std::max(inv_scale, 1.0f);
  const float radius = kernel_scale;  // the triangle's radius 1, stretched
  const float one_over_kernel_scale = 1.0f / kernel_scale;
  std::vector<float> temp;
  for (int64_t x = 0; x < out_size; ++x) {
    const float sample = (static_cast<float>(x) + 0.5f) * inv_scale;
    int64_t first = static_cast<int64_t>(std::ceil(sample - radius - 0.5f));
    int64_t last = static_cast<int64_t>(std::floor(sample + radius - 0.5f));
    first = std::clamp<int64_t>(first, 0, in_size - 1);
    last = std::clamp<int64_t>(last, 0, in_size - 1) + 1;
    temp.clear();
    float total = 0.0f;
    for (int64_t source = first; source < last; ++source) {
      const float position = static_cast<float>(source) + 0.5f - sample;
      const float w = std::max(0.0f, 1.0f - std::abs(position * one_over_kernel_scale));
      temp.push_back(w);
      total += w;
    }
    taps.start.push_back(first);
    taps.count.push_back(last - first);
    taps.offset.push_back(static_cast<int64_t>(taps.weight.size()));
    const bool usable = std::abs(total) >= 1000.0f * std::numeric_limits<float>::min();
    for (float w : temp) taps.weight.push_back(usable ? w / total : 0.0f);
  }
  return taps;
}

// The width pass of one row: dst[x, ch] = sum_k weight[x, k] * line[start[x] + k, ch] / 255.
void WidthPass(const Taps& cols, const float* line, float* dst, int64_t out_w, int64_t c) {
  for (int64_t x = 0; x < out_w; ++x) {
    const float* weight = cols.weight.data() + cols.offset[x];
    const float* src = line + cols.start[x] * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      float sum = 0.0f;
      for (int64_t k = 0; k < cols.count[x]; ++k) sum += weight[k] * src[k * c + ch];
      dst[x * c + ch] = sum * (1.0f / 255.0f);
    }
  }
}

// WidthPass for RGB: the three channels in one sweep over the taps.
void WidthPass3(const Taps& cols, const float* line, float* dst, int64_t out_w) {
  for (int64_t x = 0; x < out_w; ++x) {
    const float* weight = cols.weight.data() + cols.offset[x];
    const float* src = line + cols.start[x] * 3;
    float r = 0.0f, g = 0.0f, b = 0.0f;
    for (int64_t k = 0; k < cols.count[x]; ++k, src += 3) {
      r += weight[k] * src[0];
      g += weight[k] * src[1];
      b += weight[k] * src[2];
    }
    dst[3 * x] = r * (1.0f / 255.0f);
    dst[3 * x + 1] = g * (1.0f / 255.0f);
    dst[3 * x + 2] = b * (1.0f / 255.0f);
  }
}

class ResizeAntialiasedOp : public OpKernel {
 public:
  explicit ResizeAntialiasedOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& image = context->input(0);
    const Tensor& size = context->input(1);
    OP_REQUIRES(context, image.dims() == 3,
                ::tensorflow::errors::InvalidArgument("image must be [H, W, C], got ",
                                                      image.shape().DebugString()));
    OP_REQUIRES(context, size.dims() == 1 && size.NumElements() == 2,
                ::tensorflow::errors::InvalidArgument("size must be [2], got ",
                                                      size.shape().DebugString()));
    const int64_t in_h = image.dim_size(0), in_w = image.dim_size(1), c = image.dim_size(2);
    const int64_t out_h = size.vec<int32_t>()(0), out_w = size.vec<int32_t>()(1);
    OP_REQUIRES(context, in_h > 0 && in_w > 0 && c > 0,
                ::tensorflow::errors::InvalidArgument("image must not be empty, got ",
                                                      image.shape().DebugString()));
    OP_REQUIRES(context, out_h > 0 && out_w > 0,
                ::tensorflow::errors::InvalidArgument("size must be positive, got ", out_h,
                                                      "x", out_w));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context,
                   context->allocate_output(0, TensorShape({out_h, out_w, c}), &output));
    const Taps rows = ComputeTaps(out_h, in_h), cols = ComputeTaps(out_w, in_w);
    const uint8_t* in = image.flat<uint8_t>().data();
    float* out = output->flat<float>().data();
    const int64_t in_row = in_w * c, out_row = out_w * c;
    std::vector<float> line(in_row);  // one output row after the height pass
    for (int64_t y = 0; y < out_h; ++y) {
      std::fill(line.begin(), line.end(), 0.0f);
      for (int64_t k = 0; k < rows.count[y]; ++k) {
        const float w = rows.weight[rows.offset[y] + k];
        const uint8_t* src = in + (rows.start[y] + k) * in_row;
        AddScaledU8(line.data(), src, w, in_row);
      }
      float* dst = out + y * out_row;
      if (c == 3) {
        WidthPass3(cols, line.data(), dst, out_w);
      } else {
        WidthPass(cols, line.data(), dst, out_w, c);
      }
    }
  }
};

REGISTER_OP("InvpResizeAntialiased")
    .Input("image: uint8")
    .Input("size: int32")
    .Output("resized: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle image, size;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &image));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &size));
      shape_inference::ShapeHandle hw, out;
      TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(1, &hw));
      TF_RETURN_IF_ERROR(c->WithRank(hw, 2, &hw));
      TF_RETURN_IF_ERROR(c->Concatenate(hw, c->Vector(c->Dim(image, 2)), &out));
      c->set_output(0, out);
      return absl::OkStatus();
    })
    .Doc("tf.image.resize(image / 255, size, 'bilinear', antialias=True) of a uint8 [H, W, C].");

REGISTER_KERNEL_BUILDER(Name("InvpResizeAntialiased").Device(::tensorflow::DEVICE_CPU),
                        ResizeAntialiasedOp);

// The blur of one image [H, W, C] into out (which may be in), through tmp [H, W, C].
void BlurImage(const float* in, float* tmp, float* out, int64_t h, int64_t w, int64_t c,
               const std::vector<float>& kernel, int64_t radius) {
  const int64_t row = w * c;
  auto reflect = [](int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); };
  std::vector<const float*> lo(radius), hi(radius);
  // Along H: output row y adds the rows y - radius .. y + radius (taps k and 2r - k paired).
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t k = 0; k < radius; ++k) {
      lo[k] = in + reflect(y + k - radius, h) * row;
      hi[k] = in + reflect(y + radius - k, h) * row;
    }
    SymmetricTaps(tmp + y * row, lo.data(), hi.data(), in + y * row, kernel.data(), radius, row);
  }
  // Along W: each row reflect-padded into `padded`, then the taps as shifted whole rows.
  std::vector<float> padded((w + 2 * radius) * c);
  for (int64_t k = 0; k < radius; ++k) {
    lo[k] = padded.data() + k * c;
    hi[k] = padded.data() + (2 * radius - k) * c;
  }
  for (int64_t y = 0; y < h; ++y) {
    const float* src = tmp + y * row;
    for (int64_t x = -radius; x < w + radius; ++x) {
      std::copy(src + reflect(x, w) * c, src + reflect(x, w) * c + c,
                padded.data() + (x + radius) * c);
    }
    SymmetricTaps(out + y * row, lo.data(), hi.data(), padded.data() + radius * c,
                  kernel.data(), radius, row);
  }
}

class GaussianBlurOp : public OpKernel {
 public:
  explicit GaussianBlurOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& images = context->input(0);
    const Tensor& sigma = context->input(1);
    const Tensor& apply = context->input(2);
    const Tensor& radius_t = context->input(3);
    OP_REQUIRES(context, images.dims() == 4,
                ::tensorflow::errors::InvalidArgument("images must be [n, H, W, C], got ",
                                                      images.shape().DebugString()));
    const int64_t n = images.dim_size(0), h = images.dim_size(1), w = images.dim_size(2),
                  c = images.dim_size(3);
    OP_REQUIRES(context, sigma.dims() == 1 && sigma.dim_size(0) == n,
                ::tensorflow::errors::InvalidArgument("sigma must be [", n, "], got ",
                                                      sigma.shape().DebugString()));
    OP_REQUIRES(context, apply.dims() == 1 && apply.dim_size(0) == n,
                ::tensorflow::errors::InvalidArgument("apply must be [", n, "], got ",
                                                      apply.shape().DebugString()));
    OP_REQUIRES(context, radius_t.dims() == 0,
                ::tensorflow::errors::InvalidArgument("radius must be a scalar"));
    const int64_t radius = radius_t.scalar<int32_t>()();
    OP_REQUIRES(context, radius >= 0 && (n == 0 || (radius < h && radius < w)),
                ::tensorflow::errors::InvalidArgument("radius ", radius,
                                                      " must be in [0, min(H, W)), H, W = ",
                                                      h, ", ", w));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, images.shape(),
                                                                      &output));
    const int64_t size = h * w * c;
    if (size == 0) return;
    std::vector<float> tmp(size), kernel(2 * radius + 1);
    const float* in = images.flat<float>().data();
    float* out = output->flat<float>().data();
    for (int64_t i = 0; i < n; ++i) {
      if (!apply.vec<bool>()(i)) {
        if (out != in) std::copy(in + i * size, in + (i + 1) * size, out + i * size);
        continue;
      }
      const float s = sigma.vec<float>()(i);
      float total = 0.0f;
      for (int64_t k = 0; k <= 2 * radius; ++k) {
        const float t = static_cast<float>(k - radius) / s;
        kernel[k] = std::exp(-0.5f * t * t);
        total += kernel[k];
      }
      for (float& k : kernel) k /= total;
      BlurImage(in + i * size, tmp.data(), out + i * size, h, w, c, kernel, radius);
    }
  }
};

REGISTER_OP("InvpGaussianBlur")
    .Input("images: float")
    .Input("sigma: float")
    .Input("apply: bool")
    .Input("radius: int32")
    .Output("blurred: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle images, vec, radius;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &images));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &vec));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &vec));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &radius));
      c->set_output(0, images);
      return absl::OkStatus();
    })
    .Doc("Per-image separable Gaussian blur where apply, reflect-padded (batch_views).");

REGISTER_KERNEL_BUILDER(Name("InvpGaussianBlur").Device(::tensorflow::DEVICE_CPU),
                        GaussianBlurOp);

// ---------------------------------------------------------------------------------------
// InvpColour: images float [B, H, W, 3] in [0, 1] and each image's draws ->
// float [B, H, W, 3]: batch_views' colour steps (the XLA program `_moco_v2_colour` /
// `_cifar_colour`) to float round-off:
// - jitter [B] bool, order [B, 4] int32 (0 brightness, 1 contrast, 2 saturation, 3 hue),
//   factors [B, 3] (brightness, contrast, saturation), hue [B] (a fraction of the colour
//   wheel), enabled [4] bool (a zero strength is the identity): torchvision's ColorJitter
//   in the image's order, each step clipped to [0, 1];
// - grey [B] bool: tf.image.rgb_to_grayscale tiled to 3 channels, after the jitter, or
//   before it with grey_first (the cifar recipe);
// - flip [B] bool: mirrored along W, last.
// Each image is processed a row at a time in planar form (r, g, b runs of W floats, the
// per-pixel formulas vectorised); contrast needs the mean grey level of the image as it is
// at that step, so an image with contrast takes two passes, the first ending with that sum.

constexpr float kGreyR = 0.2989f, kGreyG = 0.587f, kGreyB = 0.114f;  // rgb_to_grayscale's

enum Step : int { kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3, kGrey = 4 };

INVP_VECTOR_CLONES void ScaleClip(float* x, float f, int64_t n) {
  // _blend with 0: 0 + f * (x - 0) is f * x exactly.
  for (int64_t i = 0; i < n; ++i) x[i] = std::min(std::max(f * x[i], 0.0f), 1.0f);
}

INVP_VECTOR_CLONES void BlendScalarClip(float* x, float other, float f, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::min(std::max(other + f * (x[i] - other), 0.0f), 1.0f);
  }
}

INVP_VECTOR_CLONES void GreyOf(const float* r, const float* g, const float* b, float* grey,
                               int64_t n) {
  for (int64_t i = 0; i < n; ++i) grey[i] = r[i] * kGreyR + g[i] * kGreyG + b[i] * kGreyB;
}

INVP_VECTOR_CLONES void BlendRowsClip(float* r, float* g, float* b, const float* grey, float f,
                                      int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    r[i] = std::min(std::max(grey[i] + f * (r[i] - grey[i]), 0.0f), 1.0f);
    g[i] = std::min(std::max(grey[i] + f * (g[i] - grey[i]), 0.0f), 1.0f);
    b[i] = std::min(std::max(grey[i] + f * (b[i] - grey[i]), 0.0f), 1.0f);
  }
}

// tf.image.rgb_to_hsv, the hue shifted by delta and wrapped (h - floor(h)),
// tf.image.hsv_to_rgb, clipped: XLA's branch-free formulas.
INVP_VECTOR_CLONES void ShiftHue(float* r, float* g, float* b, float delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float red = r[i], green = g[i], blue = b[i];
    const float value = std::max(std::max(red, green), blue);
    const float range = value - std::min(std::min(red, green), blue);
    // Every candidate computed, then selected: no branch, so the loop vectorises.
    const float quotient = range / value;
    const float saturation = value > 0.0f ? quotient : 0.0f;
    const float norm = (1.0f / 6.0f) / range;
    const float hue_g = norm * (blue - red) + 2.0f / 6.0f;
    const float hue_b = norm * (red - green) + 4.0f / 6.0f;
    const float hue_r = norm * (green - blue);
    float hue = red == value ? hue_r : (green == value ? hue_g : hue_b);
    hue = range > 0.0f ? hue : 0.0f;
    hue = hue < 0.0f ? hue + 1.0f : hue;
    hue += delta;
    hue -= std::floor(hue);
    const float dh = hue * 6.0f;
    const float dr = std::min(std::max(std::abs(dh - 3.0f) - 1.0f, 0.0f), 1.0f);
    const float dg = std::min(std::max(2.0f - std::abs(dh - 2.0f), 0.0f), 1.0f);
    const float db = std::min(std::max(2.0f - std::abs(dh - 4.0f), 0.0f), 1.0f);
    const float one_minus_s = 1.0f - saturation;
    r[i] = std::min(std::max((one_minus_s + saturation * dr) * value, 0.0f), 1.0f);
    g[i] = std::min(std::max((one_minus_s + saturation * dg) * value, 0.0f), 1.0f);
    b[i] = std::min(std::max((one_minus_s + saturation * db) * value, 0.0f), 1.0f);
  }
}

INVP_VECTOR_CLONES void Deinterleave(const float* src, float* r, float* g, float* b,
                                     int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    r[i] = src[3 * i];
    g[i] = src[3 * i + 1];
    b[i] = src[3 * i + 2];
  }
}

INVP_VECTOR_CLONES void Interleave(const float* r, const float* g, const float* b, float* dst,
                                   int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[3 * i] = r[i];
    dst[3 * i + 1] = g[i];
    dst[3 * i + 2] = b[i];
  }
}

struct ColourStep {
  Step step;
  float value;  // the factor, or the hue shift
};

// One row [W, 3] through `steps`, in planar buffers r, g, b, grey (W each).
void ColourRow(float* r, float* g, float* b, float* grey, const ColourStep* steps,
               int64_t num_steps, float mean, int64_t w) {
  for (int64_t s = 0; s < num_steps; ++s) {
    const ColourStep& step = steps[s];
    switch (step.step) {
      case kBrightness:
        ScaleClip(r, step.value, w);
        ScaleClip(g, step.value, w);
        ScaleClip(b, step.value, w);
        break;
      case kContrast:
        BlendScalarClip(r, mean, step.value, w);
        BlendScalarClip(g, mean, step.value, w);
        BlendScalarClip(b, mean, step.value, w);
        break;
      case kSaturation:
        GreyOf(r, g, b, grey, w);
        BlendRowsClip(r, g, b, grey, step.value, w);
        break;
      case kHue:
        ShiftHue(r, g, b, step.value, w);
        break;
      case kGrey:
        GreyOf(r, g, b, grey, w);
        std::copy(grey, grey + w, r);
        std::copy(grey, grey + w, g);
        std::copy(grey, grey + w, b);
        break;
    }
  }
}

// Rows of in through steps[0, num_steps) into out (which may be in), mirrored if flip;
// returns the sum of the result's grey levels if want_sum (else 0).
double ColourPass(const float* in, float* out, int64_t h, int64_t w, const ColourStep* steps,
                  int64_t num_steps, float mean, bool flip, bool want_sum,
                  std::vector<float>& planes) {
  float* r = planes.data();
  float* g = r + w;
  float* b = g + w;
  float* grey = b + w;
  double sum = 0.0;
  for (int64_t y = 0; y < h; ++y) {
    Deinterleave(in + y * w * 3, r, g, b, w);
    ColourRow(r, g, b, grey, steps, num_steps, mean, w);
    if (want_sum) {
      GreyOf(r, g, b, grey, w);
      for (int64_t x = 0; x < w; ++x) sum += grey[x];
    }
    if (flip) {
      std::reverse(r, r + w);
      std::reverse(g, g + w);
      std::reverse(b, b + w);
    }
    Interleave(r, g, b, out + y * w * 3, w);
  }
  return sum;
}

class ColourOp : public OpKernel {
 public:
  explicit ColourOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("grey_first", &grey_first_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& images = context->input(0);
    OP_REQUIRES(context, images.dims() == 4 && images.dim_size(3) == 3,
                ::tensorflow::errors::InvalidArgument("images must be [B, H, W, 3], got ",
                                                      images.shape().DebugString()));
    const int64_t n = images.dim_size(0), h = images.dim_size(1), w = images.dim_size(2);
    const char* names[] = {"jitter", "order", "factors", "hue", "enabled", "grey", "flip"};
    const int64_t widths[] = {0, 4, 3, 0, -1, 0, 0};  // 0: [B]; k > 0: [B, k]; -1: [4]
    for (int i = 0; i < 7; ++i) {
      const Tensor& t = context->input(i + 1);
      const bool ok = widths[i] < 0    ? t.dims() == 1 && t.dim_size(0) == 4
                      : widths[i] == 0 ? t.dims() == 1 && t.dim_size(0) == n
                                       : t.dims() == 2 && t.dim_size(0) == n &&
                                             t.dim_size(1) == widths[i];
      OP_REQUIRES(context, ok,
                  ::tensorflow::errors::InvalidArgument(
                      names[i], " must be ",
                      widths[i] < 0 ? std::string("[4]")
                                    : "[" + std::to_string(n) +
                                          (widths[i] ? ", " + std::to_string(widths[i]) : "") +
                                          "]",
                      ", got ", t.shape().DebugString()));
    }
    const auto jitter = context->input(1).vec<bool>();
    const auto order = context->input(2).matrix<int32_t>();
    const auto factors = context->input(3).matrix<float>();
    const auto hue = context->input(4).vec<float>();
    const auto enabled = context->input(5).vec<bool>();
    const auto grey = context->input(6).vec<bool>();
    const auto flip = context->input(7).vec<bool>();
    for (int64_t i = 0; i < n; ++i) {
      for (int k = 0; k < 4; ++k) {
        OP_REQUIRES(context, order(i, k) >= 0 && order(i, k) < 4,
                    ::tensorflow::errors::InvalidArgument("order[", i, ", ", k, "] = ",
                                                          order(i, k), " is not in [0, 4)"));
      }
    }
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, images.shape(),
                                                                      &output));
    const int64_t size = h * w * 3;
    if (size == 0) return;
    std::vector<float> planes(4 * w);
    const float* in = images.flat<float>().data();
    float* out = output->flat<float>().data();
    for (int64_t i = 0; i < n; ++i) {
      // The image's steps; `split` is the contrast step's index (num if none).
      ColourStep steps[6];
      int64_t num = 0, split = -1;
      if (grey_first_ && grey(i)) steps[num++] = {kGrey, 0.0f};
      for (int k = 0; k < 4 && jitter(i); ++k) {
        const int op = order(i, k);
        if (!enabled(op)) continue;
        if (op == kContrast) split = num;
        steps[num++] = {static_cast<Step>(op), op == kHue ? hue(i) : factors(i, op)};
      }
      if (!grey_first_ && grey(i)) steps[num++] = {kGrey, 0.0f};
      const float* src = in + i * size;
      float* dst = out + i * size;
      if (split < 0) {
        ColourPass(src, dst, h, w, steps, num, 0.0f, flip(i), false, planes);
        continue;
      }
      const double sum = ColourPass(src, dst, h, w, steps, split, 0.0f, false, true, planes);
      const float mean = static_cast<float>(sum / static_cast<double>(h * w));
      ColourPass(dst, dst, h, w, steps + split, num - split, mean, flip(i), false, planes);
    }
  }

 private:
  bool grey_first_ = false;
};

REGISTER_OP("InvpColour")
    .Input("images: float")
    .Input("jitter: bool")
    .Input("order: int32")
    .Input("factors: float")
    .Input("hue: float")
    .Input("enabled: bool")
    .Input("grey: bool")
    .Input("flip: bool")
    .Attr("grey_first: bool = false")
    .Output("coloured: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle images;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &images));
      c->set_output(0, images);
      return absl::OkStatus();
    })
    .Doc("The recipes' colour jitter (random order), grayscale and flip (batch_views).");

REGISTER_KERNEL_BUILDER(Name("InvpColour").Device(::tensorflow::DEVICE_CPU), ColourOp);

}  // namespace
}  // namespace invp_tf

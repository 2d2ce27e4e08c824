// The input pipeline's view kernels (invp_tf/kernels.py builds them with the TopM
// kernels; invp_tf/augment.py runs them where they build, TensorFlow ops elsewhere):
// - InvpResizeAntialiased: the antialiased bilinear resize of the crops;
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
// InvpGaussianBlur: images float [n, H, W, C], sigma float [n], radius int32 scalar ->
// float [n, H, W, C]: image i convolved along H, then along W, with the kernel
// exp(-0.5 (t / sigma[i])^2), t = -radius..radius, normalised to sum 1, the borders
// reflect-padded (tf.pad's REFLECT: the edge pixel is not repeated); augment._blur_rows'
// values to float round-off. Each pass adds the taps over whole contiguous rows
// (vectorised), the two of equal weight (t and -t) in one sweep.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

// dst[i] += w * src[i], i < n: the kernels' inner loops, compiled for AVX-512, AVX2 and the
// baseline ISA, picked at load time by the CPU (the same sums: no contraction into FMA,
// -ffp-contract=off in kernels.py's build, so every variant rounds alike).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define INVP_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define INVP_VECTOR_CLONES
#endif

INVP_VECTOR_CLONES void AddScaled(float* dst, const float* src, float w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += w * src[i];
}

// dst[i] += w * (a[i] + b[i]): two taps of a symmetric kernel in one sweep.
INVP_VECTOR_CLONES void AddScaledPair(float* dst, const float* a, const float* b, float w,
                                      int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += w * (a[i] + b[i]);
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

// The blur of one image [H, W, C] into out, through tmp [H, W, C].
void BlurImage(const float* in, float* tmp, float* out, int64_t h, int64_t w, int64_t c,
               const std::vector<float>& kernel, int64_t radius) {
  const int64_t row = w * c;
  auto reflect = [](int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); };
  // Along H: output row y adds the rows y - radius .. y + radius.
  for (int64_t y = 0; y < h; ++y) {
    float* dst = tmp + y * row;
    std::fill(dst, dst + row, 0.0f);
    for (int64_t k = 0; k < radius; ++k) {  // the kernel is symmetric: taps k and 2r - k
      AddScaledPair(dst, in + reflect(y + k - radius, h) * row,
                    in + reflect(y + radius - k, h) * row, kernel[k], row);
    }
    AddScaled(dst, in + y * row, kernel[radius], row);
  }
  // Along W: each row reflect-padded into `padded`, then the taps as shifted whole rows.
  std::vector<float> padded((w + 2 * radius) * c);
  for (int64_t y = 0; y < h; ++y) {
    const float* src = tmp + y * row;
    for (int64_t x = -radius; x < w + radius; ++x) {
      std::copy(src + reflect(x, w) * c, src + reflect(x, w) * c + c,
                padded.data() + (x + radius) * c);
    }
    float* dst = out + y * row;
    std::fill(dst, dst + row, 0.0f);
    for (int64_t k = 0; k < radius; ++k) {
      AddScaledPair(dst, padded.data() + k * c, padded.data() + (2 * radius - k) * c,
                    kernel[k], row);
    }
    AddScaled(dst, padded.data() + radius * c, kernel[radius], row);
  }
}

class GaussianBlurOp : public OpKernel {
 public:
  explicit GaussianBlurOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& images = context->input(0);
    const Tensor& sigma = context->input(1);
    const Tensor& radius_t = context->input(2);
    OP_REQUIRES(context, images.dims() == 4,
                ::tensorflow::errors::InvalidArgument("images must be [n, H, W, C], got ",
                                                      images.shape().DebugString()));
    const int64_t n = images.dim_size(0), h = images.dim_size(1), w = images.dim_size(2),
                  c = images.dim_size(3);
    OP_REQUIRES(context, sigma.dims() == 1 && sigma.dim_size(0) == n,
                ::tensorflow::errors::InvalidArgument("sigma must be [", n, "], got ",
                                                      sigma.shape().DebugString()));
    OP_REQUIRES(context, radius_t.dims() == 0,
                ::tensorflow::errors::InvalidArgument("radius must be a scalar"));
    const int64_t radius = radius_t.scalar<int32_t>()();
    OP_REQUIRES(context, radius >= 0 && (n == 0 || (radius < h && radius < w)),
                ::tensorflow::errors::InvalidArgument("radius ", radius,
                                                      " must be in [0, min(H, W)), H, W = ",
                                                      h, ", ", w));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, images.shape(), &output));
    const int64_t size = h * w * c;
    if (size == 0) return;
    std::vector<float> tmp(size), kernel(2 * radius + 1);
    const float* in = images.flat<float>().data();
    float* out = output->flat<float>().data();
    for (int64_t i = 0; i < n; ++i) {
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
    .Input("radius: int32")
    .Output("blurred: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle images, sigma, radius;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &images));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &sigma));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 0, &radius));
      c->set_output(0, images);
      return absl::OkStatus();
    })
    .Doc("Per-image separable Gaussian blur, reflect-padded (augment._blur_rows).");

REGISTER_KERNEL_BUILDER(Name("InvpGaussianBlur").Device(::tensorflow::DEVICE_CPU),
                        GaussianBlurOp);

}  // namespace
}  // namespace invp_tf

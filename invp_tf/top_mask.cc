// InvpTopMask: the exact TopM set of every row as a [B, N] bool mask, one CPU pass per row.
//
// Row b of the output holds the k columns of tf.math.top_k(logits[b], k): the k
// largest values and, among columns tied at the k-th value, the lower column
// indices (top_k's rule); then column excluded[b] is cleared (when it is in
// 0..N-1). Rows with NaN: NaN ranks below every number, -inf included (among NaNs,
// the lower column first); TensorFlow's top_k has no consistent order for NaN, so
// there the set is this kernel's own.
//
// Per row: the k-th value is bracketed from a strided sample (every
// max(1, N / 2048)-th entry: 2,048 to 4,095 of them, or all of a shorter row),
// four standard deviations of the sample's rank error either side; one pass over
// the row marks the entries above the bracket and lists the ones inside it;
// std::nth_element finds the needed value among the listed ones, and a scan in
// column order takes those above it and, of those equal to it, the lowest columns.
// A row whose bracket misses (a collapsed or tied bank) is selected over all of its
// entries: the set never depends on the sample, only the cost does. Rows run in
// parallel on the CPU device's thread pool.
//
// Built on first use by invp_tf/kernels.py; losses._exact_top_mask runs it on the
// [B, N] similarities, and losses._exact_compact_background on each row's listed
// candidates, on machines without a GPU or TPU and outside XLA; elsewhere TensorFlow
// ops find the same set.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace invp_tf {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::TensorShapeUtils;
namespace shape_inference = ::tensorflow::shape_inference;

constexpr int64_t kSampleSize = 2048;

// NaN as -inf in the sample, which only places the bracket (std::nth_element needs a
// strict weak order; NaN has none).
inline float Key(float x) { return std::isnan(x) ? -INFINITY : x; }

struct Entry {
  float value;
  int64_t column;
};

// Before in (value descending, column ascending), NaN after every number: the order
// of top_k's output on numbers.
inline bool Before(const Entry& a, const Entry& b) {
  const bool a_nan = std::isnan(a.value), b_nan = std::isnan(b.value);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a.value != b.value) return a.value > b.value;
  return a.column < b.column;
}

// The rank-th largest of values[0, end) (1-based rank), by partial selection in place.
float RankValue(std::vector<float>& values, int64_t rank, int64_t end) {
  std::nth_element(values.begin(), values.begin() + (rank - 1), values.begin() + end,
                   std::greater<float>());
  return values[rank - 1];
}

// Scratch space of one thread, reused across its rows.
struct Scratch {
  std::vector<float> sample;
  std::vector<float> values;    // the entries in the bracket, in column order
  std::vector<int32_t> columns;  // their columns
  std::vector<float> order;      // a copy of values, partially sorted
  std::vector<Entry> all;
};

// A row whose bracket missed: every entry ranked by (value, then column).
void SelectAll(const float* row, int64_t n, int64_t k, bool* out, std::vector<Entry>* all) {
  all->resize(n);
  for (int64_t j = 0; j < n; ++j) (*all)[j] = {row[j], j};
  std::nth_element(all->begin(), all->begin() + (k - 1), all->end(), Before);
  std::fill(out, out + n, false);
  for (int64_t i = 0; i < k; ++i) out[(*all)[i].column] = true;
}

void SelectRow(const float* row, int64_t n, int64_t k, bool* out, Scratch* scratch) {
  if (k >= n) {
    std::fill(out, out + n, true);
    return;
  }
  const int64_t stride = std::max<int64_t>(1, n / kSampleSize);
  const int64_t sample_size = (n + stride - 1) / stride;
  std::vector<float>& sample = scratch->sample;
  sample.resize(sample_size);
  for (int64_t i = 0; i < sample_size; ++i) sample[i] = Key(row[i * stride]);
  const int64_t rank = std::min<int64_t>(
      sample_size, std::max<int64_t>(1, std::llround(static_cast<double>(k) * sample_size / n)));
  const int64_t margin = static_cast<int64_t>(std::ceil(4.0 * std::sqrt(rank))) + 2;
  // Fewer than k entries above hi and at least k at or above lo, unless the sample
  // misled (checked below). The second selection runs over the first one's head.
  int64_t head = sample_size;
  float lo = -INFINITY, hi = INFINITY;
  if (rank + margin <= sample_size) {
    head = rank + margin;
    lo = RankValue(sample, head, sample_size);
  }
  if (rank > margin) hi = RankValue(sample, rank - margin, head);
  // One branch-free pass: mark and count the entries above hi, list those in
  // [lo, hi]. A NaN is in neither (every comparison with it is false); where that
  // leaves fewer than k candidates, the row is selected over all of its entries.
  scratch->values.resize(n);
  scratch->columns.resize(n);
  float* values = scratch->values.data();
  int32_t* columns = scratch->columns.data();
  int64_t above = 0, listed = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float x = row[j];
    const bool is_above = x > hi;
    out[j] = is_above;
    above += is_above;
    values[listed] = x;
    columns[listed] = static_cast<int32_t>(j);
    listed += (x >= lo) & (x <= hi);
  }
  const int64_t need = k - above;
  if (need < 1 || need > listed) {
    SelectAll(row, n, k, out, &scratch->all);
    return;
  }
  // The need-th largest listed value, then the listed entries above it and the
  // first (lowest-column) ones equal to it, up to need.
  scratch->order.assign(values, values + listed);
  const float cut = RankValue(scratch->order, need, listed);
  int64_t ties = need;
  for (int64_t i = 0; i < listed; ++i) ties -= values[i] > cut;
  for (int64_t i = 0; i < listed; ++i) {
    const bool take = values[i] > cut || (values[i] == cut && ties-- > 0);
    if (take) out[columns[i]] = true;
  }
}

class TopMaskOp : public OpKernel {
 public:
  explicit TopMaskOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("k", &k_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& logits = context->input(0);
    const Tensor& excluded = context->input(1);
    OP_REQUIRES(context, TensorShapeUtils::IsMatrix(logits.shape()),
                absl::InvalidArgumentError("InvpTopMask: logits must be [B, N], got " +
                                           logits.shape().DebugString()));
    const int64_t batch = logits.dim_size(0), n = logits.dim_size(1);
    OP_REQUIRES(context, n <= std::numeric_limits<int32_t>::max(),
                absl::InvalidArgumentError("InvpTopMask: more than 2^31 - 1 columns: " +
                                           std::to_string(n)));
    OP_REQUIRES(context,
                TensorShapeUtils::IsVector(excluded.shape()) && excluded.dim_size(0) == batch,
                absl::InvalidArgumentError("InvpTopMask: excluded must be [B] = [" +
                                           std::to_string(batch) + "], got " +
                                           excluded.shape().DebugString()));
    Tensor* mask = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, logits.shape(), &mask));
    if (batch == 0 || n == 0) return;
    const float* values = logits.flat<float>().data();
    const int32_t* skip = excluded.flat<int32_t>().data();
    bool* out = mask->flat<bool>().data();
    const int64_t k = k_;
    auto rows = [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t b = begin; b < end; ++b) {
        SelectRow(values + b * n, n, k, out + b * n, &scratch);
        if (skip[b] >= 0 && skip[b] < n) out[b * n + skip[b]] = false;
      }
    };
    const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(workers.num_threads, workers.workers, batch, /*cost_per_unit=*/n * 8,
                        rows);
  }

 private:
  int64_t k_;
};

REGISTER_OP("InvpTopMask")
    .Input("logits: float")
    .Input("excluded: int32")
    .Attr("k: int >= 1")
    .Output("mask: bool")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle logits, excluded;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &logits));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &excluded));
      c->set_output(0, logits);
      return absl::OkStatus();
    })
    .Doc("Row b: the k columns of tf.math.top_k(logits[b], k), minus column excluded[b].");

REGISTER_KERNEL_BUILDER(Name("InvpTopMask").Device(::tensorflow::DEVICE_CPU), TopMaskOp);

}  // namespace
}  // namespace invp_tf
